"""What both command lines share: global options and error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from common import __version__
from common.errors import SpoolmqError
from common.exits import Exit
from common.logs import setup_logging

log = logging.getLogger("common.cli")


def global_options(env_var: str) -> argparse.ArgumentParser:
    """The options every subcommand takes, as a parent parser."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-c", "--config", metavar="FILE",
                        help=f"config file (default: ${env_var})")
    parent.add_argument("-v", "--verbose", action="count", default=0,
                        help="log at debug level (twice: paho's too)")
    parent.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or JSON (default: text)")
    return parent


class Parser(argparse.ArgumentParser):
    """argparse that exits 64 on usage errors, with one line."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def make_parser(prog: str, description: str) -> Parser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version",
                        version=f"{prog} (spoolmq) {__version__}")
    return parser


def run_command(prog: str, handler: Callable[[argparse.Namespace], int],
                args: argparse.Namespace) -> int:
    """Run a subcommand; any failure becomes one line and its exit code."""
    setup_logging(args.verbose, args.log_format,
                  quiet=getattr(args, "command", None) != "run")
    try:
        return int(handler(args))
    except SpoolmqError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(Exit.TEMPFAIL)
    except BrokenPipeError:
        # The reader went away (`... | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(Exit.OK)
    except Exception as exc:  # the one top-level catch: never a bare traceback
        log.debug("internal error", exc_info=True)
        print(f"{prog}: internal error: {exc!r}; run with -v for details and "
              "report it", file=sys.stderr)
        return int(Exit.SOFTWARE)

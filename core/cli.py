"""The `core-collector` command line: run, status, check.

Only this module configures logging and prints. Every failure ends in one
line on stderr and an exit code from `common.exits.Exit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from common import __version__
from common.config import config_path, dump_effective
from common.errors import ConfigError, SpoolmqError
from common.exits import Exit
from common.link import probe
from common.logs import setup_logging
from core.collector import Collector
from core.config import CoreConfig, load_core_config
from core.datastore import open_datastore, require_backend
from core.status import build_gaps_report, build_report, format_gaps, format_text

PROG = "core-collector"
ENV_CONFIG = "SPOOLMQ_CORE_CONFIG"

log = logging.getLogger("core.cli")


class Parser(argparse.ArgumentParser):
    """argparse that exits 64 with one line, as every spoolmq command does."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Receive record batches from edges over MQTT, store each "
        "record once, and confirm them to their edge.",
    )
    _add_common(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Options given after the command count too; SUPPRESS keeps a command
    # from resetting what was given before it.
    common = Parser(add_help=False)
    _add_common(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in (
        ("run", "collect until SIGTERM or SIGINT; never exits on broker trouble"),
        ("status", "per edge: records stored, gaps, last seen, lag"),
        ("gaps", "one edge's missing seq ranges, and its skipped ones apart"),
        ("check", "validate the config and print the effective one"),
    ):
        command = commands.add_parser(
            name, parents=[common], help=summary, description=summary
        )
        if name == "check":
            command.add_argument(
                "--connect",
                action="store_true",
                help="also connect to the broker once with these credentials "
                "(exit 69 unreachable, 77 refused)",
            )
        if name == "gaps":
            command.add_argument("edge_id", metavar="EDGE_ID", help="the edge")
        if name in ("status", "gaps"):
            command.add_argument(
                "--json", action="store_true", help="print the report as JSON"
            )
    return parser


def _add_common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default(None),
        help=f"config file (default: ${ENV_CONFIG})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log debug messages; twice to add paho's",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="log lines as text or as JSON objects (default: text)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("no command given: use run, status, gaps or check")
    setup_logging(args.verbose, args.log_format, quiet=args.command != "run")
    try:
        return int(COMMANDS[args.command](args))
    except SpoolmqError as exc:
        return _fail(str(exc), exc.exit_code)
    except Exception as exc:
        log.exception("internal error")
        return _fail(
            f"internal error: {exc!r}; this is a bug, please report it with the log",
            Exit.SOFTWARE,
        )


def _fail(message: str, code: Exit) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return int(code)


def _load_config(args: argparse.Namespace) -> CoreConfig:
    """The config, refused (78) when invalid or naming a backend not built."""
    path = config_path(args.config, ENV_CONFIG)
    try:
        cfg = load_core_config(path)
        require_backend(cfg.datastore.url)
    except ConfigError as exc:
        raise SpoolmqError(f"{path}: {exc}", exit_code=Exit.CONFIG) from None
    return cfg


def cmd_run(args: argparse.Namespace) -> Exit:
    cfg = _load_config(args)
    store = open_datastore(cfg.datastore.url)
    try:
        collector = Collector(cfg, store)
        _stop_on_signals(collector.request_stop)
        collector.run()
    finally:
        store.close()
    return Exit.OK


def _stop_on_signals(stop) -> None:
    def handler(signum, frame):
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def cmd_status(args: argparse.Namespace) -> Exit:
    cfg = _load_config(args)
    store = open_datastore(cfg.datastore.url, readonly=True)
    try:
        report = build_report(store, cfg.status)
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    if report["healthy"]:
        return Exit.OK
    silent = ", ".join(report["silent_edges"])
    return _fail(
        f"degraded: no data for over {cfg.status.silent_after} s from {silent}; "
        "check those edges and their links",
        Exit.TEMPFAIL,
    )


def cmd_gaps(args: argparse.Namespace) -> Exit:
    cfg = _load_config(args)
    store = open_datastore(cfg.datastore.url, readonly=True)
    try:
        known = {edge["edge_id"] for edge in store.edge_summary()}
        if args.edge_id not in known:
            raise SpoolmqError(
                f"no edge {args.edge_id!r} in the datastore; "
                "core-collector status lists the edges", exit_code=Exit.DATAERR)
        report = build_gaps_report(store, args.edge_id)
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else format_gaps(report))
    return Exit.OK


def cmd_check(args: argparse.Namespace) -> Exit:
    cfg = _load_config(args)
    print(dump_effective(cfg), end="")
    if args.connect:
        print(f"# {probe(cfg.broker, cfg.client_id)}")
    return Exit.OK


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "gaps": cmd_gaps,
    "check": cmd_check,
}

if __name__ == "__main__":
    sys.exit(main())

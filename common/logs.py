"""Logging setup, for the command-line entry points only."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(verbose: int = 0, fmt: str = "text", quiet: bool = False) -> None:
    """Log to stderr at info (or debug with -v), as text or JSON lines.

    One-shot commands pass quiet=True: they log warnings only, so that a
    failure is the one line the command prints.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    quiet_level = logging.WARNING if quiet else logging.INFO
    root.setLevel(logging.DEBUG if verbose else quiet_level)
    if verbose < 2:
        logging.getLogger("paho").setLevel(logging.WARNING)

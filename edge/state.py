"""The daemon's live state, in a small JSON file beside the outbox.

`edge-spooler status` reads it to tell whether the daemon runs and is
connected. It is written only when something changed, at most every few
seconds, so an idle edge writes nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def write_state(path: Path, state: dict) -> None:
    """Replace the state file atomically (write, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves an empty one
        raise
    os.replace(tmp, path)


def read_state(path: Path) -> dict | None:
    """The last state the daemon wrote, or None if there is none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_holding(path: str) -> int | None:
    """The pid of the daemon holding the outbox lock (0: unknown), or None."""
    try:
        with open(path, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        pass
    return None


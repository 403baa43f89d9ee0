"""`status` tells a running daemon by its outbox lock, not by its state file alone.

On a full disk the daemon cannot rewrite its state file, which then names
the previous daemon; the lock still shows who runs.
"""

from __future__ import annotations

import os

from edge.cli import _status_report
from edge.config import EdgeConfig
from edge.spooler import take_daemon_lock
from edge.state import daemon_holding

SUMMARY = {
    "oldest_accepted_at": None,
    "records_waiting": 0,
    "bytes_waiting": 0,
    "dead_letters": 0,
    "next_seq": 1,
}
DEAD_PID = 2**22 + 1  # above pid_max's default: no such process


def test_the_lock_names_the_daemon_holding_it(tmp_path):
    path = str(tmp_path / "outbox.db.lock")
    assert daemon_holding(path) is None  # no file yet
    handle = take_daemon_lock(path)
    try:
        assert daemon_holding(path) == os.getpid()
    finally:
        handle.close()
    assert daemon_holding(path) is None  # the file stays, the lock is gone


def test_a_stale_state_file_under_a_held_lock_is_reported_not_taken_for_stopped():
    cfg = EdgeConfig(edge_id="pi-017")
    state = {"pid": DEAD_PID, "connected": True}
    report = _status_report(cfg, {**SUMMARY}, state, holder=4242)
    assert report["running"] is True
    assert report["connected"] is False
    assert report["healthy"] is False
    assert any("pid 4242" in p and "state file" in p for p in report["problems"])


def test_no_lock_and_a_dead_pid_is_a_stopped_daemon():
    cfg = EdgeConfig(edge_id="pi-017")
    report = _status_report(cfg, {**SUMMARY}, {"pid": DEAD_PID}, holder=None)
    assert report["running"] is False
    assert "daemon not running" in report["problems"]

"""Daemon control signals by PID, config writers load, audits read the store."""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.config import load_edge_config
from tests.harness.daemons import (
    Daemon,
    DaemonError,
    DaemonSet,
    collector,
    merge,
    spooler,
    stored_ids,
    stored_payloads,
    wait_until,
    write_core_config,
    write_edge_config,
)

SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
# Exits 3 on SIGTERM, so an exit status of 3 proves SIGTERM was what came.
TERM_TO_EXIT_3 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORES_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def python(code: str, tmp_path: Path, name: str = "stand-in") -> Daemon:
    return Daemon(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def wait_ready(daemon: Daemon, count: int = 1) -> None:
    wait_until(
        lambda: daemon.log_text().count("ready") >= count,
        timeout=10,
        message=f"{daemon.name} never printed ready:\n{daemon.log_tail()}",
    )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def checked_gone_after_teardown() -> Iterator[list[int]]:
    """PIDs that must not exist once the fixtures set up after this ended."""
    pids: list[int] = []
    yield pids
    left = [pid for pid in pids if process_exists(pid)]
    assert not left, f"processes left running: {left}"


def test_kill_ends_the_process_with_sigkill(tmp_path):
    daemon = python(SLEEPER, tmp_path)
    daemon.start()
    assert daemon.running

    daemon.kill()
    assert not daemon.running
    assert daemon.returncode == -9
    assert not process_exists(daemon.pid)


def test_stop_sends_sigterm(tmp_path):
    daemon = python(TERM_TO_EXIT_3, tmp_path)
    daemon.start()
    wait_ready(daemon)

    daemon.stop()
    assert daemon.returncode == 3


def test_stop_kills_and_raises_when_sigterm_is_ignored(tmp_path):
    daemon = python(IGNORES_TERM, tmp_path)
    daemon.start()
    wait_ready(daemon)

    with pytest.raises(DaemonError, match="ignored SIGTERM"):
        daemon.stop(timeout=0.5)
    assert daemon.returncode == -9


def test_restart_starts_a_new_process_and_keeps_the_log(tmp_path):
    daemon = python(SLEEPER, tmp_path)
    with daemon:
        wait_ready(daemon)
        first = daemon.pid

        daemon.restart()
        wait_ready(daemon, count=2)
        assert daemon.running
        assert daemon.pid != first
        assert not process_exists(first)

        daemon.restart(hard=True)
        wait_ready(daemon, count=3)
    assert daemon.returncode == -15


def test_starting_a_running_daemon_is_refused(tmp_path):
    with python(SLEEPER, tmp_path) as daemon:
        with pytest.raises(DaemonError, match="already running"):
            daemon.start()


def test_a_daemon_set_kills_every_daemon_still_running_at_close(tmp_path):
    made = DaemonSet()
    running = made("a", [sys.executable, "-c", SLEEPER], tmp_path / "a.log")
    stopped = made("b", [sys.executable, "-c", SLEEPER], tmp_path / "b.log")
    running.start()
    stopped.start()
    stopped.stop()

    made.close()
    assert running.returncode == -9
    assert stopped.returncode == -15


def test_the_daemons_fixture_leaves_no_process_behind(
    checked_gone_after_teardown, daemons, tmp_path
):
    for name in ("one", "two"):
        daemon = daemons(name, [sys.executable, "-c", SLEEPER], tmp_path / name)
        daemon.start()
        checked_gone_after_teardown.append(daemon.pid)
    assert len(daemons.made) == 2


def test_the_daemon_helpers_run_this_checkouts_edge_and_core(tmp_path):
    config = tmp_path / "edge.yaml"
    edge = spooler(config, tmp_path)
    core = collector(tmp_path / "core.yaml", tmp_path)

    assert edge.argv == [sys.executable, "-m", "edge", "run", "-c", str(config)]
    assert core.argv[1:4] == ["-m", "core", "run"]
    assert edge.cwd == core.cwd == tmp_path
    assert edge.log_path == tmp_path / "edge-spooler.log"
    assert core.log_path == tmp_path / "core-collector.log"


def test_a_daemon_imports_the_checkout_from_any_working_directory(tmp_path):
    config = write_edge_config(
        tmp_path / "edge.yaml",
        edge_id="edge-check",
        port=1,
        outbox=tmp_path / "outbox.db",
        spools=[],
    )
    check = spooler(config, tmp_path, name="check")
    check.argv[3] = "check"

    check.start()
    assert check.wait() == 0, check.log_text()
    assert "edge-check" in check.log_text()


def test_the_edge_config_writer_round_trips_through_load_edge_config(tmp_path):
    spool_dir = tmp_path / "readings"
    path = write_edge_config(
        tmp_path / "edge.yaml",
        edge_id="edge-7",
        port=18830,
        outbox=tmp_path / "outbox.db",
        spools=[(spool_dir, "readings"), (tmp_path / "logs", "logs")],
        protocol="3.1.1",
        publish={"window": 100, "batch_records": 10},
        broker={"keepalive": 7},
    )

    cfg = load_edge_config(str(path))
    assert cfg.edge_id == "edge-7"
    assert (cfg.broker.host, cfg.broker.port) == ("127.0.0.1", 18830)
    assert cfg.broker.protocol == "3.1.1"
    assert cfg.broker.keepalive == 7
    assert (cfg.broker.reconnect_min, cfg.broker.reconnect_max) == (0.2, 2)
    assert cfg.outbox.path == str(tmp_path / "outbox.db")
    assert [(s.dir, s.stream) for s in cfg.spool] == [
        (str(spool_dir), "readings"),
        (str(tmp_path / "logs"), "logs"),
    ]
    assert (cfg.publish.window, cfg.publish.batch_records) == (100, 10)
    assert cfg.publish.resend_initial == 3.0


def test_the_core_config_writer_round_trips_through_load_core_config(tmp_path):
    core_config = pytest.importorskip(
        "core.config", reason="core.config is not written yet"
    )
    url = f"sqlite:///{tmp_path / 'core.db'}"
    path = write_core_config(
        tmp_path / "core.yaml",
        port=18831,
        db_url=url,
        client_id="core-a",
        datastore={"batch_messages": 50},
        share_group="collectors",
    )

    cfg = core_config.load_core_config(str(path))
    assert (cfg.broker.port, cfg.broker.protocol) == (18831, "5")
    assert cfg.broker.reconnect_max == 2
    assert cfg.datastore.url == url
    assert cfg.datastore.batch_messages == 50
    assert cfg.client_id == "core-a"
    assert cfg.share_group == "collectors"


def test_overrides_merge_into_nested_keys_and_none_removes_one():
    base = {"edge_id": "e", "broker": {"port": 1, "keepalive": 5}, "spool": [1]}

    merged = merge(base, {"broker": {"port": 2}, "edge_id": None, "spool": []})
    assert merged == {"broker": {"port": 2, "keepalive": 5}, "spool": []}
    assert base["broker"] == {"port": 1, "keepalive": 5}


def test_wait_until_returns_the_first_truthy_value():
    calls = iter([0, None, "", "done"])

    assert wait_until(lambda: next(calls), timeout=2, interval=0.01) == "done"


def test_wait_until_raises_with_the_message_on_timeout():
    with pytest.raises(AssertionError, match="never happened"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, message="never happened")


def test_stored_ids_is_empty_before_the_datastore_or_its_table_exists(tmp_path):
    assert stored_ids(tmp_path / "missing.db") == collections.Counter()
    sqlite3.connect(tmp_path / "empty.db").close()

    assert stored_ids(tmp_path / "empty.db") == collections.Counter()
    assert stored_payloads(tmp_path / "empty.db", "edge-a") == []
    assert not (tmp_path / "missing.db").exists()


def test_stored_ids_and_payloads_read_the_records_table(tmp_path):
    path = tmp_path / "core.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE records (edge_id, epoch, seq, payload)")
        db.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?)",
            [
                ("edge-a", "ep1", 2, json.dumps({"n": 2})),
                ("edge-a", "ep1", 1, json.dumps({"n": 1})),
                ("edge-b", "ep9", 1, json.dumps([1, 2])),
            ],
        )
    db.close()

    assert stored_ids(path) == collections.Counter(
        {("edge-a", "ep1", 1): 1, ("edge-a", "ep1", 2): 1, ("edge-b", "ep9", 1): 1}
    )
    assert stored_payloads(path, "edge-a") == [{"n": 1}, {"n": 2}]

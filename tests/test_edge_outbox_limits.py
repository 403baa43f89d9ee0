"""Outbox bounds: reject or drop the oldest, per stream; a full disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.config import IntakeConfig, OutboxConfig, SpoolConfig
from edge.errors import OutboxBusy, OutboxFull
from edge.outbox import Limits, Outbox, Record
from edge.spool import SpoolIntake
from tests.harness.daemons import stored_ids, wait_until, write_core_config
from tests.harness.daemons import write_edge_config


def edge_config(path, *, port, outbox_path, spools, outbox, **overrides):
    """An edge.yaml whose outbox section has more than its path."""
    path = write_edge_config(path, edge_id="e1", port=port, outbox=outbox_path,
                             spools=spools, **overrides)
    data = yaml.safe_load(path.read_text())
    data["outbox"].update(outbox)
    path.write_text(yaml.safe_dump(data))
    return path


def records(stream: str, n: int) -> list[Record]:
    return [Record(stream, json.dumps({"n": i}), 1767225600.0) for i in range(n)]


def test_a_full_outbox_under_reject_refuses_a_batch_whole(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    limits = Limits(max_records=100)
    outbox.accept(records("s", 90), limits=limits)

    with pytest.raises(OutboxFull) as caught:
        outbox.accept(records("s", 20), limits=limits)

    assert caught.value.exit_code == 75
    assert outbox.totals()[0] == 90
    assert outbox.accept(records("s", 10), limits=limits)[-1].seq == 100


def test_drop_oldest_makes_room_from_bulk_and_never_drops_alarms(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    limits = Limits(max_records=100, default_drop=False, flip=frozenset({"bulk"}))
    bulk = outbox.accept(records("bulk", 60), limits=limits, segment_records=10)
    alarms = outbox.accept(records("alarms", 40), limits=limits)

    more = outbox.accept(records("alarms", 30), limits=limits)

    kept = outbox.conn.execute(
        "SELECT stream, first_seq, count FROM segments ORDER BY id").fetchall()
    assert ("alarms", alarms[0].seq, 40) in kept
    assert ("alarms", more[0].seq, 30) in kept
    assert sum(n for s, _, n in kept if s == "bulk") == 30
    dropped = [(r.first_seq, r.last_seq) for r in outbox.skipped_pending()]
    assert dropped == [(1, 10), (11, 20), (21, 30)]
    assert outbox.dropped == 30
    assert bulk[0].seq == 1


def test_alarms_are_refused_once_only_alarms_are_left(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    limits = Limits(max_records=50, default_drop=True, flip=frozenset({"alarms"}))
    outbox.accept(records("alarms", 50), limits=limits)

    with pytest.raises(OutboxFull):
        outbox.accept(records("alarms", 1), limits=limits)
    assert outbox.skipped_pending() == []


def test_a_full_outbox_leaves_spool_files_where_the_producer_put_them(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    spool = tmp_path / "spool"
    intake = SpoolIntake(outbox, [SpoolConfig(str(spool), "s")], OutboxConfig(),
                         IntakeConfig(), Limits(max_records=5))
    intake.prepare()
    for i in range(8):
        (spool / f"f{i}.json").write_text(json.dumps({"n": i}))

    with pytest.raises(OutboxBusy):
        intake.scan()

    assert sorted(p.name for p in spool.glob("*.json")) == [f"f{i}.json" for i in
                                                          range(8)]
    assert list((spool / ".spoolmq").iterdir()) == []
    assert outbox.totals()[0] == 0


def test_send_on_a_full_outbox_exits_75_with_one_line(tmp_path):
    cfg = edge_config(tmp_path / "edge.yaml", port=1, outbox_path=tmp_path / "o.db",
                      spools=[], outbox={"max_records": 3})
    run = lambda data: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "edge", "send", "-c", str(cfg), "--stream", "s",
         "--lines", "--data", data], capture_output=True, text=True)
    assert run("1\n2\n3\n").returncode == 0

    refused = run("4\n")

    assert refused.returncode == 75
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "full" in refused.stderr


@pytest.mark.integration
def test_dropped_records_reach_the_core_as_skipped(tmp_path, broker, daemons):
    db = tmp_path / "core.db"
    edge_yaml = edge_config(
        tmp_path / "edge.yaml", port=broker.port, outbox_path=tmp_path / "o.db",
        spools=[], outbox={"max_records": 100, "segment_records": 10},
        streams={"bulk": {"when_full": "drop_oldest"}})
    from edge.api import Producer

    with Producer(str(edge_yaml)) as producer:
        bulk = producer.send_many("bulk", list(range(100)))
        alarms = producer.send_many("alarms", list(range(20)))
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    daemons.collector(core, tmp_path).start()
    daemons.spooler(edge_yaml, tmp_path).start()

    kept = {(i.edge_id, i.epoch, i.seq) for i in bulk[20:] + alarms}
    wait_until(lambda: set(stored_ids(db)) == kept, 30)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    wait_until(lambda: conn.execute(
        "SELECT sum(last_seq - first_seq + 1) FROM skipped").fetchone() == (20,), 30)
    assert conn.execute("SELECT min(first_seq), max(last_seq) FROM skipped"
                        ).fetchone() == (1, 20)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, so that the outbox really runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a size-limited tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_a_full_disk_pauses_intake_until_space_returns_and_resends_nothing(
    tmp_path, small_disk, broker, daemons
):
    db = tmp_path / "core.db"
    spool = tmp_path / "spool"
    edge_yaml = edge_config(
        tmp_path / "edge.yaml", port=broker.port, outbox_path=small_disk / "o.db",
        spools=[(spool, "s")], outbox={"max_bytes": 0})
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    collector = daemons.collector(core, tmp_path)
    collector.start()
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()
    spool.mkdir(exist_ok=True)
    (spool / "first.json").write_text('{"n": 0}')
    wait_until(lambda: len(stored_ids(db)) == 1, 20, message=spooler.log_tail())

    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for i in range(20):
        (spool / f"r{i}.json").write_text(json.dumps({"n": i + 1, "pad": "x" * 4000}))
    wait_until(lambda: "intake paused" in spooler.log_text(), 20,
               message=spooler.log_tail())
    assert spooler.running
    assert len(list(spool.glob("*.json"))) == 20
    refused = subprocess.run(
        [sys.executable, "-m", "edge", "send", "-c", str(edge_yaml), "--stream", "s",
         "--data", '{"pad": "' + "y" * 20000 + '"}'], capture_output=True, text=True)
    assert refused.returncode == 75, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    filler.unlink()
    wait_until(lambda: len(stored_ids(db)) == 21, 30, message=spooler.log_tail())
    assert "intake resumed" in spooler.log_text()
    assert max(stored_ids(db).values()) == 1
    assert list(spool.glob("*.json")) == []
    collector.stop()
    after_pause = spooler.log_text().split("intake paused", 1)[1]
    assert "resending" not in after_pause



"""TTL per stream on a clock that may start in 1970 or step back;
priorities after an outage; a cap on the publishing rate."""

from __future__ import annotations

import sqlite3
import time

import pytest

from edge.api import Producer
from edge.outbox import CLOCK_FLOOR, Outbox, Record, SegmentRow, _age, encode_body
from edge.window import Window
from tests.harness.daemons import wait_until, write_core_config, write_edge_config

SYNCED = CLOCK_FLOOR + 86400 * 30
UNSET = 86400.0  # 1970-01-02: a host without a real-time clock, just booted


@pytest.mark.parametrize(
    ("uptime_age", "wall_now", "wall_then", "age"),
    [
        (5.0, SYNCED, UNSET, 5.0),  # accepted in 1970, clock set since: fresh
        (5.0, SYNCED, SYNCED - 3600, 3600.0),  # host was off an hour: counts
        (5.0, SYNCED - 7200, SYNCED, 5.0),  # clock stepped back: uptime only
        (700.0, UNSET + 10, UNSET, 700.0),  # clock never set: uptime only
    ],
)
def test_a_records_age_survives_clock_jumps(uptime_age, wall_now, wall_then, age):
    assert _age(uptime_age, wall_now, wall_then) == age


def outbox_with_ages(tmp_path, rows):
    outbox = Outbox(tmp_path / "o.db", "e1")
    for stream, accepted_at, uptime_ago in rows:
        (rid,) = outbox.accept([Record(stream, "1", accepted_at)])
        outbox.conn.execute(
            "UPDATE segments SET accepted_at = ?, accepted_uptime = ? "
            "WHERE first_seq = ?", (accepted_at, outbox.uptime() - uptime_ago,
                                    rid.seq))
    return outbox


def test_expiry_drops_only_records_past_their_streams_ttl(tmp_path):
    now = time.time()
    outbox = outbox_with_ages(tmp_path, [
        ("telemetry", UNSET, 10.0),        # 1970 stamp, ten seconds old: kept
        ("telemetry", now - 7200, 10.0),   # two hours old by the wall: dropped
        ("telemetry", UNSET, 4000.0),      # an hour old by the outbox clock
        ("alarms", now - 7200, 4000.0),    # no TTL on alarms: kept
    ])

    dropped = outbox.expire({"telemetry": 3600.0}, keep=set())

    assert dropped == 2
    kept = outbox.conn.execute("SELECT stream, first_seq FROM segments").fetchall()
    assert kept == [("telemetry", 1), ("alarms", 4)]
    assert [(r.first_seq, r.reason) for r in outbox.skipped_pending()] == [
        (2, "ttl expired"), (3, "ttl expired")]


def test_expiry_leaves_segments_being_published_alone(tmp_path):
    outbox = outbox_with_ages(tmp_path, [("telemetry", UNSET, 9999.0)])
    (seg_id,) = outbox.conn.execute("SELECT id FROM segments").fetchone()

    assert outbox.expire({"telemetry": 1.0}, keep={seg_id}) == 0


def test_the_outbox_clock_carries_on_across_reopening(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    outbox._uptime_base = 500.0
    outbox.save_uptime()
    outbox.close()

    assert Outbox(tmp_path / "o.db", "e1").uptime() >= 500.0


def test_higher_priority_segments_are_published_first():
    w = Window(100, 10, 10**6, 0.0, 30.0, 60.0)
    body = encode_body([Record("s", "1", 0.0)] * 10)
    w.add([SegmentRow(1, "ep", "bulk", 1, 10, 0.0, body, 0),
           SegmentRow(2, "ep", "alarms", 11, 10, 0.0, body, 5)], now=0.0)

    first = w.next_chunk(1.0)

    assert first.stream == "alarms"
    assert w.last_ids == {0: 1, 5: 2}


def test_segments_load_by_priority_then_age(tmp_path):
    outbox = Outbox(tmp_path / "o.db", "e1")
    outbox.priorities = {"alarms": 5}
    outbox.accept([Record("bulk", "1", 0.0)] * 3, segment_records=1)
    outbox.accept([Record("alarms", "1", 0.0)] * 2, segment_records=1)

    rows = outbox.segments_by_priority({}, 3)

    assert [(r.stream, r.first_seq) for r in rows] == [
        ("alarms", 4), ("alarms", 5), ("bulk", 1)]
    assert [r.first_seq for r in outbox.segments_by_priority({5: 5, 0: 1}, 9)] == [
        2, 3]


def stored_order(db):
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [s for (s,) in conn.execute(
            "SELECT stream FROM records ORDER BY rowid")]
    finally:
        conn.close()


@pytest.mark.integration
def test_after_an_outage_the_alarms_go_before_the_bulk_backlog(tmp_path, broker,
                                                              daemons):
    db = tmp_path / "core.db"
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
        outbox=tmp_path / "o.db", spools=[],
        publish={"window": 100, "batch_records": 50},
        streams={"alarms": {"priority": 10}})
    with Producer(str(edge_yaml)) as producer:
        producer.send_many("bulk", list(range(3000)))
        producer.send_many("alarms", list(range(100)))
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    daemons.collector(core, tmp_path).start()
    daemons.spooler(edge_yaml, tmp_path).start()

    wait_until(lambda: len(stored_order(db)) == 3100, 60)
    order = stored_order(db)
    last_alarm = max(i for i, s in enumerate(order) if s == "alarms")
    assert last_alarm < 300, f"the last alarm was stored {last_alarm}th"


@pytest.mark.integration
def test_the_publishing_rate_cap_holds_a_backlog_to_its_pace(tmp_path, broker,
                                                             daemons):
    db = tmp_path / "core.db"
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
        outbox=tmp_path / "o.db", spools=[],
        publish={"batch_records": 20, "max_records_per_s": 200})
    with Producer(str(edge_yaml)) as producer:
        producer.send_many("s", list(range(600)))
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    daemons.collector(core, tmp_path).start()
    wait_until(lambda: db.exists(), 20)
    began = time.monotonic()
    daemons.spooler(edge_yaml, tmp_path).start()

    wait_until(lambda: len(stored_order(db)) == 600, 60)
    # 600 records at 200/s, the first second's worth at once: at least 2 s.
    assert time.monotonic() - began >= 2.0


@pytest.mark.integration
def test_records_past_their_ttl_while_offline_reach_the_core_as_skipped(
        tmp_path, broker, daemons):
    db = tmp_path / "core.db"
    broker.stop()
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
        outbox=tmp_path / "o.db", spools=[],
        streams={"telemetry": {"ttl": 2}})
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()
    with Producer(str(edge_yaml)) as producer:
        stale = producer.send_many("telemetry", list(range(10)))
        kept = producer.send_many("alarms", list(range(10)))
    wait_until(lambda: "TTL passed" in spooler.log_text(), 20,
               message=spooler.log_tail())

    broker.start()
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    daemons.collector(core, tmp_path).start()

    wait_until(lambda: len(stored_order(db)) == 10, 30)
    assert stored_order(db) == ["alarms"] * 10
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    wait_until(lambda: conn.execute("SELECT count(*) FROM skipped").fetchone()[0], 30)
    assert conn.execute("SELECT min(first_seq), max(last_seq), reason FROM skipped"
                        ).fetchone() == (stale[0].seq, stale[-1].seq, "ttl expired")
    assert kept[0].seq == 11


def test_a_record_a_producer_accepts_starts_its_ttl_when_the_daemon_sees_it(
        tmp_path):
    daemon = Outbox(tmp_path / "o.db", "e1")
    daemon.keeps_clock = True
    daemon._uptime_base = 5000.0  # the daemon ran long since the clock was saved
    producer = Outbox(tmp_path / "o.db", "e1")
    producer.accept([Record("short", "1", time.time())])

    assert daemon.expire({"short": 10.0}, keep=set()) == 0
    (stamped,) = daemon.conn.execute(
        "SELECT accepted_uptime FROM segments").fetchone()
    assert stamped >= 5000.0


def test_drop_oldest_as_the_outbox_default_drops_any_stream(tmp_path):
    from edge.outbox import Limits

    outbox = Outbox(tmp_path / "o.db", "e1")
    limits = Limits(max_records=5, default_drop=True)
    outbox.accept([Record("s", "1", 0.0)] * 4, limits=limits, segment_records=2)

    outbox.accept([Record("s", "2", 0.0)] * 2, limits=limits, segment_records=2)

    assert outbox.totals()[0] == 4
    assert [(r.first_seq, r.last_seq) for r in outbox.skipped_pending()] == [(1, 2)]


@pytest.mark.parametrize("setting", ["publish: {max_records_per_s: .nan}",
                                     "streams: {s: {ttl: .inf}}",
                                     "publish: {resend_initial: .nan}"])
def test_a_number_that_is_not_finite_is_a_config_error(tmp_path, setting):
    import subprocess
    import sys

    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"edge_id: e1\n{setting}\n")

    done = subprocess.run([sys.executable, "-m", "edge", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 78
    assert "finite" in done.stderr

"""A record no broker will carry is dead-lettered at the edge, reported to the
core as skipped and confirmed, while the rest of its batch flows."""

from __future__ import annotations

import sqlite3

import pytest

from edge.api import Producer
from tests.harness.daemons import stored_ids, wait_until, write_core_config
from tests.harness.daemons import write_edge_config

pytestmark = pytest.mark.integration


def rows(path, sql):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_oversize_record_in_the_outbox_is_dead_lettered_and_reported_skipped(
    tmp_path, broker, daemons, protocol
):
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
        outbox=tmp_path / "outbox.db", spools=[], protocol=protocol)
    with Producer(str(edge_yaml)) as producer:
        small = producer.send_many("s", [{"n": i} for i in range(5)])
        big = producer.send("s", {"blob": "x" * 50_000})
        after = producer.send_many("s", [{"n": i} for i in range(5, 10)])
    # The broker limit shrinks after acceptance, as when an operator lowers it.
    write_edge_config(
        edge_yaml, edge_id="e1", port=broker.port, outbox=tmp_path / "outbox.db",
        spools=[], protocol=protocol, broker={"max_message_bytes": 10_000})
    db = tmp_path / "core.db"
    core_yaml = write_core_config(tmp_path / "core.yaml", port=broker.port,
                                  db_url=f"sqlite:///{db}", protocol=protocol)
    daemons.collector(core_yaml, tmp_path).start()
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()

    expected = {(i.edge_id, i.epoch, i.seq) for i in small + after}
    wait_until(lambda: set(stored_ids(db)) == expected, 30, message=spooler.log_tail())
    (bad,) = big
    wait_until(lambda: rows(tmp_path / "outbox.db",
                            "SELECT count(*) FROM skipped") == [(0,)], 30,
               message="the core never confirmed the skipped notice")
    wait_until(lambda: rows(tmp_path / "outbox.db",
                            "SELECT count(*) FROM segments") == [(0,)], 30)
    assert rows(tmp_path / "outbox.db", "SELECT seq, reason FROM dead_letters")[0][0] \
        == bad.seq
    assert rows(db, "SELECT edge_id, epoch, first_seq, last_seq FROM skipped") == [
        ("e1", bad.epoch, bad.seq, bad.seq)
    ]
    assert "dead-lettered record" in spooler.log_text()

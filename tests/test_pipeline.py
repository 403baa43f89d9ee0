"""The whole path against real processes: spool files or `send`, a real
Mosquitto, a real collector into SQLite; every test checks exact record ids."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from edge.api import Producer
from edge.config import load_edge_config
from edge.outbox import Outbox, decode_body
from tests.harness.daemons import (
    stored_ids,
    write_core_config,
    write_edge_config,
    wait_until,
)

pytestmark = pytest.mark.integration

PROTOCOLS = ["5", "3.1.1"]


class Pipeline:
    """One edge, one collector and a broker, all in `tmp`."""

    def __init__(self, tmp: Path, broker, daemons, protocol: str, edge_id="e1",
                 **edge_overrides):
        self.tmp = tmp
        self.broker = broker
        self.edge_id = edge_id
        self.db = tmp / "core.db"
        self.spool = tmp / "spool"
        self.edge_yaml = write_edge_config(
            tmp / "edge.yaml", edge_id=edge_id, port=broker.port,
            outbox=tmp / "outbox.db", spools=[(self.spool, "readings")],
            protocol=protocol, **edge_overrides)
        core_yaml = write_core_config(
            tmp / "core.yaml", port=broker.port, db_url=f"sqlite:///{self.db}",
            protocol=protocol)
        self.spooler = daemons.spooler(self.edge_yaml, tmp)
        self.collector = daemons.collector(core_yaml, tmp)

    def send(self, values, stream="readings") -> set:
        with Producer(str(self.edge_yaml)) as producer:
            ids = producer.send_many(stream, values)
        return {(i.edge_id, i.epoch, i.seq) for i in ids}

    def write_spool_files(self, values, prefix="f") -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        for i, value in enumerate(values):
            tmp = self.spool / f".{prefix}{i}.tmp"
            with open(tmp, "w") as f:
                json.dump(value, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.spool / f"{prefix}{i}.json")

    def stored(self) -> Counter:
        return stored_ids(self.db)

    def wait_stored(self, expected: set, timeout=60.0) -> Counter:
        wait_until(lambda: set(self.stored()) >= expected, timeout,
                   message=f"not all of {len(expected)} records stored: "
                   f"{len(set(self.stored()) & expected)} are\n"
                   f"{self.spooler.log_tail()}\n{self.collector.log_tail()}")
        return self.stored()

    def outbox_records(self) -> int:
        cfg = load_edge_config(str(self.edge_yaml))
        outbox = Outbox(cfg.outbox.path, cfg.edge_id)
        try:
            return outbox.summary()["records_waiting"]
        finally:
            outbox.close()

    def wait_outbox_empty(self, timeout=30.0) -> None:
        wait_until(lambda: self.outbox_records() == 0, timeout,
                   message="receipts did not empty the outbox\n"
                   + self.spooler.log_tail())


def assert_exactly(stored: Counter, expected: set) -> None:
    missing = expected - set(stored)
    doubled = {k for k, n in stored.items() if n > 1}
    extra = set(stored) - expected
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    assert not doubled, f"{len(doubled)} stored twice"
    assert not extra, f"{len(extra)} unexpected, e.g. {sorted(extra)[:5]}"


@pytest.fixture(params=PROTOCOLS, ids=lambda p: f"mqtt{p}")
def pipeline(request, tmp_path, broker, daemons):
    return Pipeline(tmp_path, broker, daemons, request.param)


def test_records_from_spool_files_reach_the_datastore_with_their_exact_ids(
        pipeline):
    pipeline.collector.start()
    pipeline.spooler.start()
    values = [{"n": i, "t": 20.0 + i / 10} for i in range(300)]
    pipeline.write_spool_files(values)
    wait_until(lambda: len(pipeline.stored()) >= 300, 30,
               message=pipeline.spooler.log_tail())
    pipeline.wait_outbox_empty()
    stored = pipeline.stored()
    epochs = {e for _, e, _ in stored}
    assert len(epochs) == 1
    epoch = epochs.pop()
    assert_exactly(stored, {("e1", epoch, s) for s in range(1, 301)})
    assert sorted(_payloads(pipeline.db), key=lambda p: p["n"]) == values
    assert list(pipeline.spool.glob("*.json")) == []


def test_records_sent_while_the_collector_is_stopped_arrive_when_it_starts(
        pipeline):
    pipeline.collector.start()
    pipeline.spooler.start()
    first = pipeline.send([{"n": -1}])
    pipeline.wait_stored(first)
    pipeline.collector.stop()
    expected = first | pipeline.send([{"n": i} for i in range(5000)])
    pipeline.collector.start()
    assert_exactly(pipeline.wait_stored(expected), expected)
    pipeline.wait_outbox_empty()


def test_a_spooler_started_while_the_broker_is_down_delivers_once_it_is_up(
        pipeline):
    pipeline.broker.stop()
    pipeline.spooler.start()
    pipeline.write_spool_files([{"n": i} for i in range(50)])
    wait_until(lambda: pipeline.outbox_records() == 50, 20,
               message="intake did not go on while the broker was down")
    assert pipeline.spooler.running
    pipeline.broker.start()
    pipeline.collector.start()
    stored = wait_until(lambda: len(pipeline.stored()) >= 50 and pipeline.stored(),
                        60, message=pipeline.spooler.log_tail())
    epoch = {e for _, e, _ in stored}.pop()
    assert_exactly(stored, {("e1", epoch, s) for s in range(1, 51)})


def test_a_spooler_killed_during_intake_loses_and_doubles_nothing(pipeline):
    pipeline.collector.start()
    pipeline.spooler.start()
    pipeline.write_spool_files([{"n": i} for i in range(2000)])
    for _ in range(3):
        wait_until(lambda: len(list(pipeline.spool.glob("*.json"))) < 2000, 10)
        pipeline.spooler.kill()
        pipeline.spooler.start()
    wait_until(lambda: len(pipeline.stored()) >= 2000, 60,
               message=pipeline.spooler.log_tail())
    pipeline.wait_outbox_empty()
    payloads = Counter(p["n"] for p in _payloads(pipeline.db))
    assert payloads == Counter(range(2000))
    stored = pipeline.stored()
    assert max(stored.values()) == 1
    assert {s for _, _, s in stored} == set(range(1, 2001))


def test_a_broker_restart_with_persistence_loses_and_doubles_nothing(pipeline):
    pipeline.collector.start()
    pipeline.spooler.start()
    expected = pipeline.send([{"n": i} for i in range(1000)])
    pipeline.wait_stored(expected)
    pipeline.collector.stop()
    expected |= pipeline.send([{"n": i} for i in range(1000, 3000)])
    wait_until(lambda: pipeline.outbox_records() == 2000, 10)
    pipeline.broker.restart(keep_state=True)
    pipeline.collector.start()
    assert_exactly(pipeline.wait_stored(expected), expected)
    pipeline.wait_outbox_empty()


def test_an_outbox_emptied_by_receipts_and_refilled_reuses_no_seq(pipeline):
    pipeline.collector.start()
    pipeline.spooler.start()
    first = pipeline.send([{"n": i} for i in range(100)])
    pipeline.wait_stored(first)
    pipeline.wait_outbox_empty()
    pipeline.spooler.stop()
    pipeline.spooler.start()
    second = pipeline.send([{"n": i} for i in range(100, 200)])
    assert not first & second
    assert min(s for _, _, s in second) == 101
    expected = first | second
    assert_exactly(pipeline.wait_stored(expected), expected)


def test_the_edge_outbox_keeps_unconfirmed_records_until_a_receipt(tmp_path, broker,
                                                                  daemons):
    pipe = Pipeline(tmp_path, broker, daemons, "5")
    pipe.spooler.start()
    ids = pipe.send([{"n": i} for i in range(10)])
    wait_until(lambda: "connected to" in pipe.spooler.log_text(), 10)
    # Published, acked by the broker, but no collector: nothing is confirmed.
    import time

    time.sleep(1.0)
    assert pipe.outbox_records() == 10
    pipe.collector.start()
    pipe.wait_stored(ids)
    pipe.wait_outbox_empty()


def _payloads(db: Path) -> list:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM records")]
    finally:
        conn.close()


__all__ = ["decode_body"]

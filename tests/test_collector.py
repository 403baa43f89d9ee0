"""The collector against a real Mosquitto: stored once, confirmed, acked late.

Each test runs `python -m core.cli run` as a process, so that it can be
stopped with SIGTERM or killed with SIGKILL like the daemon it is, and an
edge's side of the wire is played by a plain MQTT client.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.envelope import WireRecord, decode_json, decode_receipt, encode_batch
from tests.harness.broker import Broker
from tests.harness.client import ProbeClient

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 15.0
POLL_S = 0.05
PROTOCOLS = pytest.mark.parametrize("protocol", ["5", "3.1.1"])


class CollectorProcess:
    """One `core-collector run` process at a time, logging to one file."""

    def __init__(self, tmp_path: Path, broker: Broker, protocol: str = "5"):
        self.tmp_path = tmp_path
        self.port = broker.port
        self.protocol = protocol
        self.db = tmp_path / "core.db"
        self.config = tmp_path / "core.yaml"
        self.log = tmp_path / "collector.log"
        self.process: subprocess.Popen | None = None
        self._log_start = 0

    def configure(self, *, client_id: str = "core-t", extra: str = "", **datastore):
        settings = {"url": f"sqlite:///{self.db}", **datastore}
        store = ", ".join(f"{key}: {value!r}" for key, value in settings.items())
        self.config.write_text(
            f"broker: {{port: {self.port}, protocol: {self.protocol!r}, "
            f"reconnect_min: 0.2, reconnect_max: 1.0}}\n"
            f"datastore: {{{store}}}\n"
            f"client_id: {client_id}\n{extra}"
        )

    def start(self, ready: str | None = "subscribed to|kept our session") -> None:
        if not self.config.exists():
            self.configure()
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "core.cli", "run", "-v", "-c", str(self.config)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if ready:
            self.wait_for_log(*ready.split("|"))

    def log_text(self) -> str:
        """What the current process logged."""
        return self.log.read_bytes()[self._log_start :].decode(errors="replace")

    def wait_for_log(self, *texts: str, count: int = 1) -> None:
        """Wait until one of `texts` was logged `count` times by this process."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            text = self.log_text()
            if any(text.count(t) >= count for t in texts):
                return
            if self.process.poll() is not None:
                break
            time.sleep(POLL_S)
        raise AssertionError(f"collector never logged {texts}:\n{self.log_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT_S)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT_S)

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill()

    def rows(self, sql: str) -> list[tuple]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def stored(self) -> list[tuple[str, int]]:
        return self.rows("SELECT epoch, seq FROM records ORDER BY epoch, seq")


class Edge:
    """An edge's side of the wire: publishes batches, gathers receipts."""

    def __init__(self, port: int, edge_id: str = "e1"):
        self.edge_id = edge_id
        self.client = ProbeClient(port, f"{edge_id}-probe", clean=True)
        self.client.connect()
        self.client.subscribe(f"spoolmq/{edge_id}/receipt", qos=1)

    def publish(self, seqs, *, epoch: str = "ep1", stream: str = "s") -> None:
        now = time.time()
        records = [WireRecord(seq, now, False, f'{{"n":{seq}}}') for seq in seqs]
        self.publish_raw(encode_batch(self.edge_id, epoch, stream, records), stream)

    def publish_raw(self, payload: bytes, stream: str = "s") -> None:
        self.client.publish(f"spoolmq/{self.edge_id}/data/{stream}", payload, qos=1)

    def receipts(self, wait_for: int = 0) -> list[dict]:
        """Receipts so far, waiting up to POLL_S for more than `wait_for`."""
        received = self.client.wait_for_messages(wait_for + 1, POLL_S)
        return [decode_receipt(m.payload) for m in received]

    def wait_confirmed(self, expected: set[tuple[str, int]], *, after: int = 0):
        """Wait until receipts after the first `after` ones cover `expected`."""
        deadline = time.monotonic() + WAIT_S
        covered: set[tuple[str, int]] = set()
        seen = 0
        while time.monotonic() < deadline:
            covered = set()
            receipts = self.receipts(wait_for=seen)
            seen = len(receipts)
            for receipt in receipts[after:]:
                for epoch, ranges in receipt.items():
                    covered |= {(epoch, s) for a, b in ranges for s in range(a, b + 1)}
            if expected <= covered:
                return covered
        raise AssertionError(
            f"receipts cover {sorted(covered)}, not {sorted(expected)}"
        )

    def close(self) -> None:
        self.client.disconnect()


def ids(epoch: str, seqs) -> set[tuple[str, int]]:
    return {(epoch, seq) for seq in seqs}


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


def retained(port: int, topic: str) -> dict:
    with ProbeClient(port, "retained-reader", clean=True) as reader:
        reader.subscribe(topic, qos=1)
        (message,) = reader.wait_for_messages(1)
    return decode_json(message.payload)


@pytest.fixture
def collector(tmp_path, broker, request):
    protocol = getattr(request, "param", "5")
    started = CollectorProcess(tmp_path, broker, protocol)
    yield started
    started.close()


@pytest.fixture
def edge(broker):
    connected = Edge(broker.port)
    yield connected
    connected.close()


@PROTOCOLS
def test_published_batches_are_stored_once_and_confirmed(tmp_path, broker, protocol):
    collector = CollectorProcess(tmp_path, broker, protocol)
    collector.start()
    edge = Edge(broker.port)
    try:
        edge.publish(range(1, 6))
        edge.publish(range(6, 11))
        edge.publish(range(1, 4), epoch="ep2")

        edge.wait_confirmed(ids("ep1", range(1, 11)) | ids("ep2", range(1, 4)))
        assert collector.stored() == sorted(
            ids("ep1", range(1, 11)) | ids("ep2", range(1, 4))
        )
        assert collector.stop() == 0
    finally:
        edge.close()
        collector.close()


def test_a_duplicate_message_is_confirmed_again_without_a_second_row(collector, edge):
    collector.start()
    edge.publish([1, 2, 3])
    edge.wait_confirmed(ids("ep1", [1, 2, 3]))
    before = len(edge.receipts())

    edge.publish([1, 2, 3])

    edge.wait_confirmed(ids("ep1", [1, 2, 3]), after=before)
    assert collector.rows("SELECT count(*) FROM records") == [(3,)]
    assert collector.rows("SELECT records FROM edges") == [(3,)]


def test_a_malformed_message_is_dead_lettered_and_collection_goes_on(collector, edge):
    collector.start()
    bad_record = encode_batch(
        "e1", "ep1", "s", [WireRecord(2, time.time(), False, '{"ok":1}')]
    ).replace(b'"seq":2,"created_at":"', b'"seq":2,"created_at":"x')

    edge.publish_raw(b"not an envelope")
    edge.publish_raw(bad_record)
    edge.publish([1, 3])

    edge.wait_confirmed(ids("ep1", [1, 2, 3]))
    assert collector.stored() == [("ep1", 1), ("ep1", 3)]
    letters = collector.rows("SELECT seq, raw FROM dead_letters ORDER BY id")
    assert letters[0] == (None, b"not an envelope")
    assert letters[1][0] == 2
    assert collector.process.poll() is None


@PROTOCOLS
def test_a_collector_killed_before_its_commit_stores_everything_once_on_restart(
    tmp_path, broker, protocol
):
    collector = CollectorProcess(tmp_path, broker, protocol)
    collector.configure(
        linger_ms=600000,
        batch_messages=1000,
        batch_records=100000,
        commit_when_idle=False,
    )
    collector.start()
    edge = Edge(broker.port)
    try:
        for first in range(1, 50, 10):
            edge.publish(range(first, first + 10))
        collector.wait_for_log("received mid", count=5)
        assert collector.stored() == []

        collector.kill()
        assert retained(broker.port, "spoolmq/_core/status/core-t")["online"] is False
        collector.configure()
        collector.start()

        edge.wait_confirmed(ids("ep1", range(1, 51)))
        assert collector.stored() == sorted(ids("ep1", range(1, 51)))
        assert collector.rows("SELECT records FROM edges") == [(50,)]
        assert "kept our session" in collector.log_text()
    finally:
        edge.close()
        collector.close()


def test_a_batch_is_committed_once_nothing_more_waits_not_after_its_linger(
    collector, edge
):
    collector.configure(linger_ms=600000, batch_messages=1000)
    collector.start()
    began = time.monotonic()
    edge.publish([1, 2])
    edge.wait_confirmed(ids("ep1", [1, 2]))
    assert time.monotonic() - began < 5  # the linger is ten minutes
    assert collector.stored() == [("ep1", 1), ("ep1", 2)]


def test_sigterm_commits_and_acks_what_is_pending_then_exits_0(collector, edge):
    collector.configure(linger_ms=600000, batch_messages=1000, commit_when_idle=False)
    collector.start()
    edge.publish([1, 2])
    collector.wait_for_log("received mid")

    assert collector.stop() == 0
    assert collector.stored() == [("ep1", 1), ("ep1", 2)]
    assert retained(collector.port, "spoolmq/_core/status/core-t")["online"] is False

    # Acked before the disconnect: the broker has nothing to redeliver.
    collector.configure()
    collector.start()
    time.sleep(0.5)
    assert collector.stop() == 0
    assert "stopped: 0 messages" in collector.log_text()


def test_messages_published_while_the_collector_is_away_arrive_on_its_return(
    collector, edge
):
    collector.start()
    assert collector.stop() == 0

    edge.publish([1, 2, 3])
    collector.start()

    edge.wait_confirmed(ids("ep1", [1, 2, 3]))
    assert collector.stored() == sorted(ids("ep1", [1, 2, 3]))


def test_a_broker_that_lost_its_state_gets_new_subscriptions_and_a_new_session_id(
    collector, broker
):
    collector.start()
    first = retained(broker.port, "spoolmq/_core/session")["session"]

    broker.restart(keep_state=False)
    collector.wait_for_log("has no session")
    collector.wait_for_log("subscribed to", count=2)
    edge = Edge(broker.port)
    try:
        edge.publish([7])
        edge.wait_confirmed(ids("ep1", [7]))
    finally:
        edge.close()

    assert collector.stored() == [("ep1", 7)]
    assert retained(broker.port, "spoolmq/_core/session")["session"] != first


def test_a_broker_down_at_start_is_waited_for(tmp_path, broker):
    broker.stop()
    collector = CollectorProcess(tmp_path, broker)
    try:
        collector.start(ready="retrying in")
        broker.start()
        collector.wait_for_log("subscribed to")
    finally:
        collector.close()


def test_a_share_group_member_receives_through_the_shared_subscription(collector, edge):
    collector.configure(extra="share_group: collectors\n")
    collector.start()

    edge.publish([1])

    edge.wait_confirmed(ids("ep1", [1]))
    assert "$share/collectors/spoolmq/+/data/+" in collector.log_text()


@PROTOCOLS
def test_an_authentication_refusal_exits_77_with_one_line(
    tmp_path, broker_factory, protocol
):
    broker = broker_factory(allow_anonymous=False)
    collector = CollectorProcess(tmp_path, broker, protocol)
    collector.start(ready=None)

    assert collector.process.wait(timeout=WAIT_S) == 77
    last = collector.log_text().strip().splitlines()[-1]
    assert last.startswith("core-collector: broker refused the connection")


@pytest.mark.slow
def test_a_commit_that_fails_is_retried_and_nothing_is_acked_meanwhile(collector, edge):
    collector.start()
    locker = sqlite3.connect(collector.db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        edge.publish([1, 2])
        collector.wait_for_log("commit failed")
        assert edge.receipts() == []

        # Killed while its commit fails: only an unacked message comes back.
        collector.kill()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    collector.start()

    edge.wait_confirmed(ids("ep1", [1, 2]))
    assert collector.stored() == [("ep1", 1), ("ep1", 2)]


def test_a_restart_with_other_topics_moves_the_kept_subscriptions(collector, edge):
    collector.start()
    assert collector.stop() == 0

    collector.configure(extra="share_group: collectors\n")
    collector.start(ready="subscribed to")
    edge.publish([1])

    edge.wait_confirmed(ids("ep1", [1]))
    assert "kept our session" in collector.log_text()
    assert "unsubscribing from spoolmq/+/data/+" in collector.log_text()
    time.sleep(0.3)  # a second copy, if the old subscription were left, arrives
    assert collector.stop() == 0
    assert "stopped: 1 messages" in collector.log_text()

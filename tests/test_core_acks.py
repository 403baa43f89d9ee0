"""Commit, then receipts, then acks in order, on the connection they belong to.

These tests drive the collector's paho callbacks with a recording stand-in
for the client, so the order of commits, receipts and PUBACKs is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from common.envelope import WireRecord, decode_receipt, encode_batch
from common.link import BrokerConfig
from core.collector import Collector, Link, receipt_parts
from core.config import CoreConfig, DatastoreConfig
from core.datastore import open_datastore
from core.errors import DatastoreError


@dataclass
class Message:
    mid: int
    topic: str
    payload: bytes
    qos: int = 1


class RecordingClient:
    """Stands in for paho's Client: records publishes and acks in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.calls.append(("publish", topic, payload))
        return SimpleNamespace(rc=mqtt.MQTT_ERR_SUCCESS, is_published=lambda: True)

    def ack(self, mid, qos):
        self.calls.append(("ack", mid))

    def acks(self) -> list[int]:
        return [call[1] for call in self.calls if call[0] == "ack"]

    def receipts(self) -> list[tuple[str, dict]]:
        return [
            (call[1], decode_receipt(call[2]))
            for call in self.calls
            if call[0] == "publish" and call[1].endswith("/receipt")
        ]


class FailingOnce:
    """A datastore whose first commit fails, as a full disk would."""

    def __init__(self, store):
        self.store_ = store
        self.failures = 1

    def store(self, items, received_at=None):
        if self.failures:
            self.failures -= 1
            raise DatastoreError("sqlite:///x", "commit failed: disk I/O error")
        return self.store_.store(items, received_at)

    def __getattr__(self, name):
        return getattr(self.store_, name)


@pytest.fixture
def store(tmp_path):
    opened = open_datastore(f"sqlite:///{tmp_path}/core.db")
    yield opened
    opened.close()


def make_collector(store, **datastore) -> Collector:
    datastore.setdefault("commit_when_idle", False)  # it has no socket
    cfg = CoreConfig(
        broker=BrokerConfig(port=1),
        datastore=DatastoreConfig(url="sqlite:///unused.db", **datastore),
        client_id="core-t",
    )
    collector = Collector(cfg, store)
    collector.client = RecordingClient()
    collector.link = Link.UP
    collector.generation = 1
    return collector


def batch(edge_id: str, *seqs: int) -> bytes:
    records = [WireRecord(seq, 1.0, False, "{}") for seq in seqs]
    return encode_batch(edge_id, "ep1", "s", records)


def deliver(collector: Collector, mid: int, edge_id: str, *seqs: int) -> None:
    message = Message(mid, f"spoolmq/{edge_id}/data/s", batch(edge_id, *seqs))
    collector._on_message(collector.client, None, message)


def test_acks_follow_the_commit_and_keep_the_order_received(store):
    collector = make_collector(store)
    deliver(collector, 7, "e1", 1, 2)
    deliver(collector, 3, "e2", 1)
    deliver(collector, 5, "e1", 3)

    assert collector.client.acks() == []
    collector._flush()

    assert collector.client.acks() == [7, 3, 5]
    assert store.totals()["records"] == 4


def test_one_receipt_per_edge_is_published_before_any_ack(store):
    collector = make_collector(store)
    deliver(collector, 1, "e1", 1, 2)
    deliver(collector, 2, "e2", 9)
    deliver(collector, 3, "e1", 2, 3)

    collector._flush()

    kinds = [call[0] for call in collector.client.calls]
    assert kinds == ["publish", "publish", "ack", "ack", "ack"]
    assert collector.client.receipts() == [
        ("spoolmq/e1/receipt", {"ep1": [(1, 3)]}),
        ("spoolmq/e2/receipt", {"ep1": [(9, 9)]}),
    ]


def test_messages_of_an_earlier_connection_are_stored_but_never_acked(store):
    collector = make_collector(store)
    deliver(collector, 1, "e1", 1)
    collector.generation = 2  # reconnected: packet id 1 now means another message
    deliver(collector, 1, "e1", 2)

    collector._flush()

    assert collector.client.acks() == [1]
    assert len(collector.client.acks()) == 1
    assert store.totals()["records"] == 2


def test_nothing_is_acked_or_confirmed_while_offline(store):
    collector = make_collector(store)
    deliver(collector, 1, "e1", 1)
    collector.link = Link.DOWN

    collector._flush()

    assert collector.client.calls == []
    assert store.totals()["records"] == 1


def test_a_failed_commit_acks_nothing_and_is_retried_later(store):
    collector = make_collector(FailingOnce(store))
    deliver(collector, 4, "e1", 1)

    collector._flush()

    assert collector.client.calls == []
    assert collector.store_retry_at > 0
    assert len(collector.pending.messages) == 1

    collector._flush()

    assert collector.client.acks() == [4]
    assert store.totals()["records"] == 1


def test_a_bad_message_is_acked_with_its_batch(store):
    collector = make_collector(store)
    deliver(collector, 1, "e1", 1)
    collector._on_message(None, None, Message(2, "spoolmq/e1/data/s", b"junk"))

    collector._flush()

    assert collector.client.acks() == [1, 2]
    assert store.totals()["dead_letters"] == 1


@pytest.mark.parametrize(
    ("settings", "messages", "due_now"),
    [
        ({"batch_messages": 2}, 2, True),
        ({"batch_messages": 3}, 2, False),
        ({"batch_records": 4}, 2, True),  # two messages of two records
    ],
)
def test_a_batch_is_due_when_full(store, settings, messages, due_now):
    collector = make_collector(store, linger_ms=60000, **settings)
    for mid in range(1, messages + 1):
        deliver(collector, mid, "e1", 2 * mid, 2 * mid + 1)

    deadline = collector.pending.deadline(collector.cfg.datastore)

    assert (deadline == 0.0) is due_now


def test_a_large_receipt_is_split_without_losing_an_id():
    parts = receipt_parts({"a": list(range(1, 15001)), "b": list(range(1, 8001))})

    assert len(parts) == 3
    assert all(sum(map(len, part.values())) <= 10000 for part in parts)
    joined = {(e, s) for part in parts for e, seqs in part.items() for s in seqs}
    assert len(joined) == 23000

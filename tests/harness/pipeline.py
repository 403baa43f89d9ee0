"""A whole pipeline for fault tests: edges, a broker, a collector, probes.

`Pipeline` puts one collector and any number of edges around a test broker,
each edge optionally behind its own `Proxy`, everything under one temporary
directory. Each `Edge` remembers the ids its producers were given, so a test
ends with `assert_exactly(pipeline.stored(), pipeline.expected())`.

`DataProbe` is a plain MQTT subscriber on the data and receipt topics: it
counts what the broker really forwarded (copies per record, records per
message, records published and not yet confirmed), which is a stronger check
than what a daemon says about itself. `Sampler` polls a value in a thread
(a state file, a process's RSS) for a bounded time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from common.envelope import decode_batch, decode_receipt
from common.errors import EnvelopeError
from edge.api import Producer
from edge.outbox import Outbox
from edge.state import read_state
from tests.harness.broker import Broker
from tests.harness.daemons import (
    DaemonSet,
    stored_ids,
    wait_until,
    write_core_config,
    write_edge_config,
)
from tests.harness.proxy import Proxy

log = logging.getLogger("tests.harness.pipeline")

PROTOCOLS = ["5", "3.1.1"]
PROBE_CONNECT_TIMEOUT_S = 5.0
SAMPLER_MAX_S = 600.0

RecordKey = tuple[str, str, int]


class Edge:
    """One edge: its config, outbox, spool directory, spooler and proxy."""

    def __init__(
        self, pipeline: Pipeline, edge_id: str, *, via_proxy: bool, **overrides: Any
    ) -> None:
        self.edge_id = edge_id
        self.dir = pipeline.tmp / edge_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "spool"
        self.outbox_path = self.dir / "outbox.db"
        self.status_path = Path(f"{self.outbox_path}.status.json")
        self.proxy = Proxy(pipeline.broker.port).start() if via_proxy else None
        port = self.proxy.port if self.proxy else pipeline.broker.port
        self.yaml = write_edge_config(
            self.dir / "edge.yaml",
            edge_id=edge_id,
            port=port,
            outbox=self.outbox_path,
            spools=[(self.spool, "readings")],
            protocol=pipeline.protocol,
            **overrides,
        )
        self.spooler = pipeline.daemons.spooler(
            self.yaml, self.dir, name=f"spooler-{edge_id}"
        )
        self.sent: set[RecordKey] = set()

    # --- producing -------------------------------------------------------

    def send(self, values: Iterable[Any], stream: str = "readings") -> set:
        """Accept records through the Python API; returns and keeps their ids."""
        with Producer(str(self.yaml)) as producer:
            ids = producer.send_many(stream, list(values))
        keys = {(i.edge_id, i.epoch, i.seq) for i in ids}
        self.sent |= keys
        return keys

    def send_count(self, count: int, *, chunk: int = 1000, tag: str = "n") -> set:
        """Accept `count` small records in commits of `chunk`."""
        keys: set = set()
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            keys |= self.send({tag: i, "v": i * 0.5} for i in range(start, stop))
        return keys

    def write_spool_files(self, values: Iterable[Any], prefix: str = "f") -> int:
        """Write each value as one spool file, the documented way; returns count."""
        self.spool.mkdir(parents=True, exist_ok=True)
        n = 0
        for i, value in enumerate(values):
            tmp = self.spool / f".{prefix}{i}.tmp"
            with open(tmp, "w") as f:
                json.dump(value, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.spool / f"{prefix}{i}.json")
            n += 1
        return n

    def spool_files_left(self) -> int:
        return len(list(self.spool.glob("*.json"))) if self.spool.exists() else 0

    # --- looking at the edge ---------------------------------------------

    def outbox_summary(self) -> dict:
        outbox = Outbox(self.outbox_path, self.edge_id)
        try:
            return {**outbox.summary(), "epoch": outbox.epoch}
        finally:
            outbox.close()

    def outbox_records(self) -> int:
        return self.outbox_summary()["records_waiting"]

    def issued_ids(self) -> set[RecordKey]:
        """Every id this outbox ever assigned: seqs 1 .. next_seq - 1.

        A rolled-back intake also rolls back the counter, so this is exactly
        the set of accepted records, spool files included.
        """
        summary = self.outbox_summary()
        return {
            (self.edge_id, summary["epoch"], s) for s in range(1, summary["next_seq"])
        }

    def state(self) -> dict:
        return read_state(self.status_path) or {}

    def rss_kib(self) -> int | None:
        return rss_kib(self.spooler.pid) if self.spooler.running else None

    def wait_started(self, timeout: float = 15.0) -> None:
        wait_for(
            lambda: f"edge {self.edge_id} started" in self.spooler.log_text(),
            timeout,
            describe=lambda: (
                f"{self.edge_id} did not start\n" + self.spooler.log_tail()
            ),
        )

    def wait_connected(self, count: int = 1, timeout: float = 15.0) -> None:
        wait_for(
            lambda: self.spooler.log_text().count("connected to ") >= count,
            timeout,
            describe=lambda: (
                f"{self.edge_id} did not connect\n" + self.spooler.log_tail()
            ),
        )

    def wait_unconfirmed(self, at_least: int, timeout: float = 20.0) -> dict:
        """Wait until the state file shows `at_least` records unconfirmed."""
        return wait_for(
            lambda: (s := self.state()).get("unconfirmed", 0) >= at_least and s,
            timeout,
            lambda: (
                f"{self.edge_id} never had {at_least} unconfirmed: "
                f"{self.state()}\n{self.spooler.log_tail()}"
            ),
        )

    def close(self) -> None:
        if self.proxy:
            self.proxy.close()


class Pipeline:
    """A collector and edges around one broker, all in `tmp`."""

    def __init__(
        self,
        tmp: Path,
        broker: Broker,
        daemons: DaemonSet,
        protocol: str,
        **core_overrides: Any,
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.daemons = daemons
        self.protocol = protocol
        self.db = tmp / "core.db"
        self.core_yaml = write_core_config(
            tmp / "core.yaml",
            port=broker.port,
            db_url=f"sqlite:///{self.db}",
            protocol=protocol,
            **core_overrides,
        )
        self.collector = daemons.collector(self.core_yaml, tmp)
        self.edges: list[Edge] = []

    def add_edge(
        self, edge_id: str = "e1", *, via_proxy: bool = False, **overrides: Any
    ) -> Edge:
        edge = Edge(self, edge_id, via_proxy=via_proxy, **overrides)
        self.edges.append(edge)
        return edge

    def start_collector(self, timeout: float = 15.0) -> None:
        """Start the collector and wait until it is connected and subscribed."""
        done = self.collector.log_text().count("connected to ")
        self.collector.start()
        wait_for(
            lambda: (
                self.collector.log_text().count("connected to ") > done
                and self._subscribed()
            ),
            timeout,
            self.tails,
        )

    def _subscribed(self) -> bool:
        text = self.collector.log_text()
        return "subscribed to" in text or "kept our session" in text

    def expected(self) -> set[RecordKey]:
        return set().union(*(edge.sent for edge in self.edges))

    def stored(self) -> collections.Counter:
        return stored_ids(self.db)

    def wait_stored(
        self, expected: set | None = None, timeout: float = 60.0
    ) -> collections.Counter:
        """Wait until every expected id is stored; return the stored counts."""
        expected = self.expected() if expected is None else expected
        wait_for(
            lambda: set(self.stored()) >= expected,
            timeout,
            lambda: (
                f"not all of {len(expected)} records stored: "
                f"{len(set(self.stored()) & expected)} are\n{self.tails()}"
            ),
        )
        return self.stored()

    def wait_outboxes_empty(self, timeout: float = 30.0) -> None:
        for edge in self.edges:
            wait_for(
                lambda e=edge: e.outbox_records() == 0,
                timeout,
                lambda e=edge: (
                    f"receipts did not empty {e.edge_id}'s outbox "
                    f"({e.outbox_records()} left)\n{self.tails()}"
                ),
            )

    def tails(self, lines: int = 15) -> str:
        parts = [f"--- collector\n{self.collector.log_tail(lines)}"]
        parts += [f"--- {e.edge_id}\n{e.spooler.log_tail(lines)}" for e in self.edges]
        parts.append(f"--- broker\n{self.broker.log_tail(lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        for edge in self.edges:
            edge.close()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    describe: Callable[[], str] = lambda: "",
    interval: float = 0.25,
) -> Any:
    """`wait_until`, with the failure message built when it fails, not before."""
    try:
        return wait_until(predicate, timeout, interval=interval)
    except AssertionError:
        raise AssertionError(f"not met within {timeout} s: {describe()}") from None


def assert_exactly(stored: collections.Counter, expected: set) -> None:
    """Every expected id stored, none twice, nothing else."""
    missing = expected - set(stored)
    doubled = {k for k, n in stored.items() if n > 1}
    extra = set(stored) - expected
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    assert not doubled, f"{len(doubled)} stored twice, e.g. {sorted(doubled)[:5]}"
    assert not extra, f"{len(extra)} unexpected, e.g. {sorted(extra)[:5]}"


class DataProbe:
    """Counts what the broker forwards on the data and receipt topics.

    `outstanding` per edge is the set of records seen on a data topic and
    not yet named by a receipt; the broker forwards an edge's publication to
    the probe before the collector can confirm it, and a receipt to the probe
    no later than to the edge, so its size is a lower bound of what the
    edge itself has unconfirmed. `max_outstanding` is its peak.
    """

    def __init__(
        self, port: int, prefix: str = "spoolmq", client_id: str = "fault-probe"
    ) -> None:
        self.port = port
        self.prefix = prefix
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.messages = 0
        self.max_records_per_message = 0
        self.copies: collections.Counter = collections.Counter()
        self.confirmed: set[RecordKey] = set()
        self.outstanding: dict[str, set[RecordKey]] = collections.defaultdict(set)
        self.max_outstanding: dict[str, int] = collections.defaultdict(int)
        self.malformed = 0
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: self._subscribed.set()

    def start(self) -> DataProbe:
        self._client.connect("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(PROBE_CONNECT_TIMEOUT_S):
            self.stop()
            raise AssertionError(f"probe not subscribed on port {self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> DataProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe(
            [(f"{self.prefix}/+/data/+", 1), (f"{self.prefix}/+/receipt", 1)]
        )

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic.endswith("/receipt"):
                self._receipt(msg.topic.split("/")[-2], msg.payload)
            else:
                self._data(decode_batch(msg.payload))
        except (EnvelopeError, KeyError, TypeError):
            with self._lock:
                self.malformed += 1

    def _data(self, batch) -> None:
        keys = [(batch.edge_id, batch.epoch, r["seq"]) for r in batch.records]
        with self._lock:
            self.messages += 1
            self.max_records_per_message = max(self.max_records_per_message, len(keys))
            self.copies.update(keys)
            waiting = self.outstanding[batch.edge_id]
            waiting.update(k for k in keys if k not in self.confirmed)
            self.max_outstanding[batch.edge_id] = max(
                self.max_outstanding[batch.edge_id], len(waiting)
            )

    def _receipt(self, edge_id: str, payload: bytes) -> None:
        with self._lock:
            waiting = self.outstanding[edge_id]
            for epoch, ranges in decode_receipt(payload).items():
                for first, last in ranges:
                    for seq in range(first, last + 1):
                        key = (edge_id, epoch, seq)
                        self.confirmed.add(key)
                        waiting.discard(key)

    def copies_of(self, keys: set) -> int:
        with self._lock:
            return sum(self.copies[k] for k in keys)

    def summary(self) -> dict:
        with self._lock:
            return {
                "messages": self.messages,
                "records": len(self.copies),
                "copies": sum(self.copies.values()),
                "max_records_per_message": self.max_records_per_message,
                "max_outstanding": dict(self.max_outstanding),
                "malformed": self.malformed,
            }


class Sampler:
    """Calls `fn` every `interval` s in a thread until stopped; keeps values."""

    def __init__(
        self, fn: Callable[[], Any], interval: float = 0.2, max_s: float = SAMPLER_MAX_S
    ) -> None:
        self.fn = fn
        self.interval = interval
        self.max_s = max_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples

    def values(self) -> list[Any]:
        return [v for _, v in list(self.samples) if v is not None]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        for _ in range(int(self.max_s / self.interval) + 1):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.fn()))
            self._stop.wait(self.interval)


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of a process in KiB, from /proc; None once it is gone."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) ")
_SENT = re.compile(r"Sending PUBLISH to (\S+) \(d(\d), q1, r\d, m(\d+),")
_PUBACK = re.compile(r"Received PUBACK from (\S+) \(Mid: (\d+)")


def puback_audit(broker_log: str, client_id: str) -> dict:
    """Check, from a broker log at log_type all, every PUBACK a client sent.

    Per connection of `client_id`: a PUBACK must name a packet id the broker
    sent that client on that same connection and that is still unacked.
    Returns counts and the violations found (none is the good answer).
    """
    outstanding: set[int] = set()
    connections = sent = redelivered = acked = 0
    violations: list[str] = []
    for line in broker_log.splitlines():
        if (m := _CONNECTED.search(line)) and m.group(1) == client_id:
            connections += 1
            outstanding = set()
        elif (m := _SENT.search(line)) and m.group(1) == client_id:
            sent += 1
            redelivered += m.group(2) == "1"
            outstanding.add(int(m.group(3)))
        elif (m := _PUBACK.search(line)) and m.group(1) == client_id:
            acked += 1
            mid = int(m.group(2))
            if mid not in outstanding:
                violations.append(
                    f"connection {connections}: PUBACK for mid {mid}, "
                    "not sent on this connection or acked already"
                )
            outstanding.discard(mid)
    return {
        "connections": connections,
        "sent": sent,
        "redelivered": redelivered,
        "acked": acked,
        "violations": violations,
    }


def pubacks_from(broker_log: str, client_id: str) -> int:
    return sum(1 for m in _PUBACK.finditer(broker_log) if m.group(1) == client_id)


@contextlib.contextmanager
def datastore_locked(db: Path):
    """Hold the datastore's write lock, so no collector commit can happen."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()

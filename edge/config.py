"""The edge's config: every default in these dataclasses, validated on load."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import check_positive, load_dataclass, read_yaml
from common.errors import ConfigError
from common.link import BrokerConfig
from common.topics import name_problem
from edge.outbox import Limits

# Host names a system ships with; an edge id must tell edges apart.
FACTORY_HOSTNAMES = {"raspberrypi", "localhost", "debian", "ubuntu", "dietpi", "pi"}


WHEN_FULL = ("reject", "drop_oldest")


MIN_BATCH_BYTES = 1024  # a batch smaller than this carries little but overhead

@dataclass(frozen=True)
class OutboxConfig:
    path: str = "/var/lib/spoolmq/outbox.db"
    # Limits of what waits (0: none). When reached, streams whose when_full
    # is drop_oldest lose their oldest records first; the rest are refused.
    max_records: int = 0
    max_bytes: int = 1024**3
    when_full: Literal["reject", "drop_oldest"] = "reject"
    # Records per outbox segment (one row); a receipt deletes whole segments.
    segment_records: int = 1000
    segment_bytes: int = 262144

    def validate(self, path: str) -> None:
        check_positive(path, "max_records", self.max_records, zero_ok=True)
        check_positive(path, "max_bytes", self.max_bytes, zero_ok=True)
        check_positive(path, "segment_records", self.segment_records)
        check_positive(path, "segment_bytes", self.segment_bytes)

    @property
    def status_path(self) -> Path:
        return Path(self.path + ".status.json")


@dataclass(frozen=True)
class SpoolConfig:
    dir: str
    stream: str
    max_file_bytes: int = 16 * 1024 * 1024

    def validate(self, path: str) -> None:
        problem = name_problem(self.stream)
        if problem:
            raise ConfigError(f"{path}.stream", f"{self.stream!r} {problem}")
        check_positive(path, "max_file_bytes", self.max_file_bytes)


@dataclass(frozen=True)
class PublishConfig:
    # W: records published and not yet confirmed by a receipt, at most.
    window: int = 20000
    batch_records: int = 500
    batch_bytes: int = 262144
    linger_ms: int = 50
    codec: str = "json"
    # Unconfirmed records are sent again after resend_initial seconds, then
    # with doubling delays up to resend_max.
    resend_initial: float = 30.0
    resend_max: float = 600.0
    # status exits 75 when a record has waited unconfirmed longer than this.
    degraded_after: float = 900.0
    # Caps on publishing (0: none), so that draining a backlog leaves room
    # for live data and other traffic on a thin link.
    max_records_per_s: float = 0.0
    max_bytes_per_s: float = 0.0

    def validate(self, path: str) -> None:
        for name in ("window", "batch_records", "batch_bytes", "resend_initial"):
            check_positive(path, name, getattr(self, name))
        check_positive(path, "linger_ms", self.linger_ms, zero_ok=True)
        check_positive(path, "max_records_per_s", self.max_records_per_s,
                       zero_ok=True)
        check_positive(path, "max_bytes_per_s", self.max_bytes_per_s, zero_ok=True)
        if self.batch_bytes < MIN_BATCH_BYTES:
            raise ConfigError(
                f"{path}.batch_bytes", f"must be at least {MIN_BATCH_BYTES}"
            )
        if self.batch_records > self.window:
            raise ConfigError(f"{path}.batch_records", "must not exceed window")
        if self.resend_max < self.resend_initial:
            raise ConfigError(f"{path}.resend_max", "must be >= resend_initial")
        if self.codec not in ("json", "json+zlib"):
            raise ConfigError(
                f"{path}.codec", f"must be 'json' or 'json+zlib', not {self.codec!r}"
            )


@dataclass(frozen=True)
class IntakeConfig:
    scan_interval: float = 0.5
    # One outbox transaction takes at most this many files.
    batch_files: int = 1000

    def validate(self, path: str) -> None:
        check_positive(path, "scan_interval", self.scan_interval)
        check_positive(path, "batch_files", self.batch_files)


@dataclass(frozen=True)
class StreamConfig:
    """Per-stream settings, under `streams:` keyed by stream name."""

    when_full: Literal["reject", "drop_oldest"] | None = None  # outbox's
    # Higher goes first after an outage (within a batch's worth).
    priority: int = 0
    # Seconds a record may wait before it is dropped as expired (0: forever).
    ttl: float = 0.0

    def validate(self, path: str) -> None:
        check_positive(path, "ttl", self.ttl, zero_ok=True)


@dataclass(frozen=True)
class EdgeConfig:
    edge_id: str = ""
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    spool: list[SpoolConfig] = field(default_factory=list)
    topic_prefix: str = "spoolmq"
    publish: PublishConfig = field(default_factory=PublishConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    streams: dict[str, StreamConfig] = field(default_factory=dict)

    @property
    def max_record_bytes(self) -> int:
        """The largest payload that fits one message the broker accepts.

        1 KiB covers the envelope: header, edge id, epoch, a stream name of
        64 characters and one record's seq, time and flag.
        """
        return self.broker.max_message_bytes - 1024

    def priorities(self) -> dict[str, int]:
        return {name: sc.priority for name, sc in self.streams.items() if sc.priority}

    def ttls(self) -> dict[str, float]:
        return {name: sc.ttl for name, sc in self.streams.items() if sc.ttl}

    def when_full(self, stream: str) -> str:
        override = self.streams.get(stream)
        if override is not None and override.when_full:
            return override.when_full
        return self.outbox.when_full

    def limits(self) -> Limits:
        """The outbox limits, and which known streams may be dropped."""
        # Streams without an override (those only `send` uses, say) follow
        # the outbox's when_full.
        default_drop = self.outbox.when_full == "drop_oldest"
        flip = {name for name, sc in self.streams.items()
                if sc.when_full and (sc.when_full == "drop_oldest") != default_drop}
        return Limits(self.outbox.max_records, self.outbox.max_bytes,
                      default_drop, frozenset(flip))

    def validate(self, path: str) -> None:
        edge_id = self.edge_id or socket.gethostname()
        if edge_id.lower().split(".")[0] in FACTORY_HOSTNAMES:
            where = "set in the config" if self.edge_id else "the host name"
            raise ConfigError(
                "edge_id",
                f"{edge_id!r} ({where}) is a factory default shared by many hosts; "
                "set edge_id to a name unique to this edge",
            )
        problem = name_problem(edge_id)
        if problem:
            raise ConfigError("edge_id", f"{edge_id!r} {problem}")
        object.__setattr__(self, "edge_id", edge_id)
        for part in self.topic_prefix.split("/"):
            if name_problem(part):
                raise ConfigError("topic_prefix", f"{self.topic_prefix!r} is invalid")
        for name in self.streams:
            problem = name_problem(name)
            if problem:
                raise ConfigError(f"streams.{name}", f"stream name {name!r} {problem}")
        dirs = [str(Path(s.dir).resolve()) for s in self.spool]
        for i, d in enumerate(dirs):
            if d in dirs[:i]:
                raise ConfigError(f"spool[{i}].dir", f"{d} is listed twice")


def load_edge_config(path: str) -> EdgeConfig:
    """Read and validate an edge.yaml; ConfigError names the key."""
    return load_dataclass(EdgeConfig, read_yaml(path))

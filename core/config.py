"""The core-collector's config: frozen dataclasses whose defaults are the defaults.

`load_core_config` reads `core.yaml` into `CoreConfig`. Every check names the
dotted key it refuses and the values it would accept.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from common.config import check_positive, load_dataclass, read_yaml
from common.errors import ConfigError
from common.link import BrokerConfig
from common.topics import name_problem
from core.datastore import url_problem

# MQTT 5 caps Receive Maximum at 65535, and batch_messages is sent as it.
MAX_BATCH_MESSAGES = 65535


def default_client_id() -> str:
    """`core-<hostname>`, the client id used when the config names none."""
    return f"core-{socket.gethostname().split('.')[0]}"


@dataclass(frozen=True)
class DatastoreConfig:
    url: str = "sqlite:////var/lib/spoolmq/core.db"
    # A batch is committed when it holds this many messages or records, when
    # its first message has waited linger_ms, or (commit_when_idle) as soon
    # as nothing more is waiting to be read.
    batch_messages: int = 200
    batch_records: int = 20000
    linger_ms: int = 50
    commit_when_idle: bool = True

    def validate(self, path: str) -> None:
        where = f"{path}." if path else ""
        problem = url_problem(self.url)
        if problem:
            raise ConfigError(f"{where}url", problem)
        check_positive(path, "batch_messages", self.batch_messages)
        if self.batch_messages > MAX_BATCH_MESSAGES:
            raise ConfigError(
                f"{where}batch_messages", f"must be at most {MAX_BATCH_MESSAGES}"
            )
        check_positive(path, "batch_records", self.batch_records)
        check_positive(path, "linger_ms", self.linger_ms, zero_ok=True)


@dataclass(frozen=True)
class StatusConfig:
    # `status` calls an edge silent when nothing came from it for this many
    # seconds, and then exits 75 (degraded); 0 turns the check off, since a
    # retired edge would otherwise keep the core degraded forever.
    silent_after: int = 0

    def validate(self, path: str) -> None:
        check_positive(path, "silent_after", self.silent_after, zero_ok=True)


@dataclass(frozen=True)
class CoreConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    client_id: str = field(default_factory=default_client_id)
    share_group: str | None = None
    topic_prefix: str = "spoolmq"
    status: StatusConfig = field(default_factory=StatusConfig)

    def validate(self, path: str) -> None:
        problem = name_problem(self.client_id)
        if problem:
            raise ConfigError("client_id", f"{problem}; set client_id explicitly")
        if self.share_group is not None:
            problem = name_problem(self.share_group)
            if problem:
                raise ConfigError("share_group", problem)
        for level in self.topic_prefix.split("/"):
            problem = name_problem(level)
            if problem:
                raise ConfigError("topic_prefix", f"each level {problem}")


def load_core_config(path: str) -> CoreConfig:
    """The validated config of file `path`; ConfigError names what is wrong."""
    data = read_yaml(path)

    # Collectors of one share group need stable ids that differ: the broker
    # hands an absent member's unacked messages back to that same id only.
    if data.get("share_group") is not None and "client_id" not in data:
        raise ConfigError(
            "client_id",
            "is required when share_group is set: give each collector of the "
            "group its own stable id",
        )
    return load_dataclass(CoreConfig, data)

"""The producers' Python API: accept records straight into the outbox.

    from edge.api import Producer

    with Producer("/etc/spoolmq/edge.yaml") as producer:
        ids = producer.send("readings", {"temperature": 21.5})
        ids = producer.send_many("readings", [{"t": 1}, {"t": 2}])

A record is accepted when `send` returns: it is committed to the outbox on
disk, whether or not the daemon runs or the broker is reachable. Safe to use
from several processes at once, beside the running daemon.
"""

from __future__ import annotations

from typing import Any, Iterable

from common.topics import name_problem
from edge.config import EdgeConfig, load_edge_config
from edge.errors import RecordError
from edge.outbox import Outbox, RecordId
from common.envelope import loads_strict
from edge.records import MAX_DEPTH, compact, make_records, nesting_depth


class Producer:
    """Accepts records of any stream into the outbox named by the config."""

    def __init__(self, config: str | EdgeConfig):
        self.cfg = load_edge_config(config) if isinstance(config, str) else config
        self.outbox = Outbox(self.cfg.outbox.path, self.cfg.edge_id)
        self.outbox.priorities = self.cfg.priorities()

    def send(self, stream: str, value: Any) -> list[RecordId]:
        """Accept one JSON-serialisable value as one record."""
        return self.send_many(stream, [value])

    def send_many(self, stream: str, values: Iterable[Any]) -> list[RecordId]:
        """Accept several values as records, all or none, in one commit."""
        try:
            payloads = [compact(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise RecordError(f"value is not JSON-serialisable: {exc}") from None
        for p in payloads:
            if p.count("[") + p.count("{") > MAX_DEPTH and nesting_depth(
                    loads_strict(p)) > MAX_DEPTH:
                raise RecordError(f"a value nests deeper than {MAX_DEPTH} levels")
        return self.send_json(stream, payloads)

    def send_json(self, stream: str, payloads: list[str]) -> list[RecordId]:
        """Accept records given as compact JSON text (already validated)."""
        problem = name_problem(stream)
        if problem:
            raise RecordError(f"stream {stream!r} {problem}")
        if not payloads:
            raise RecordError("no records to send")
        self._check_sizes(stream, payloads)
        return self.outbox.accept(
            make_records(stream, payloads),
            segment_records=self.cfg.outbox.segment_records,
            segment_bytes=self.cfg.outbox.segment_bytes,
            limits=self.cfg.limits(),
        )

    def _check_sizes(self, stream: str, payloads: list[str]) -> None:
        limit = self.cfg.max_record_bytes
        for i, p in enumerate(payloads):
            size = len(p.encode())
            if size > limit:
                which = f"record {i + 1}" if len(payloads) > 1 else "record"
                raise RecordError(
                    f"{which} is {size} bytes, over the limit of {limit} that the "
                    f"broker accepts (broker.max_message_bytes); nothing was sent")

    def close(self) -> None:
        self.outbox.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

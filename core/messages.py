"""What a received message becomes: records to store, or dead letters.

Bad input never fails its neighbours. A message that does not decode becomes
one dead letter holding its raw bytes. A bad record inside a good batch
becomes a dead letter of its own, with its identity when it has one, so that
the edge is sent a receipt for it and stops resending it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import UTC
from typing import Any

import orjson

from common.envelope import (
    Batch,
    decode_batch,
    decode_json,
    decode_skipped,
    is_finite_json,
    parse_time,
    record_problem,
)
from common.errors import EnvelopeError
from common.topics import Topics, name_problem
from core.datastore import DeadLetter, EdgeStatus, Item, Record, Skipped

log = logging.getLogger("core.messages")

# The largest seq a signed 64-bit column (SQLite INTEGER, PostgreSQL bigint)
# holds; a larger one would fail the whole batch's insert.
MAX_SEQ = 2**63 - 1

_UTC_MILLIS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")

Refusal = Callable[[Record], str | None]


def decode_message(
    topic: str, payload: bytes, topics: Topics, refusal: Refusal | None = None
) -> list[Item]:
    """The items one message holds; never raises for bad input."""
    try:
        return _decode(topic, payload, topics, refusal)
    except Exception as exc:
        # A message that trips a bug here would otherwise be redelivered and
        # crash the collector again at every start; keep it, keep going.
        log.exception("cannot decode message on %s; dead-lettered", topic)
        return [DeadLetter(topic, f"internal error while decoding: {exc}", payload)]


def _decode(
    topic: str, payload: bytes, topics: Topics, refusal: Refusal | None
) -> list[Item]:
    try:
        edge_id, kind, stream = topics.parse(topic)
    except ValueError as exc:
        return [DeadLetter(topic, str(exc), payload)]
    problem = name_problem(edge_id)
    if problem:
        return [DeadLetter(topic, f"edge id in the topic {problem}", payload)]
    if kind == "data":
        return _decode_data(topic, payload, edge_id, stream, refusal)
    if kind == "skipped":
        return _decode_skipped(topic, payload, edge_id)
    if kind == "status":
        return _decode_status(topic, payload, edge_id)
    return [DeadLetter(topic, f"no message kind {kind!r} is read", payload, edge_id)]


def _decode_data(
    topic: str, payload: bytes, edge_id: str, stream: str, refusal: Refusal | None
) -> list[Item]:
    try:
        batch = decode_batch(payload)
    except EnvelopeError as exc:
        return [DeadLetter(topic, str(exc), payload, edge_id)]
    problem = _batch_problem(batch, edge_id, stream)
    if problem:
        return [DeadLetter(topic, problem, payload, edge_id)]
    return [_record_item(topic, batch, raw, refusal) for raw in batch.records]


def _decode_skipped(topic: str, payload: bytes, edge_id: str) -> list[Item]:
    try:
        body = decode_skipped(payload)
    except EnvelopeError as exc:
        return [DeadLetter(topic, str(exc), payload, edge_id)]
    for what in ("epoch", "stream"):
        problem = name_problem(body[what])
        if problem:
            return [DeadLetter(topic, f"skipped {what} {problem}", payload, edge_id)]
    if any(last > MAX_SEQ for _, last in body["ranges"]):
        return [
            DeadLetter(
                topic, f"a skipped seq is larger than {MAX_SEQ}", payload, edge_id
            )
        ]
    log.info(
        "edge %s skipped %d records of %s: %s",
        edge_id,
        sum(b - a + 1 for a, b in body["ranges"]),
        body["stream"],
        body["reason"],
    )
    return [
        Skipped(
            edge_id, body["epoch"], body["stream"], first, last, body["reason"][:500]
        )
        for first, last in body["ranges"]
    ]


def _batch_problem(batch: Batch, edge_id: str, stream: str) -> str | None:
    # The broker's ACL ties a topic to one edge; a batch claiming another
    # edge's identity is refused rather than stored under either.
    if batch.edge_id != edge_id:
        return f"batch names edge {batch.edge_id!r} but its topic edge {edge_id!r}"
    if batch.stream != stream:
        return f"batch names stream {batch.stream!r} but its topic {stream!r}"
    for what, value in (("epoch", batch.epoch), ("stream", batch.stream)):
        problem = name_problem(value)
        if problem:
            return f"batch {what} {problem}"
    return None


def _record_item(topic: str, batch: Batch, raw: Any, refusal: Refusal | None) -> Item:
    problem = record_problem(raw) or _value_problem(raw, batch.finite)
    if problem:
        return _bad_record(topic, batch, raw, problem)
    try:
        created_at = _normal_utc(raw["created_at"])  # record_problem parsed it
    except (ValueError, OverflowError) as exc:
        return _bad_record(topic, batch, raw, f"'created_at' is unusable: {exc}")
    record = Record(
        edge_id=batch.edge_id,
        epoch=batch.epoch,
        seq=raw["seq"],
        stream=batch.stream,
        created_at=created_at,
        clock_unsynced=raw.get("clock_unsynced", False),
        payload=payload_text(raw["payload"]),
    )
    problem = refusal(record) if refusal else None
    if problem:
        return _bad_record(topic, batch, raw, problem)
    return record


def _value_problem(raw: dict, finite: bool) -> str | None:
    if raw["seq"] > MAX_SEQ:
        return f"'seq' is larger than {MAX_SEQ}"
    if not finite and not is_finite_json(raw["payload"]):
        return "'payload' holds a number too large for a double"
    return None


def _bad_record(topic: str, batch: Batch, raw: Any, reason: str) -> DeadLetter:
    seq = raw.get("seq") if isinstance(raw, dict) else None
    known = isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= MAX_SEQ
    text = json.dumps(raw, separators=(",", ":"), default=repr)
    return DeadLetter(
        topic,
        f"seq {seq}: {reason}" if known else reason,
        text.encode(),
        batch.edge_id,
        batch.epoch if known else None,
        seq if known else None,
    )


def utc_text(text: str) -> str:
    """RFC 3339 text normalised to UTC with milliseconds, so text sorts as time."""
    parse_time(text)  # a real date and time of day, with a zone
    return _normal_utc(text)


def _normal_utc(text: str) -> str:
    """utc_text of text already known to parse."""
    if _UTC_MILLIS.fullmatch(text):
        return text  # the form edges send, already normal
    value = parse_time(text).astimezone(UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload_text(value: Any) -> str:
    """A payload as compact JSON text, non-ASCII kept as it is."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        pass  # an integer past 64 bits, or a lone surrogate
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (legal as a JSON escape) has no UTF-8 form; the
        # escaped form is the same JSON value.
        text = json.dumps(value, separators=(",", ":"))
    return text


def _decode_status(topic: str, payload: bytes, edge_id: str) -> list[Item]:
    """An edge's birth or last will; an empty payload clears a retained one."""
    if not payload:
        return []
    try:
        body = decode_json(payload)
    except EnvelopeError as exc:
        return [DeadLetter(topic, f"status: {exc}", payload, edge_id)]
    online = body.get("online") if isinstance(body, dict) else None
    if not isinstance(online, bool):
        reason = "status must be an object with a boolean 'online'"
        return [DeadLetter(topic, reason, payload, edge_id)]
    reported = body.get("ts")
    log.info("edge %s status: online=%s (ts %s)", edge_id, online, reported)
    return [EdgeStatus(edge_id, online, str(reported)[:64] if reported else None)]

"""Turning producer input into records: strict JSON, compact, timestamped."""

from __future__ import annotations

import json
import time

from common.envelope import loads_strict
from common.errors import EnvelopeError
from edge.errors import RecordError
from edge.outbox import Record

# A wall clock before this instant has not been set: a host without a
# real-time clock boots in 1970 and steps forward once it reaches NTP.
CLOCK_FLOOR = 1767225600.0  # 2026-01-01T00:00:00Z


def clock_unsynced(ts: float) -> bool:
    return ts < CLOCK_FLOOR


def compact(value) -> str:
    """Compact JSON text of a parsed value: no tab or newline survives."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def parse_value(data: bytes, what: str = "input") -> str:
    """One JSON value from bytes, as compact text; RecordError when not JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise RecordError(f"{what} is empty")
    try:
        return compact(loads_strict(text))
    except EnvelopeError as exc:
        raise RecordError(f"{what} is not valid JSON: {_reason(exc)}") from None


def parse_lines(data: bytes, what: str = "input") -> list[str]:
    """One JSON value per non-blank line; RecordError names the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecordError(f"{what} line {line} is not valid UTF-8") from None
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(compact(loads_strict(line)))
        except EnvelopeError as exc:
            raise RecordError(
                f"{what} line {number} is not valid JSON: {_reason(exc)}"
            ) from None
    if not out:
        raise RecordError(f"{what} holds no records")
    return out


def _reason(exc: Exception) -> str:
    return str(exc).removeprefix("body is not JSON: ")


def make_records(stream: str, payloads: list[str], created_at: float | None = None):
    """Records of one stream stamped with the edge clock (or a given time)."""
    ts = time.time() if created_at is None else created_at
    unsynced = clock_unsynced(ts)
    return [Record(stream, p, ts, unsynced) for p in payloads]

"""Turning producer input into records: strict JSON, compact, timestamped."""

from __future__ import annotations

import json
import time

import orjson

from common.envelope import loads_strict
from common.errors import EnvelopeError
from edge.errors import RecordError
from edge.outbox import CLOCK_FLOOR, Record

# Types the standard library refuses go to `default` (none: an error) rather
# than being written in orjson's own way.
_ORJSON_STRICT = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def clock_unsynced(ts: float) -> bool:
    return ts < CLOCK_FLOOR


def compact(value) -> str:
    """See `_compact`; a value nested too deeply for json is a ValueError."""
    try:
        return _compact(value)
    except RecursionError:
        raise ValueError("value nests too deeply to encode") from None


def _compact(value) -> str:
    """Compact JSON text of a parsed value: no tab or newline survives.

    ValueError for what JSON text in UTF-8 cannot carry: a float out of range
    (`1e999` parses as inf) or a lone surrogate (`"\\ud800"` is no character).

    orjson writes it several times faster, but writes NaN and infinities as
    null and takes types the standard library refuses; so its text is kept
    only when it holds no null, and everything else is written again by the
    standard library, which decides. (It also writes a UUID or an Enum as
    its value, where the standard library refuses them.)
    """
    try:
        data = orjson.dumps(value, option=_ORJSON_STRICT)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"null" not in data:
            return data.decode()
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"a string holds a lone surrogate U+{ord(text[exc.start]):04X}, "
                "which is not a Unicode character") from None
    return text


def parse_value(data: bytes, what: str = "input") -> str:
    """One JSON value from bytes, as compact text; RecordError when not JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise RecordError(f"{what} is empty")
    return _parse(text, what)


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
        out.append(_parse(line, f"{what} line {number}"))
    if not out:
        raise RecordError(f"{what} holds no records")
    return out


# Deeper JSON would overflow the core's parser once wrapped in a batch, and
# fail that whole batch there; no sensor record needs so many levels.
MAX_DEPTH = 64


def nesting_depth(value) -> int:
    """How deeply lists and objects nest in a parsed value (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _parse(text: str, what: str) -> str:
    try:
        value = loads_strict(text)
        if nesting_depth(value) > MAX_DEPTH:
            raise RecordError(f"{what} nests deeper than {MAX_DEPTH} levels")
        return compact(value)
    except EnvelopeError as exc:
        raise RecordError(f"{what} is not valid JSON: {_reason(exc)}") from None
    except ValueError as exc:  # parsed, but not JSON that UTF-8 text can carry
        raise RecordError(f"{what} cannot be accepted: {exc}") from None


def _reason(exc: Exception) -> str:
    return str(exc).removeprefix("body is not JSON: ")


def make_records(stream: str, payloads: list[str], created_at: float | None = None):
    """Records of one stream stamped with the edge clock (or a given time)."""
    ts = time.time() if created_at is None else created_at
    unsynced = clock_unsynced(ts)
    return [Record(stream, p, ts, unsynced) for p in payloads]

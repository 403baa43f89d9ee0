"""The wire envelope: every spoolmq message is a header line and a body.

    spoolmq/1 json\n{...}          the body is UTF-8 JSON
    spoolmq/1 json+zlib\n<bytes>   the body is zlib-compressed UTF-8 JSON

`1` is the envelope version; the codec is named, never guessed. What the body
means follows from the topic: a record batch on `.../data/<stream>`, a receipt
on `.../receipt`, and so on. The README documents every body.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Iterable

import orjson

from common.errors import EnvelopeError

VERSION = 1
CODECS = ("json", "json+zlib")
_MAGIC = b"spoolmq/"
_HEADER_MAX = 64
MAX_BODY_BYTES = 64 * 1024 * 1024
# Every byte to b" " but digits to b"0": a run of 19 digits is then a plain
# substring search, many times faster than a regular expression.
_DIGITS_TO_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_DIGITS = b"0" * 19


@dataclass(frozen=True, slots=True)
class WireRecord:
    """One record as it travels: identity, edge clock, and JSON payload text."""

    seq: int
    created_at: float
    clock_unsynced: bool
    payload: str


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded data message: records of one edge, epoch and stream."""

    edge_id: str
    epoch: str
    stream: str
    records: list[dict]
    finite: bool = False  # known to hold no infinity (else check each record)


def format_time(ts: float) -> str:
    """Seconds since the Unix epoch as RFC 3339 UTC with milliseconds."""
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """RFC 3339 text back to an aware datetime; ValueError when malformed."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return value


def wrap(body: bytes, codec: str = "json") -> bytes:
    """Header line plus body, compressing the body when the codec says so."""
    if codec == "json+zlib":
        body = zlib.compress(body, 6)
    elif codec != "json":
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return b"%s%d %s\n%s" % (_MAGIC, VERSION, codec.encode(), body)


def unwrap(data: bytes) -> bytes:
    """The JSON body of a message, after checking version and codec."""
    end = data.find(b"\n", 0, _HEADER_MAX)
    if not data.startswith(_MAGIC) or end < 0:
        raise EnvelopeError("not a spoolmq message (no 'spoolmq/<version>' header)")
    try:
        version_text, codec = data[len(_MAGIC) : end].decode("ascii").split(" ", 1)
        version = int(version_text)
    except (UnicodeDecodeError, ValueError):
        raise EnvelopeError("malformed spoolmq header line") from None
    if version != VERSION:
        raise EnvelopeError(f"unknown envelope version {version}; this build reads 1")
    body = data[end + 1 :]
    if codec == "json":
        return body
    if codec == "json+zlib":
        # Capped: a small message must not expand into gigabytes at the core.
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(body, MAX_BODY_BYTES)
        except zlib.error as exc:
            raise EnvelopeError(f"body does not decompress: {exc}") from None
        if inflater.unconsumed_tail:
            raise EnvelopeError(f"body expands past {MAX_BODY_BYTES} bytes")
        return text
    raise EnvelopeError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def encode_json(obj: Any, codec: str = "json") -> bytes:
    """A small message (receipt, status, ...) in the envelope."""
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return wrap(body, codec)


def decode_json(data: bytes) -> Any:
    """The body of a small message, parsed; EnvelopeError when it is not JSON."""
    return loads_strict(unwrap(data))


def loads_strict(text: bytes | str) -> Any:
    """JSON text to Python values, refusing NaN and Infinity (not JSON)."""
    return _loads(text)[0]


def _loads(text: bytes | str) -> tuple[Any, bool]:
    """The value, and whether it is known to hold only finite numbers.

    orjson reads most input several times faster than the standard library
    and refuses NaN, infinities and numbers that overflow a double. What it
    refuses, and integers too long for 64 bits (which it would turn into
    floats; any run of 19 digits is taken for one), is left to the standard
    library, which keeps such integers exact and has the last word on what
    is not JSON.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_DIGITS not in data.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass
    return _loads_stdlib(text), False


def _loads_stdlib(text: bytes | str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"body is not JSON: {exc}") from None
    except RecursionError:
        # Deep nesting such as 100,000 '[' is valid input to refuse, not a crash.
        raise EnvelopeError("body is JSON nested too deeply to read") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def encode_batch(
    edge_id: str,
    epoch: str,
    stream: str,
    records: Iterable[WireRecord],
    codec: str = "json",
) -> bytes:
    """A data message; payloads are spliced in as the JSON text they are."""
    parts = [
        '{"edge_id":%s,"epoch":%s,"stream":%s,"records":['
        % (json.dumps(edge_id), json.dumps(epoch), json.dumps(stream))
    ]
    sep = ""
    stamp_of, stamp = None, ""  # records accepted together share a time
    for rec in records:
        if rec.created_at != stamp_of:
            stamp_of, stamp = rec.created_at, format_time(rec.created_at)
        unsynced = "true" if rec.clock_unsynced else "false"
        parts.append(
            '%s{"seq":%d,"created_at":"%s","clock_unsynced":%s,"payload":%s}'
            % (sep, rec.seq, stamp, unsynced, rec.payload)
        )
        sep = ","
    parts.append("]}")
    return wrap("".join(parts).encode(), codec)


def batch_overhead(edge_id: str, epoch: str, stream: str) -> int:
    """Bytes of a batch message besides its records, for size limits."""
    return len(encode_batch(edge_id, epoch, stream, []))



def decode_batch(data: bytes) -> Batch:
    """A data message into a Batch; EnvelopeError names what is wrong."""
    body, finite = _loads(unwrap(data))
    if not isinstance(body, dict):
        raise EnvelopeError("batch body must be a JSON object")
    for key in ("edge_id", "epoch", "stream"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise EnvelopeError(f"batch lacks a string {key!r}")
    records = body.get("records")
    if not isinstance(records, list):
        raise EnvelopeError("batch lacks a 'records' list")
    return Batch(body["edge_id"], body["epoch"], body["stream"], records, finite)


def record_problem(rec: Any) -> str | None:
    """Why one decoded record of a batch is unusable, or None."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    seq = rec.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "record lacks a positive integer 'seq'"
    if "payload" not in rec:
        return "record lacks 'payload'"
    if not isinstance(rec.get("clock_unsynced", False), bool):
        return "'clock_unsynced' is not true or false"
    try:
        parse_time(rec.get("created_at"))
    except (TypeError, ValueError):
        return "'created_at' is not an RFC 3339 timestamp with a zone"
    return None


def to_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted, merged [first, last] ranges covering `seqs`."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and out[-1][1] == seq - 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def from_ranges(ranges: Any) -> list[tuple[int, int]]:
    """Validated (first, last) pairs from a receipt's range list."""
    if not isinstance(ranges, list):
        raise EnvelopeError("ranges must be a list")
    out = []
    for item in ranges:
        ok = isinstance(item, list) and len(item) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        if not ok or item[0] > item[1] or item[0] < 1:
            raise EnvelopeError(f"bad range {item!r}")
        out.append((item[0], item[1]))
    return out


def encode_receipt(collector: str, confirmed: dict[str, list[int]]) -> bytes:
    """Receipt body: {"collector": id, "confirmed": {epoch: [[a, b], ...]}}."""
    body = {
        "collector": collector,
        "confirmed": {epoch: to_ranges(seqs) for epoch, seqs in confirmed.items()},
    }
    return encode_json(body)


def decode_receipt(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """epoch -> confirmed (first, last) ranges; EnvelopeError when malformed."""
    body = decode_json(data)
    confirmed = body.get("confirmed") if isinstance(body, dict) else None
    if not isinstance(confirmed, dict):
        raise EnvelopeError("receipt lacks a 'confirmed' mapping")
    return {str(epoch): from_ranges(r) for epoch, r in confirmed.items()}


MAX_SKIPPED_SEQS = 1_000_000


def encode_skipped(epoch: str, stream: str, ranges, reason: str) -> bytes:
    """Skipped body: {"epoch", "stream", "ranges": [[a, b], ...], "reason"}."""
    body = {"epoch": epoch, "stream": stream,
            "ranges": [[a, b] for a, b in ranges], "reason": reason}
    return encode_json(body)


def decode_skipped(data: bytes) -> dict:
    """A skipped notice, validated; at most MAX_SKIPPED_SEQS ids in one."""
    body = decode_json(data)
    if not isinstance(body, dict):
        raise EnvelopeError("skipped body must be a JSON object")
    for key in ("epoch", "stream", "reason"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise EnvelopeError(f"skipped notice lacks a string {key!r}")
    ranges = from_ranges(body.get("ranges"))
    if sum(b - a + 1 for a, b in ranges) > MAX_SKIPPED_SEQS:
        raise EnvelopeError(f"skipped notice names over {MAX_SKIPPED_SEQS} ids")
    return {**body, "ranges": ranges}


def is_finite_json(value: Any) -> bool:
    """True when value holds no float NaN or infinity anywhere."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(is_finite_json(v) for v in value)
    return True

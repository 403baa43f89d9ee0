"""The wire envelope: batches, receipts, strict JSON, record checks."""

from __future__ import annotations

import json
import zlib

import pytest

from common.envelope import (
    WireRecord,
    batch_overhead,
    decode_batch,
    decode_json,
    decode_receipt,
    encode_batch,
    encode_json,
    encode_receipt,
    format_time,
    from_ranges,
    is_finite_json,
    loads_strict,
    parse_time,
    record_problem,
    to_ranges,
    unwrap,
    wrap,
)
from common.errors import EnvelopeError
from common.exits import Exit

CODECS = ["json", "json+zlib"]


@pytest.fixture
def records() -> list[WireRecord]:
    """Three records with awkward payloads: nesting, unicode, escapes, scalars."""
    return [
        WireRecord(7, 1767225600.25, False, '{"t":21.5,"tags":["a","b"]}'),
        WireRecord(8, 1767225601.0, True, '"caf\u00e9 \\"quoted\\" \\u0000"'),
        WireRecord(9, 0.0, True, "[1,-2.5e10,null,true,{}]"),
    ]


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_round_trips_with_every_codec(records, codec):
    data = encode_batch("pi-017", "0123abcd", "readings", records, codec)
    batch = decode_batch(data)

    assert (batch.edge_id, batch.epoch, batch.stream) == (
        "pi-017",
        "0123abcd",
        "readings",
    )
    assert [r["seq"] for r in batch.records] == [7, 8, 9]
    assert [r["clock_unsynced"] for r in batch.records] == [False, True, True]
    assert [r["payload"] for r in batch.records] == [
        json.loads(r.payload) for r in records
    ]
    assert batch.records[0]["created_at"] == "2026-01-01T00:00:00.250Z"
    assert batch.records[2]["created_at"] == "1970-01-01T00:00:00.000Z"
    assert all(record_problem(r) is None for r in batch.records)


@pytest.mark.parametrize("codec", CODECS)
def test_the_header_line_names_version_and_codec(records, codec):
    data = encode_batch("e1", "ep", "s", records, codec)

    assert data.startswith(f"spoolmq/1 {codec}\n".encode())


def test_a_zlib_batch_is_compressed_and_a_json_batch_is_not(records):
    plain = encode_batch("e1", "ep", "s", records * 50, "json")
    packed = encode_batch("e1", "ep", "s", records * 50, "json+zlib")

    body = plain.split(b"\n", 1)[1]
    assert zlib.decompress(packed.split(b"\n", 1)[1]) == body
    assert len(packed) < len(plain) / 5


def test_a_payload_is_spliced_into_the_batch_as_the_exact_text_it_was(records):
    data = encode_batch("e1", "ep", "s", records)

    body = unwrap(data).decode()
    for rec in records:
        assert f'"payload":{rec.payload}}}' in body


def test_an_empty_batch_is_valid_and_measures_the_overhead():
    data = encode_batch("e1", "ep", "s", [])

    assert decode_batch(data).records == []
    assert batch_overhead("e1", "ep", "s") == len(data)


@pytest.mark.parametrize(
    "data, words",
    [
        (b'{"edge_id":"e"}', "header"),
        (b"", "header"),
        (b"spoolmq/1 json" + b" " * 80 + b"\n{}", "header"),
        (b"spoolmq/2 json\n{}", "unknown envelope version 2"),
        (b"spoolmq/0 json\n{}", "unknown envelope version 0"),
        (b"spoolmq/x json\n{}", "malformed"),
        (b"spoolmq/1\n{}", "malformed"),
        (b"spoolmq/1 gzip\n{}", "unknown codec 'gzip'"),
        (b"spoolmq/1 JSON\n{}", "unknown codec 'JSON'"),
        (b"spoolmq/1 json+zlib\nnot zlib at all", "does not decompress"),
    ],
)
def test_a_message_with_a_bad_header_is_refused_with_envelope_error(data, words):
    with pytest.raises(EnvelopeError, match=words) as caught:
        unwrap(data)

    assert caught.value.exit_code == Exit.DATAERR


def test_wrapping_with_an_unknown_codec_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown codec"):
        wrap(b"{}", "lz4")


@pytest.mark.parametrize(
    "body, words",
    [
        (b"[]", "must be a JSON object"),
        (b'{"epoch":"ep","stream":"s","records":[]}', "'edge_id'"),
        (b'{"edge_id":"e","epoch":"","stream":"s","records":[]}', "'epoch'"),
        (b'{"edge_id":"e","epoch":"ep","stream":3,"records":[]}', "'stream'"),
        (b'{"edge_id":"e","epoch":"ep","stream":"s"}', "'records' list"),
        (b'{"edge_id":"e","epoch":"ep","stream":"s","records":{}}', "'records'"),
        (b'{"edge_id":"e",', "not JSON"),
        (b'{"edge_id":NaN}', "not JSON"),
    ],
)
def test_a_batch_body_that_is_not_a_batch_is_refused(body, words):
    with pytest.raises(EnvelopeError, match=words):
        decode_batch(wrap(body))


def test_a_receipt_round_trips_with_its_seqs_merged_into_ranges():
    confirmed = {"ep1": [5, 1, 2, 3, 9, 10, 3, 7], "ep2": [42]}

    data = encode_receipt("core-01", confirmed)

    assert decode_receipt(data) == {
        "ep1": [(1, 3), (5, 5), (7, 7), (9, 10)],
        "ep2": [(42, 42)],
    }
    assert decode_json(data)["collector"] == "core-01"


def test_ranges_are_sorted_merged_and_deduplicated():
    assert to_ranges([]) == []
    assert to_ranges([3, 2, 1, 1, 5, 6, 8]) == [[1, 3], [5, 6], [8, 8]]
    assert to_ranges(range(1, 1001)) == [[1, 1000]]


@pytest.mark.parametrize(
    "ranges",
    [
        {"a": 1},
        [[1]],
        [[1, 2, 3]],
        [[3, 2]],
        [[0, 2]],
        [[1, "2"]],
        [[True, 2]],
        [[1.0, 2]],
        ["1-2"],
    ],
)
def test_a_malformed_range_is_refused(ranges):
    with pytest.raises(EnvelopeError):
        from_ranges(ranges)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"collector":"c"}',
        b'{"confirmed":[]}',
        b'{"confirmed":{"ep":[[2,1]]}}',
        b'{"confirmed":{"ep":"1-2"}}',
    ],
)
def test_a_malformed_receipt_is_refused(body):
    with pytest.raises(EnvelopeError):
        decode_receipt(wrap(body))


GOOD_RECORD = {
    "seq": 1,
    "created_at": "2026-01-01T00:00:00.000Z",
    "clock_unsynced": False,
    "payload": None,
}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"seq": 0}, "seq"),
        ({"seq": -4}, "seq"),
        ({"seq": "1"}, "seq"),
        ({"seq": 1.0}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": None}, "seq"),
        ({"clock_unsynced": "no"}, "clock_unsynced"),
        ({"clock_unsynced": 0}, "clock_unsynced"),
        ({"created_at": "2026-01-01T00:00:00"}, "created_at"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": 1767225600}, "created_at"),
        ({"created_at": None}, "created_at"),
    ],
)
def test_record_problem_names_the_field_that_is_wrong(change, words):
    assert words in record_problem({**GOOD_RECORD, **change})


def test_record_problem_accepts_a_good_record_with_any_zone_and_null_payload():
    offset = {**GOOD_RECORD, "created_at": "2026-01-01T01:00:00+01:00"}

    assert record_problem(GOOD_RECORD) is None
    assert record_problem(offset) is None


def test_record_problem_refuses_a_record_without_payload_or_not_an_object():
    without = {k: v for k, v in GOOD_RECORD.items() if k != "payload"}

    assert record_problem(without) == "record lacks 'payload'"
    assert record_problem([1, 2]) == "record is not a JSON object"
    assert record_problem(None) == "record is not a JSON object"


def test_clock_unsynced_defaults_to_false_when_absent():
    rec = {k: v for k, v in GOOD_RECORD.items() if k != "clock_unsynced"}

    assert record_problem(rec) is None


@pytest.mark.parametrize(
    "text", ["NaN", "[Infinity]", '{"a": -Infinity}', "[1, NaN]", "nan"]
)
def test_loads_strict_refuses_what_only_python_calls_json(text):
    with pytest.raises(EnvelopeError):
        loads_strict(text)


def test_loads_strict_refuses_deep_nesting_without_crashing():
    with pytest.raises(EnvelopeError, match="nested"):
        loads_strict("[" * 100000 + "]" * 100000)


def test_loads_strict_reads_bytes_and_text_alike():
    assert loads_strict(b'{"a":[1,2.5]}') == loads_strict('{"a":[1,2.5]}')


def test_small_messages_refuse_nan_when_encoded():
    with pytest.raises(ValueError):
        encode_json({"x": float("nan")})


def test_a_small_message_round_trips():
    body = {"online": True, "ts": format_time(1767225600.5), "n": [1, 2]}

    assert decode_json(encode_json(body)) == body
    assert decode_json(encode_json(body, "json+zlib")) == body


def test_times_are_rfc3339_utc_with_milliseconds_and_parse_back():
    text = format_time(1767225600.123)

    assert text == "2026-01-01T00:00:00.123Z"
    assert parse_time(text).timestamp() == pytest.approx(1767225600.123)
    with pytest.raises(ValueError):
        parse_time("2026-01-01T00:00:00")


def test_is_finite_json_looks_everywhere():
    assert is_finite_json({"a": [1, 2.5, {"b": "x"}]})
    assert not is_finite_json({"a": [1, {"b": float("inf")}]})
    assert not is_finite_json([float("nan")])


def test_a_compressed_body_that_expands_past_the_cap_is_refused():
    from common.envelope import MAX_BODY_BYTES

    bomb = wrap(b"[" + b" " * (MAX_BODY_BYTES + 10) + b"]", "json+zlib")

    assert len(bomb) < 1024 * 1024
    with pytest.raises(EnvelopeError, match="expands past"):
        unwrap(bomb)


# --- the fast JSON path agrees with the standard library ---------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"b":[1.5,-0.0,1e-7,null,true],"c":"caf\xc3\xa9 \\u0000"}',
        b'{"a":1,"a":2}',
        b"[12345678901234567890123, -9223372036854775809, 18446744073709551615]",
        b"[0.1234567890123456789]",
        b'"\\ud800"',
        b"[1e999]",
        b"[1e-999]",
        '["\u2028"]'.encode(),
    ],
)
def test_strict_loads_reads_every_value_as_the_standard_library_does(text):
    value = loads_strict(text)
    expected = json.loads(text)
    assert value == expected
    assert json.dumps(value) == json.dumps(expected)  # int stays int, -0.0 stays


@pytest.mark.parametrize(
    "text", [b"[NaN]", b"[Infinity]", b"[1] x", b"[1,]", b"['a']", b"[1"]
)
def test_strict_loads_refuses_what_is_not_json_on_either_path(text):
    with pytest.raises(EnvelopeError):
        loads_strict(text)


def test_a_batch_with_a_number_past_a_double_is_not_marked_finite(records):
    fine = decode_batch(encode_batch("pi-017", "ep", "s", records))
    assert fine.finite
    huge = WireRecord(9, 1767225600.0, False, "[1e999]")
    batch = decode_batch(encode_batch("pi-017", "ep", "s", [*records, huge]))
    assert not batch.finite
    assert not is_finite_json(batch.records[-1]["payload"])

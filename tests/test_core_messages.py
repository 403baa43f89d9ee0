"""A received message becomes records or dead letters, never an exception."""

from __future__ import annotations

import json

import pytest

from common.envelope import WireRecord, encode_batch, encode_skipped, wrap
from common.topics import Topics
from core.datastore import DeadLetter, EdgeStatus, Record, Skipped
from core.messages import decode_message, payload_text, utc_text

TOPICS = Topics("spoolmq")
TOPIC = "spoolmq/e1/data/s"


def batch_body(records: list, **header) -> bytes:
    body = {"edge_id": "e1", "epoch": "ep1", "stream": "s", "records": records}
    body.update(header)
    return wrap(json.dumps(body).encode())


def good(seq: int, **fields) -> dict:
    rec = {
        "seq": seq,
        "created_at": "2024-05-01T14:00:00+02:00",
        "clock_unsynced": False,
        "payload": {"n": seq},
    }
    rec.update(fields)
    return rec


def test_a_batch_becomes_records_with_utc_times():
    data = encode_batch("e1", "ep1", "s", [WireRecord(1, 0.5, True, '{"a":"é"}')])

    (item,) = decode_message(TOPIC, data, TOPICS)

    assert item == Record(
        "e1", "ep1", 1, "s", "1970-01-01T00:00:00.500Z", True, '{"a":"é"}'
    )


def test_a_created_at_with_an_offset_is_stored_in_utc():
    (item,) = decode_message(TOPIC, batch_body([good(1)]), TOPICS)

    assert item.created_at == "2024-05-01T12:00:00.000Z"


def test_one_bad_record_is_dead_lettered_alone_with_its_identity():
    items = decode_message(
        TOPIC, batch_body([good(1), good(2, created_at="yesterday"), good(3)]), TOPICS
    )

    assert [type(i) for i in items] == [Record, DeadLetter, Record]
    letter = items[1]
    assert (letter.edge_id, letter.epoch, letter.seq) == ("e1", "ep1", 2)
    assert json.loads(letter.raw)["created_at"] == "yesterday"


def test_a_record_without_a_usable_seq_is_dead_lettered_without_identity():
    (letter,) = decode_message(TOPIC, batch_body([good(0)]), TOPICS)

    assert isinstance(letter, DeadLetter)
    assert not letter.identified


def test_a_seq_beyond_64_bits_and_an_infinite_number_are_dead_lettered():
    items = decode_message(
        TOPIC,
        wrap(
            b'{"edge_id":"e1","epoch":"ep1","stream":"s","records":['
            b'{"seq":9223372036854775808,"created_at":"2024-05-01T00:00:00Z",'
            b'"payload":1},'
            b'{"seq":4,"created_at":"2024-05-01T00:00:00Z","payload":1e999}]}'
        ),
        TOPICS,
    )

    assert all(isinstance(item, DeadLetter) for item in items)
    assert [item.seq for item in items] == [None, 4]


def test_a_batch_claiming_another_edge_is_dead_lettered_whole():
    (letter,) = decode_message(TOPIC, batch_body([good(1)], edge_id="e2"), TOPICS)

    assert isinstance(letter, DeadLetter)
    assert letter.edge_id == "e1" and letter.seq is None
    assert "'e2'" in letter.reason


def test_a_message_that_is_not_an_envelope_keeps_its_raw_bytes():
    (letter,) = decode_message(TOPIC, b"\xff\x00garbage", TOPICS)

    assert letter.raw == b"\xff\x00garbage"


def test_json_nested_too_deeply_is_dead_lettered_not_raised():
    (letter,) = decode_message(TOPIC, wrap(b"[" * 200000), TOPICS)

    assert "nested too deeply" in letter.reason


def test_a_lone_surrogate_in_a_payload_is_kept_as_an_escape():
    data = wrap(
        b'{"edge_id":"e1","epoch":"ep1","stream":"s","records":[{"seq":1,'
        b'"created_at":"2024-05-01T00:00:00Z","payload":"\\ud800"}]}'
    )

    (item,) = decode_message(TOPIC, data, TOPICS)

    assert item.payload == '"\\ud800"'


def test_a_status_message_becomes_the_edges_liveness():
    status = wrap(b'{"online":true,"ts":"2024-05-01T00:00:00.000Z"}')

    (item,) = decode_message("spoolmq/e1/status", status, TOPICS)

    assert item == EdgeStatus("e1", True, "2024-05-01T00:00:00.000Z")


def test_a_status_without_a_boolean_online_is_dead_lettered():
    (item,) = decode_message("spoolmq/e1/status", wrap(b'{"online":1}'), TOPICS)

    assert isinstance(item, DeadLetter) and "online" in item.reason


def test_an_empty_status_clearing_the_retained_one_stores_nothing():
    assert decode_message("spoolmq/e1/status", b"", TOPICS) == []


def test_a_skipped_notice_becomes_one_item_per_range():
    body = encode_skipped("ep1", "s", [(3, 5), (9, 9)], "ttl expired")

    items = decode_message("spoolmq/e1/skipped", body, TOPICS)

    assert items == [
        Skipped("e1", "ep1", "s", 3, 5, "ttl expired"),
        Skipped("e1", "ep1", "s", 9, 9, "ttl expired"),
    ]


def test_a_malformed_skipped_notice_is_dead_lettered():
    for body in (
        wrap(b'{"online":true}'),
        wrap(b'{"epoch":"ep1","stream":"s","reason":"x","ranges":[[5,2]]}'),
        encode_skipped("ep1", "s", [(1, 2_000_000)], "too many"),
    ):
        (item,) = decode_message("spoolmq/e1/skipped", body, TOPICS)
        assert isinstance(item, DeadLetter)
        assert item.edge_id == "e1" and item.seq is None


def test_a_refusal_by_the_backend_dead_letters_the_record():
    items = decode_message(
        TOPIC,
        batch_body([good(1), good(2)]),
        TOPICS,
        lambda r: "no" if r.seq == 2 else None,
    )

    assert [type(i) for i in items] == [Record, DeadLetter]
    assert items[1].seq == 2


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"t": 21.5, "n": None, "s": "café"}, '{"t":21.5,"n":null,"s":"café"}'),
        ([12345678901234567890123], "[12345678901234567890123]"),
        ("\ud800", '"\\ud800"'),
    ],
)
def test_payload_text_is_compact_and_exact(value, text):
    assert payload_text(value) == text
    assert json.loads(payload_text(value)) == value


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("2026-12-04T07:09:23.741Z", "2026-12-04T07:09:23.741Z"),
        ("2026-12-04T08:09:23.741+01:00", "2026-12-04T07:09:23.741Z"),
        ("2026-12-04T07:09:23Z", "2026-12-04T07:09:23.000Z"),
    ],
)
def test_created_at_is_normalised_to_utc_milliseconds(given, normal):
    assert utc_text(given) == normal


def test_a_created_at_in_the_normal_form_that_is_no_date_is_refused():
    with pytest.raises(ValueError):
        utc_text("2026-02-30T07:09:23.741Z")

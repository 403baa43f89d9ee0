"""The window alone: at most W unconfirmed, receipts, linger, resend timers."""

from __future__ import annotations

import itertools
import random

import pytest

from edge.outbox import Record, SegmentRow, encode_body
from edge.window import Chunk, Window

EPOCH = "ep01"

# --- fixtures ------------------------------------------------------------


def row(seg_id: int, first_seq: int, count: int, stream: str = "s", epoch=EPOCH):
    """An outbox segment as the outbox would hand it over."""
    records = [
        Record(stream, f'{{"seq":{first_seq + i}}}', 1767225600.0 + i)
        for i in range(count)
    ]
    return SegmentRow(
        seg_id, epoch, stream, first_seq, count, 1767225600.0, encode_body(records)
    )


def rows(segments: int, per_segment: int, stream: str = "s") -> list[SegmentRow]:
    return [
        row(i + 1, 1 + i * per_segment, per_segment, stream) for i in range(segments)
    ]


def make_window(**overrides) -> Window:
    settings = dict(
        window=10,
        batch_records=4,
        batch_bytes=10**6,
        linger=0.0,
        resend_initial=1.0,
        resend_max=8.0,
    )
    settings.update(overrides)
    return Window(**settings)


def seqs(chunk: Chunk) -> list[int]:
    return [r.seq for r in chunk.records()]


def publish_all(w: Window, now: float) -> list[int]:
    """Publish every chunk the window allows now; the seqs published."""
    out = []
    for _ in range(10000):
        chunk = w.next_chunk(now)
        if chunk is None:
            return out
        w.mark_published(chunk, now)
        out.extend(seqs(chunk))
    raise AssertionError("the window never stopped handing out chunks")


def resent(w: Window, now: float, paused: bool = False) -> list[int]:
    return sorted(s for c in w.due_resends(now, paused=paused) for s in seqs(c))


# --- the bound -----------------------------------------------------------


@pytest.mark.parametrize("backlog", [1, 10, 11, 57, 1000])
def test_never_more_than_w_records_are_unconfirmed_whatever_the_backlog(backlog):
    w = make_window()
    w.add([row(1, 1, backlog)], now=0.0)

    published = publish_all(w, now=0.0)

    assert published == list(range(1, min(backlog, 10) + 1))
    assert w.unconfirmed == min(backlog, 10)
    assert w.next_chunk(now=100.0) is None


def test_the_bound_holds_through_a_long_run_of_random_receipts():
    rng = random.Random(7)
    w = make_window(window=25, batch_records=6)
    w.add(rows(40, 13), now=0.0)
    confirmed: set[int] = set()
    published: list[int] = []
    for step in range(400):
        published += publish_all(w, now=float(step))
        assert w.unconfirmed <= 25
        open_ = sorted(set(published) - confirmed)
        if not open_:
            break
        first = rng.choice(open_)
        last = first + rng.randrange(0, 6)
        w.confirm(EPOCH, first, last)
        confirmed |= set(range(first, last + 1))
        assert w.unconfirmed == len(set(published) - confirmed)

    assert set(published) | confirmed >= set(range(1, 40 * 13 + 1))
    assert len(published) == len(set(published))
    assert w.unconfirmed == 0


def test_confirming_frees_the_window_for_new_records():
    w = make_window()
    w.add([row(1, 1, 30)], now=0.0)
    assert publish_all(w, 0.0) == list(range(1, 11))

    w.confirm(EPOCH, 1, 3)

    assert w.unconfirmed == 7
    assert publish_all(w, 0.0) == [11, 12, 13]
    assert w.unconfirmed == 10


def test_wants_keeps_w_plus_one_batch_in_memory():
    w = make_window()

    assert w.wants() == 14
    w.add([row(1, 1, 9)], now=0.0)
    assert w.wants() == 5
    w.add([row(2, 10, 9)], now=0.0)
    assert w.wants() == 0


def test_a_chunk_holds_one_epoch_and_one_stream():
    w = make_window(window=100, batch_records=50)
    w.add([row(1, 1, 3, "a"), row(2, 4, 2, "b"), row(3, 1, 2, "a", "ep02")], now=0.0)

    chunks = []
    for _ in range(5):
        chunk = w.next_chunk(now=0.0)
        if chunk is None:
            break
        w.mark_published(chunk, 0.0)
        chunks.append((chunk.epoch, chunk.stream, seqs(chunk)))

    assert chunks == [
        (EPOCH, "a", [1, 2, 3]),
        (EPOCH, "b", [4, 5]),
        ("ep02", "a", [1, 2]),
    ]


def test_a_chunk_spans_segments_of_one_stream_up_to_batch_records():
    w = make_window(window=100, batch_records=7)
    w.add(rows(3, 3), now=0.0)

    first = w.next_chunk(now=0.0)

    assert seqs(first) == [1, 2, 3, 4, 5, 6, 7]
    assert len(first) == 7


def test_a_chunk_stops_at_batch_bytes():
    w = make_window(window=100, batch_records=100, batch_bytes=3 * (12 + 80))
    w.add([row(1, 1, 10)], now=0.0)

    assert len(w.next_chunk(now=0.0)) == 3


# --- receipts ------------------------------------------------------------


def test_receipts_in_any_order_confirm_each_record_exactly_once():
    w = make_window(window=20)
    w.add(rows(4, 5), now=0.0)
    publish_all(w, 0.0)

    counts = [
        w.confirm(EPOCH, 11, 20)[0],
        w.confirm(EPOCH, 1, 3)[0],
        w.confirm(EPOCH, 2, 12)[0],
        w.confirm(EPOCH, 1, 20)[0],
        w.confirm(EPOCH, 5, 5)[0],
    ]

    assert counts == [10, 3, 7, 0, 0]
    assert w.unconfirmed == 0
    assert w.held == 0
    assert w.confirmed_total == 20
    assert w.segments == {}


def test_a_receipt_for_another_epoch_confirms_nothing_and_is_reported_uncovered():
    w = make_window()
    w.add([row(1, 1, 5)], now=0.0)
    publish_all(w, 0.0)

    assert w.confirm("other", 1, 5) == (0, [(1, 5)])
    assert w.unconfirmed == 5


def test_a_receipt_reports_the_parts_no_segment_in_memory_holds():
    w = make_window(window=100)
    w.add([row(1, 11, 5), row(2, 21, 5)], now=0.0)
    publish_all(w, 0.0)

    confirmed, uncovered = w.confirm(EPOCH, 1, 40)

    assert confirmed == 10
    assert uncovered == [(1, 10), (16, 20), (26, 40)]


def test_a_record_confirmed_before_it_was_published_is_never_counted_unconfirmed():
    w = make_window(window=3, batch_records=3)
    w.add([row(1, 1, 6)], now=0.0)
    publish_all(w, 0.0)

    assert w.confirm(EPOCH, 4, 6)[0] == 3  # from an earlier run's publication
    assert w.unconfirmed == 3
    w.confirm(EPOCH, 1, 3)

    assert w.unconfirmed == 0
    assert w.take_done() == [1]


def test_fully_confirmed_segments_are_reported_once_by_take_done():
    w = make_window(window=100)
    w.add(rows(3, 4), now=0.0)
    publish_all(w, 0.0)

    w.confirm(EPOCH, 1, 6)  # segment 1 whole, segment 2 half
    assert w.take_done() == [1]
    assert w.take_done() == []

    w.confirm(EPOCH, 7, 12)
    assert sorted(w.take_done()) == [2, 3]
    assert w.take_done() == []


def test_a_partly_confirmed_segment_stays_in_memory():
    w = make_window(window=100)
    w.add([row(1, 1, 4)], now=0.0)
    publish_all(w, 0.0)

    w.confirm(EPOCH, 1, 3)

    assert w.take_done() == []
    assert list(w.segments) == [1]
    assert w.segments[1].unconfirmed == {3}


def test_drop_offsets_frees_records_that_will_never_be_sent():
    w = make_window()
    w.add([row(1, 1, 2)], now=0.0)
    publish_all(w, 0.0)

    w.drop_offsets(w.segments[1], [0, 1])

    assert w.unconfirmed == 0
    assert w.take_done() == [1]


# --- linger --------------------------------------------------------------


def test_linger_holds_a_small_chunk_back_until_it_passes():
    w = make_window(linger=0.5)
    w.add([row(1, 1, 2)], now=100.0)

    assert w.next_chunk(now=100.0) is None
    assert w.next_chunk(now=100.49) is None
    chunk = w.next_chunk(now=100.5)

    assert seqs(chunk) == [1, 2]


def test_linger_does_not_hold_back_a_full_batch_or_a_flush():
    w = make_window(linger=60.0)
    w.add([row(1, 1, 4)], now=0.0)
    assert seqs(w.next_chunk(now=0.0)) == [1, 2, 3, 4]

    small = make_window(linger=60.0)
    small.add([row(1, 1, 1)], now=0.0)
    assert small.next_chunk(now=0.0) is None
    assert seqs(small.next_chunk(now=0.0, flush=True)) == [1]


def test_linger_does_not_hold_back_a_run_that_another_stream_ends():
    w = make_window(linger=60.0)
    w.add([row(1, 1, 1, "a"), row(2, 2, 1, "b")], now=0.0)

    assert seqs(w.next_chunk(now=0.0)) == [1]


# --- resend timers -------------------------------------------------------


def test_resend_timers_double_up_to_the_cap():
    w = make_window(resend_initial=1.0, resend_max=8.0)
    w.add([row(1, 1, 3)], now=0.0)
    chunk = w.next_chunk(now=0.0)
    w.mark_published(chunk, 0.0)

    dues = []
    now = 0.0
    for _ in range(6):
        step = 0.0
        while not (again := w.due_resends(now + step)):
            step += 0.25
            assert step < 100
        now += step
        dues.append(now)
        assert [c.attempt for c in again] == [len(dues)]
        assert seqs(again[0]) == [1, 2, 3]
        w.mark_published(again[0], now)

    gaps = [b - a for a, b in itertools.pairwise([0.0, *dues])]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert w.unconfirmed == 3
    assert w.resent_total == 18


def test_a_resend_carries_only_what_is_still_unconfirmed():
    w = make_window(window=10, batch_records=10)
    w.add([row(1, 1, 5)], now=0.0)
    w.mark_published(w.next_chunk(now=0.0), 0.0)

    w.confirm(EPOCH, 2, 3)

    assert resent(w, 1.0) == [1, 4, 5]


def test_a_fully_confirmed_flight_is_never_resent():
    w = make_window()
    w.add([row(1, 1, 4)], now=0.0)
    publish_all(w, 0.0)
    w.confirm(EPOCH, 1, 4)

    assert w.due_resends(1000.0) == []
    assert w.resent_total == 0


def test_nothing_is_resent_before_it_is_due():
    w = make_window(resend_initial=30.0, resend_max=600.0)
    w.add([row(1, 1, 4)], now=0.0)
    publish_all(w, 0.0)

    assert w.due_resends(29.9) == []
    assert resent(w, 30.0) == [1, 2, 3, 4]


def test_due_resends_while_paused_sends_nothing_and_keeps_the_records():
    w = make_window(resend_initial=1.0, resend_max=8.0)
    w.add(rows(3, 4), now=0.0)
    publish_all(w, 0.0)

    for now in (1.0, 5.0, 50.0, 500.0):
        assert w.due_resends(now, paused=True) == []

    assert w.unconfirmed == 10
    assert w.resent_total == 0
    assert resent(w, 502.0) == list(range(1, 11))


def test_resend_all_makes_every_unconfirmed_flight_due_now():
    w = make_window(window=12, batch_records=4, resend_initial=30.0, resend_max=60.0)
    w.add(rows(3, 4), now=0.0)
    for t in (0.0, 10.0, 20.0):
        chunk = w.next_chunk(now=t)
        w.mark_published(chunk, t)
    w.confirm(EPOCH, 5, 6)
    assert w.due_resends(21.0) == []

    assert w.resend_all(21.0) == 10

    assert resent(w, 21.0) == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]
    assert w.due_resends(21.0) == []


def test_the_oldest_unconfirmed_publication_time_is_reported():
    w = make_window(resend_initial=30.0, resend_max=600.0)
    assert w.oldest_unconfirmed_since() is None
    w.add(rows(2, 4), now=0.0)
    w.mark_published(w.next_chunk(now=5.0), 5.0)
    w.mark_published(w.next_chunk(now=9.0), 9.0)

    assert w.oldest_unconfirmed_since() == 5.0
    w.confirm(EPOCH, 1, 4)
    assert w.oldest_unconfirmed_since() == 9.0


def test_confirmed_flights_do_not_pile_up_before_their_timers_run_out():
    w = make_window(window=10, batch_records=1, resend_initial=3600.0,
                    resend_max=3600.0)
    w.add(rows(100, 100), now=0.0)
    for _ in range(5000):
        published = publish_all(w, now=0.0)
        for seq in published:
            w.confirm(EPOCH, seq, seq)
        if not w.segments:
            break
        assert len(w._flights) <= 2 * 64 + 1
    assert w.confirmed_total == 10_000
    assert len(w._flights) <= 2 * 64 + 1

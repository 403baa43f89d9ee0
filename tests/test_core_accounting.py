"""Per-edge accounting: gaps, contiguous prefixes, skipped ranges, liveness.

One suite on both backends, through the datastore interface.
"""

from __future__ import annotations

import random

import pytest

from core.datastore import EdgeStatus, Record, Skipped, open_datastore
from core.gaps import as_ranges, subtract


@pytest.fixture
def store(datastore_url):
    opened = open_datastore(datastore_url)
    yield opened
    opened.close()


def record(seq: int, edge_id: str = "e1", epoch: str = "ep1") -> Record:
    return Record(edge_id, epoch, seq, "s", "2024-05-01T00:00:00.000Z", False, "{}")


def records(*seqs: int, **ids: str) -> list[Record]:
    return [record(seq, **ids) for seq in seqs]


def gaps_of(store, edge_id: str = "e1") -> list[tuple[int, int]]:
    return [(g["first_seq"], g["last_seq"]) for g in store.edge_gaps(edge_id)["gaps"]]


def only_edge(store) -> dict:
    (edge,) = store.edge_summary()
    return edge


def test_gaps_close_as_late_and_duplicate_records_arrive(store):
    store.store(records(1, 2, 5))
    store.store(records(10, 4))
    assert gaps_of(store) == [(3, 3), (6, 9)]

    store.store(records(3, 2, 7))

    assert gaps_of(store) == [(6, 6), (8, 9)]
    (epoch,) = only_edge(store)["epochs"]
    assert (epoch["contiguous"], epoch["missing"], epoch["records"]) == (5, 3, 7)
    assert only_edge(store)["missing"] == 3


def test_gaps_start_at_seq_one_and_a_late_record_splits_them(store):
    store.store(records(10))
    assert gaps_of(store) == [(1, 9)]

    store.store(records(7))

    assert gaps_of(store) == [(1, 6), (8, 9)]
    assert only_edge(store)["epochs"][0]["contiguous"] == 0
    store.store(records(*range(1, 7)))
    assert only_edge(store)["epochs"][0]["contiguous"] == 7


def test_skipped_ids_are_listed_apart_and_never_counted_as_gaps(store):
    store.store(records(1, 6))
    store.store([Skipped("e1", "ep1", "s", 2, 3, "ttl")])

    assert gaps_of(store) == [(4, 5)]
    edge = only_edge(store)
    assert edge["skipped"] == [
        {"epoch": "ep1", "first_seq": 2, "last_seq": 3, "reason": "ttl"}
    ]
    assert (edge["skipped_seqs"], edge["missing"]) == (2, 2)


def test_ids_skipped_before_later_records_arrive_are_not_gaps_either(store):
    store.store(records(1))
    store.store([Skipped("e1", "ep1", "s", 3, 5, "when-full")])
    store.store(records(8))

    assert gaps_of(store) == [(2, 2), (6, 7)]


def test_epochs_and_edges_keep_their_own_gaps(store):
    store.store(records(1, 3) + records(1, 4, epoch="ep2")
                + records(1, 2, edge_id="e2"))

    assert gaps_of(store, "e1") == [(2, 2), (2, 3)]
    summary = {edge["edge_id"]: edge for edge in store.edge_summary()}
    assert [p["contiguous"] for p in summary["e1"]["epochs"]] == [1, 1]
    assert summary["e2"]["missing"] == 0


def test_random_arrival_order_with_repeats_matches_a_full_recount(store):
    rng = random.Random(7)
    sent = [seq for seq in range(1, 401) if rng.random() > 0.1]
    arrivals = sent + rng.sample(sent, 60)
    rng.shuffle(arrivals)
    for start in range(0, len(arrivals), 23):
        store.store(records(*arrivals[start : start + 23]))

    span = [(1, max(sent))]
    assert gaps_of(store) == subtract(span, as_ranges(sent))


def test_liveness_changes_its_since_only_when_the_state_flips(store):
    store.store([EdgeStatus("e1", True, "t0")], received_at=1000.0)
    store.store([EdgeStatus("e1", True, "t0")], received_at=2000.0)  # replayed
    first = only_edge(store)
    store.store([EdgeStatus("e1", False, "t0")], received_at=3000.0)

    edge = only_edge(store)
    assert (first["online"], first["online_since"]) == (
        True,
        "1970-01-01T00:16:40.000Z",
    )
    assert (edge["online"], edge["online_since"]) == (False, "1970-01-01T00:50:00.000Z")
    assert edge["records"] == 0 and edge["last_seen"] is None


def test_a_status_message_confirms_nothing(store):
    assert store.store([EdgeStatus("e1", True, None)]) == {}

"""The SQLite outbox: schema, identity, seqs, segments, concurrency, summary."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from common.exits import Exit
from edge.errors import OutboxError
from edge.outbox import (
    SCHEMA_VERSION,
    Outbox,
    Record,
    RecordId,
    decode_body,
    encode_body,
)

EDGE = "pi-017"

# --- fixtures ------------------------------------------------------------


@pytest.fixture
def outbox_path(tmp_path) -> Path:
    return tmp_path / "var" / "outbox.db"


@pytest.fixture
def outbox(outbox_path):
    box = Outbox(outbox_path, EDGE)
    yield box
    box.close()


def records(n: int, stream: str = "readings", start: int = 0) -> list[Record]:
    return [Record(stream, f'{{"i":{start + i}}}', 1767225600.0 + i) for i in range(n)]


def segment_rows(box: Outbox) -> list[tuple]:
    """(stream, first_seq, count) of every segment, oldest first."""
    return box.conn.execute(
        "SELECT stream, first_seq, count FROM segments ORDER BY id"
    ).fetchall()


def all_seqs(box: Outbox) -> list[int]:
    rows = box.conn.execute("SELECT first_seq, count FROM segments").fetchall()
    return sorted(s for first, n in rows for s in range(first, first + n))


def delete_everything(box: Outbox) -> None:
    ids = [r[0] for r in box.conn.execute("SELECT id FROM segments")]
    box.delete_segments(ids)


def accept_in_small_transactions(path: str, count: int, per_tx: int, start, out):
    """Run in a child process: accept `count` records, `per_tx` at a time."""
    start.wait(60)  # a barrier: both processes open the new outbox together
    try:
        box = Outbox(path, EDGE)
        seqs = []
        for i in range(0, count, per_tx):
            ids = box.accept(records(per_tx, start=i), segment_records=7)
            seqs.extend(rid.seq for rid in ids)
        box.close()
    except Exception as exc:  # reported to the test, which fails with it
        out.put(("error", repr(exc)))
        return
    out.put((box.epoch, seqs))


def open_new_outboxes_together(folder: str, rounds: int, start, out):
    """Run in a child process: open outbox 0, 1, ... each at once with others."""
    epochs = []
    try:
        for n in range(rounds):
            start.wait(60)
            box = Outbox(Path(folder, f"outbox-{n}.db"), EDGE)
            box.accept(records(1))
            epochs.append(box.epoch)
            box.close()
    except Exception as exc:
        start.abort()  # the others stop waiting for this one
        out.put(("error", repr(exc)))
        return
    out.put(("ok", epochs))


def run_children(target, args_list: list[tuple], parties: int):
    """Start one spawned process per args tuple; collect what each put."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(parties), ctx.Queue()
    workers = [ctx.Process(target=target, args=(*a, start, out)) for a in args_list]
    for w in workers:
        w.start()
    try:
        if parties > len(workers):
            start.wait(60)
        return [out.get(timeout=60) for _ in workers]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)


# --- schema and identity -------------------------------------------------


def test_a_new_outbox_gets_schema_version_1_and_its_identity(outbox):
    meta = dict(outbox.conn.execute("SELECT key, value FROM meta"))

    assert SCHEMA_VERSION == 1
    assert meta["schema_version"] == "1"
    assert meta["edge_id"] == EDGE
    assert meta["epoch"] == outbox.epoch
    assert len(outbox.epoch) == 16
    assert meta["next_seq"] == "1"
    tables = {r[0] for r in outbox.conn.execute("SELECT name FROM sqlite_master")}
    assert {"meta", "segments", "claims", "dead_letters"} <= tables


def test_the_outbox_connection_uses_wal_and_synchronous_full(outbox):
    assert outbox.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert outbox.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split(":", 1)[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def test_deleting_delivered_segments_does_not_write_their_bytes_again(outbox):
    # An SQLite built with secure_delete on (Debian's) zeroes every freed
    # page: deleting 2 MB of segments would write 2 MB more.
    payload = '{"v":"' + "x" * 1000 + '"}'
    for start in range(0, 2000, 100):
        outbox.accept([Record("readings", payload, 1767225600.0)] * 100)
    body_bytes = outbox.conn.execute(
        "SELECT sum(length(body)) FROM segments"
    ).fetchone()[0]
    assert body_bytes > 2_000_000
    outbox.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = written_bytes()
    delete_everything(outbox)
    outbox.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert written_bytes() - before < body_bytes / 10
    assert outbox.conn.execute("PRAGMA secure_delete").fetchone()[0] == 2  # FAST


def test_the_outbox_creates_its_parent_directory(outbox_path):
    assert not outbox_path.parent.exists()

    Outbox(outbox_path, EDGE).close()

    assert outbox_path.is_file()


def test_each_new_outbox_gets_its_own_random_epoch(tmp_path):
    epochs = set()
    for i in range(3):
        box = Outbox(tmp_path / f"o{i}.db", EDGE)
        epochs.add(box.epoch)
        box.close()

    assert len(epochs) == 3


def test_the_epoch_is_kept_across_reopening(outbox_path):
    first = Outbox(outbox_path, EDGE)
    epoch = first.epoch
    first.accept(records(2))
    first.close()

    again = Outbox(outbox_path, EDGE)

    assert again.epoch == epoch
    assert again.accept(records(1)) == [RecordId(EDGE, epoch, 3)]
    again.close()


def test_a_config_naming_another_edge_id_is_refused_with_exit_78(outbox_path):
    Outbox(outbox_path, EDGE).close()

    with pytest.raises(OutboxError) as caught:
        Outbox(outbox_path, "pi-018")

    assert caught.value.exit_code == Exit.CONFIG == 78
    assert "'pi-017'" in str(caught.value) and "'pi-018'" in str(caught.value)


def test_an_outbox_of_a_newer_schema_is_refused_with_exit_78(outbox_path):
    Outbox(outbox_path, EDGE).close()
    with sqlite3.connect(outbox_path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()

    with pytest.raises(OutboxError, match="schema 2") as caught:
        Outbox(outbox_path, EDGE)

    assert caught.value.exit_code == Exit.CONFIG


def test_opening_without_create_refuses_a_missing_outbox(outbox_path):
    with pytest.raises(OutboxError, match="does not exist"):
        Outbox(outbox_path, EDGE, create=False)

    assert not outbox_path.exists()


def test_a_path_under_a_regular_file_gives_exit_73(tmp_path):
    (tmp_path / "afile").write_text("not a directory")

    with pytest.raises(OutboxError) as caught:
        Outbox(tmp_path / "afile" / "outbox.db", EDGE)

    assert caught.value.exit_code == Exit.CANTCREAT == 73
    assert "afile" in str(caught.value)


def test_a_path_that_is_a_directory_gives_exit_73(tmp_path):
    (tmp_path / "outbox.db").mkdir()

    with pytest.raises(OutboxError) as caught:
        Outbox(tmp_path / "outbox.db", EDGE)

    assert caught.value.exit_code == Exit.CANTCREAT


# --- seqs ----------------------------------------------------------------


def test_seqs_rise_by_one_per_record(outbox):
    ids = (
        outbox.accept(records(3))
        + outbox.accept(records(1))
        + outbox.accept(records(4))
    )

    assert [i.seq for i in ids] == list(range(1, 9))
    assert {(i.edge_id, i.epoch) for i in ids} == {(EDGE, outbox.epoch)}
    assert str(ids[0]) == f"{EDGE}:{outbox.epoch}:1"


def test_seqs_are_never_reused_after_every_segment_is_deleted(outbox):
    outbox.accept(records(5))
    delete_everything(outbox)
    assert outbox.summary()["records_waiting"] == 0

    ids = outbox.accept(records(2))

    assert [i.seq for i in ids] == [6, 7]
    assert segment_rows(outbox) == [("readings", 6, 2)]


def test_segment_ids_are_never_reused_after_the_table_empties(outbox):
    outbox.accept(records(3), segment_records=1)
    last = max(r[0] for r in outbox.conn.execute("SELECT id FROM segments"))
    delete_everything(outbox)

    outbox.accept(records(1))

    assert outbox.segments_after(0, 10)[0].id == last + 1


def test_seqs_are_never_reused_across_reopening_an_emptied_outbox(outbox_path):
    box = Outbox(outbox_path, EDGE)
    box.accept(records(4))
    delete_everything(box)
    box.close()

    again = Outbox(outbox_path, EDGE)
    ids = again.accept(records(1))
    again.close()

    assert [i.seq for i in ids] == [5]


def test_a_failed_transaction_takes_no_seqs(outbox):
    outbox.accept(records(2))
    # A lone surrogate cannot be stored as UTF-8: the insert fails mid-way.
    bad = [Record("readings", "1", 1.0), Record("readings", '"\ud800"', 1.0)]

    with pytest.raises(UnicodeEncodeError):
        outbox.accept(bad)

    assert [i.seq for i in outbox.accept(records(1))] == [3]
    assert all_seqs(outbox) == [1, 2, 3]


# --- segments ------------------------------------------------------------


def test_segments_split_at_segment_records(outbox):
    outbox.accept(records(25), segment_records=10)

    assert segment_rows(outbox) == [
        ("readings", 1, 10),
        ("readings", 11, 10),
        ("readings", 21, 5),
    ]


def test_segments_split_at_segment_bytes(outbox):
    big = [Record("s", '"' + "x" * 98 + '"', 1.0) for _ in range(10)]

    outbox.accept(big, segment_bytes=500)

    counts = [r[2] for r in segment_rows(outbox)]
    assert sum(counts) == 10
    assert len(counts) >= 3
    assert all(n <= 5 for n in counts)


def test_a_single_record_larger_than_segment_bytes_gets_its_own_segment(outbox):
    outbox.accept([Record("s", '"' + "x" * 5000 + '"', 1.0)], segment_bytes=100)

    assert segment_rows(outbox) == [("s", 1, 1)]


def test_segments_split_by_stream_and_keep_the_order_of_seqs(outbox):
    mixed = records(2, "a") + records(3, "b") + records(1, "a") + records(1, "c")

    outbox.accept(mixed, segment_records=100)

    assert segment_rows(outbox) == [("a", 1, 2), ("b", 3, 3), ("a", 6, 1), ("c", 7, 1)]


def test_a_segment_body_holds_each_record_exactly(outbox):
    sent = [
        Record("s", '{"t":21.5,"s":"caf\u00e9"}', 1767225600.123, False),
        Record("s", "[1,2,3]", 12.5, True),
        Record("s", '"tab\\there"', 1767225601.0, False),
    ]

    outbox.accept(sent)

    body = outbox.segments_after(0, 10)[0].body
    assert list(decode_body(body)) == [
        (r.created_at, r.clock_unsynced, r.payload) for r in sent
    ]


def test_encode_body_and_decode_body_round_trip():
    sent = records(5)

    back = list(decode_body(encode_body(sent)))

    assert back == [(r.created_at, False, r.payload) for r in sent]
    assert list(decode_body("")) == []


def test_segments_after_returns_the_oldest_segments_up_to_the_limit(outbox):
    outbox.accept(records(30), segment_records=10)

    first = outbox.segments_after(0, 15)
    rest = outbox.segments_after(first[-1].id, 100)

    assert [s.first_seq for s in first] == [1, 11]
    assert [s.first_seq for s in rest] == [21]
    assert outbox.segments_after(rest[-1].id, 100) == []


def test_segments_overlapping_finds_each_segment_touching_a_range(outbox):
    outbox.accept(records(30), segment_records=10)

    found = outbox.segments_overlapping(outbox.epoch, 10, 11)

    assert sorted((f, n) for _, f, n in found) == [(1, 10), (11, 10)]
    assert outbox.segments_overlapping(outbox.epoch, 31, 40) == []
    assert outbox.segments_overlapping("other-epoch", 1, 30) == []


# --- claims --------------------------------------------------------------


def test_claims_commit_with_their_records_and_are_forgotten_on_request(outbox):
    outbox.accept(records(2), claims=["/s/a", "/s/b"])
    outbox.accept(records(1), claims=["/s/c"], forget_claims=["/s/a"])

    assert outbox.committed_claims(["/s/a", "/s/b", "/s/c", "/s/x"]) == {
        "/s/b",
        "/s/c",
    }
    outbox.forget_claims(["/s/b", "/s/c"])
    assert outbox.all_claims() == set()


def test_committed_claims_handles_more_names_than_one_query_takes(outbox):
    names = [f"/s/{i}" for i in range(1200)]
    outbox.accept(records(1), claims=names[::2])

    assert outbox.committed_claims(names) == set(names[::2])


# --- several processes ---------------------------------------------------


@pytest.mark.timeout(120)
def test_two_processes_creating_and_filling_one_outbox_get_4000_distinct_seqs(
    outbox_path,
):
    args = (str(outbox_path), 2000, 2)

    results = run_children(accept_in_small_transactions, [args, args], parties=3)

    assert [r for r in results if r[0] == "error"] == []
    (epoch_a, seqs_a), (epoch_b, seqs_b) = results
    assert epoch_a == epoch_b
    assert len(seqs_a) == len(seqs_b) == 2000
    assert sorted(seqs_a + seqs_b) == list(range(1, 4001))
    box = Outbox(outbox_path, EDGE)
    assert all_seqs(box) == list(range(1, 4001))
    assert box.summary()["next_seq"] == 4001
    box.close()


@pytest.mark.timeout(120)
def test_processes_opening_a_new_outbox_at_the_same_moment_all_succeed(tmp_path):
    args = (str(tmp_path), 8)

    results = run_children(open_new_outboxes_together, [args] * 3, parties=3)

    assert [r for r in results if r[0] == "error"] == []
    epochs = [r[1] for r in results]
    assert epochs[0] == epochs[1] == epochs[2]
    assert len(set(epochs[0])) == 8


# --- summary -------------------------------------------------------------


def test_the_summary_of_an_empty_outbox(outbox):
    assert outbox.summary() == {
        "records_waiting": 0,
        "segments": 0,
        "bytes_waiting": 0,
        "oldest_accepted_at": None,
        "next_seq": 1,
        "dead_letters": 0,
    }


def test_the_summary_counts_records_segments_bytes_and_age(outbox):
    before = time.time()
    outbox.accept(records(3, "a"))
    time.sleep(0.01)
    outbox.accept(records(2, "b"))
    after = time.time()
    bodies = [r[0] for r in outbox.conn.execute("SELECT body FROM segments")]

    summary = outbox.summary()

    assert summary["records_waiting"] == 5
    assert summary["segments"] == 2
    assert summary["bytes_waiting"] == sum(len(b) for b in bodies)
    assert before <= summary["oldest_accepted_at"] <= after
    assert summary["oldest_accepted_at"] < max(
        r[0] for r in outbox.conn.execute("SELECT accepted_at FROM segments")
    )
    assert summary["next_seq"] == 6
    assert summary["dead_letters"] == 0


def test_the_summary_follows_deletions(outbox):
    outbox.accept(records(10), segment_records=4)
    first = outbox.segments_after(0, 1)[0]

    outbox.delete_segments([first.id])

    summary = outbox.summary()
    assert summary["records_waiting"] == 6
    assert summary["segments"] == 2
    assert summary["next_seq"] == 11


def test_another_connection_sees_commits_through_data_version(outbox, outbox_path):
    other = Outbox(outbox_path, EDGE)
    seen = outbox.data_version()

    other.accept(records(1))

    assert outbox.data_version() != seen
    assert outbox.summary()["records_waiting"] == 1
    other.close()

"""The datastore: one transaction per batch, duplicates confirmed.

Every test that takes `url` runs once per backend (SQLite, PostgreSQL) and
checks the tables through a probe that reads both the same way.
"""

from __future__ import annotations

import sqlite3

import pytest

from common.exits import Exit
from core.datastore import DeadLetter, Record, Skipped, open_datastore
from core.errors import DatastoreError
from tests.harness.stores import StoreProbe, probe

CREATED = "2024-05-01T12:00:00.000Z"


def record(seq: int, *, edge_id: str = "e1", epoch: str = "ep1", **kw) -> Record:
    values = {
        "stream": "s",
        "created_at": CREATED,
        "clock_unsynced": False,
        "payload": f'{{"n":{seq}}}',
    }
    values.update(kw)
    return Record(edge_id=edge_id, epoch=epoch, seq=seq, **values)


@pytest.fixture
def url(datastore_url) -> str:
    return datastore_url


@pytest.fixture
def tables(url) -> StoreProbe:
    return probe(url)


@pytest.fixture
def store(url):
    opened = open_datastore(url)
    yield opened
    opened.close()


def rows(url: str, sql: str) -> list[tuple]:
    return probe(url).rows(sql)


def test_a_batch_is_stored_and_every_record_confirmed(store, url):
    confirmed = store.store([record(1), record(2), record(3, epoch="ep2")])

    assert confirmed == {"e1": {"ep1": [1, 2], "ep2": [3]}}
    assert rows(url, "SELECT epoch, seq FROM records ORDER BY seq") == [
        ("ep1", 1),
        ("ep1", 2),
        ("ep2", 3),
    ]


def test_duplicates_are_ignored_but_confirmed(store, url):
    store.store([record(1), record(2)])

    confirmed = store.store([record(2, payload='{"other":1}'), record(3), record(3)])

    assert confirmed == {"e1": {"ep1": [2, 3]}}
    assert rows(url, "SELECT seq, payload FROM records ORDER BY seq") == [
        (1, {"n": 1}),
        (2, {"n": 2}),
        (3, {"n": 3}),
    ]


def test_identified_dead_letters_are_confirmed_and_stored_once(store, url):
    bad = DeadLetter("spoolmq/e1/data/s", "bad created_at", b"{}", "e1", "ep1", 7)
    anonymous = DeadLetter("spoolmq/e1/data/s", "not a batch", b"junk", "e1")

    first = store.store([bad, anonymous, record(1)])
    second = store.store([bad])

    assert first == {"e1": {"ep1": [1, 7]}}
    assert second == {"e1": {"ep1": [7]}}
    assert rows(
        url, "SELECT epoch, seq, reason, raw FROM dead_letters ORDER BY id"
    ) == [
        ("ep1", 7, "bad created_at", b"{}"),
        (None, None, "not a batch", b"junk"),
    ]


def test_the_edges_summary_counts_new_rows_gaps_and_the_newest_record(store):
    store.store(
        [record(1), record(2), record(5, created_at="2024-05-02T00:00:00.000Z")]
    )
    store.store([record(2), record(1, edge_id="e2")])
    store.store([DeadLetter("spoolmq/e2/data/s", "bad", b"x", "e2")])

    summary = {row["edge_id"]: row for row in store.edge_summary()}

    assert summary["e1"]["records"] == 3
    assert summary["e1"]["missing"] == 2  # seqs 3 and 4
    assert summary["e1"]["last_created_at"] == "2024-05-02T00:00:00.000Z"
    assert summary["e1"]["dead_letters"] == 0
    assert summary["e2"]["records"] == 1
    assert summary["e2"]["dead_letters"] == 1
    assert summary["e2"]["first_seen"] <= summary["e2"]["last_seen"]
    assert store.totals() == {"records": 4, "dead_letters": 1, "edges": 2}


def test_a_failing_batch_commits_nothing(store, url):
    broken = record(2, payload=None)  # violates NOT NULL

    with pytest.raises(DatastoreError) as caught:
        store.store([record(1), broken])

    assert caught.value.exit_code == Exit.TEMPFAIL
    assert rows(url, "SELECT count(*) FROM records") == [(0,)]
    assert store.edge_summary() == []


def test_migrations_are_recorded_once_across_opens(url, tables):
    open_datastore(url).close()
    open_datastore(url).close()

    versions = rows(url, "SELECT version FROM schema_migrations ORDER BY version")
    assert versions == [(v,) for v in range(1, tables.module.SCHEMA_VERSION + 1)]


def test_skipped_ids_are_stored_once_and_confirmed(store, url):
    notice = Skipped("e1", "ep1", "s", 5, 7, "ttl expired")

    assert store.store([notice]) == {"e1": {"ep1": [5, 6, 7]}}
    assert store.store([notice]) == {"e1": {"ep1": [5, 6, 7]}}
    assert rows(url, "SELECT first_seq, last_seq, reason FROM skipped") == [
        (5, 7, "ttl expired")
    ]


def test_a_migration_that_fails_leaves_no_record_of_itself(url, tables, monkeypatch):
    backend = tables.module
    version = backend.SCHEMA_VERSION
    broken = dict(backend.MIGRATIONS)
    broken[version + 1] = "CREATE TABLE t1 (a integer); CREATE TABLE t1 (a integer)"
    monkeypatch.setattr(backend, "MIGRATIONS", broken)
    monkeypatch.setattr(backend, "SCHEMA_VERSION", version + 1)

    with pytest.raises(DatastoreError):
        open_datastore(url)

    assert rows(url, "SELECT max(version) FROM schema_migrations") == [(version,)]
    assert "t1" not in tables.table_names()


def test_a_commit_returns_only_once_it_is_on_disk(tables):
    # SQLite: WAL with synchronous=FULL; PostgreSQL: synchronous_commit=on.
    assert tables.commits_are_durable()


# The next two are about files; test_core_postgres.py has the server's cases.
def test_a_path_that_cannot_be_created_exits_73(tmp_path):
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(DatastoreError) as caught:
        open_datastore(f"sqlite:///{tmp_path}/file/core.db")

    assert caught.value.exit_code == Exit.CANTCREAT == 73


def test_a_file_that_is_not_sqlite_exits_73(tmp_path):
    (tmp_path / "core.db").write_bytes(b"x" * 4096)

    with pytest.raises(DatastoreError) as caught:
        open_datastore(f"sqlite:///{tmp_path}/core.db")

    assert caught.value.exit_code == Exit.CANTCREAT


def test_another_programs_sqlite_file_is_refused_with_78_and_left_as_it_was(tmp_path):
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE segments (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO segments (body) VALUES ('x')")
    conn.close()

    with pytest.raises(DatastoreError) as caught:
        open_datastore(f"sqlite:///{path}")

    assert caught.value.exit_code == Exit.CONFIG == 78
    assert "segments" in str(caught.value)
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert names == ["segments"]


def test_a_store_never_created_and_opened_read_only_exits_69(url, tmp_path, tables):
    with pytest.raises(DatastoreError) as caught:
        open_datastore(url, readonly=True)

    assert caught.value.exit_code == Exit.UNAVAILABLE == 69
    assert not (tmp_path / "core.db").exists()
    if tables.backend == "postgresql":
        assert tables.table_names() == set()


def test_a_schema_newer_than_this_build_is_refused(url, tables):
    open_datastore(url).close()
    tables.execute(
        "INSERT INTO schema_migrations (version, applied_at) "
        "VALUES (99, CURRENT_TIMESTAMP)"
    )

    with pytest.raises(DatastoreError, match="newer"):
        open_datastore(url)


def test_a_read_only_store_reads_what_the_writer_committed(store, url):
    store.store([record(1)])

    reader = open_datastore(url, readonly=True)
    try:
        assert reader.totals()["records"] == 1
    finally:
        reader.close()


def test_saved_state_survives_a_reopen(url):
    first = open_datastore(url)
    first.save_state("subscriptions/core-1", '["a"]')
    first.save_state("subscriptions/core-1", '["b"]')
    first.close()

    again = open_datastore(url)
    try:
        assert again.load_state("subscriptions/core-1") == '["b"]'
        assert again.load_state("nothing") is None
    finally:
        again.close()

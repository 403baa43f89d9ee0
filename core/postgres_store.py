"""The PostgreSQL datastore, through psycopg 3.

Several collectors may write one database (DESIGN.md, "Scale"): the unique
key makes their redeliveries harmless, the migrations run under an advisory
lock, and each batch takes its row locks in identity order, so that two
batches wait for each other rather than deadlock.

Every session sets `synchronous_commit = on` whatever the server's default:
a commit here is followed by a PUBACK that lets the broker forget the
message, so the commit must be on disk first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from common.config import mask_url
from common.envelope import format_time
from common.exits import Exit
from core.datastore import (
    LISTED_RANGES,
    Confirmed,
    Datastore,
    DeadLetter,
    EdgeStatus,
    Item,
    Record,
    Skipped,
    assemble_summary,
    confirmed_ids,
)
from core.errors import DatastoreError
from core.gaps import Change, GapTable, Range, update_gaps

log = logging.getLogger("core.postgres_store")

# What a URL does not say otherwise. The keepalives and the TCP user timeout
# turn a database that vanished without a word into an error within a minute,
# which the collector retries, instead of a commit that hangs for the kernel's
# quarter of an hour.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "application_name": "spoolmq-core",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}
SESSION_SETUP = ("SET synchronous_commit = on", "SET TimeZone = 'UTC'")

# Held by the transaction that reads or applies a migration, so that
# collectors starting together migrate once. Advisory locks are per database.
MIGRATION_LOCK = 0x73706F6F6C6D71  # "spoolmq"

# Each version's DDL, the same tables as the SQLite backend's; `_migrate`
# applies the missing ones in order, each in the transaction that records it.
MIGRATIONS = {
    1: """
    CREATE TABLE records (
        edge_id text NOT NULL,
        epoch text NOT NULL,
        seq bigint NOT NULL,
        stream text NOT NULL,
        created_at timestamptz NOT NULL,
        clock_unsynced boolean NOT NULL,
        received_at timestamptz NOT NULL,
        payload jsonb NOT NULL,
        CONSTRAINT records_identity UNIQUE (edge_id, epoch, seq)
    );
    CREATE TABLE dead_letters (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received_at timestamptz NOT NULL,
        topic text NOT NULL,
        edge_id text,
        epoch text,
        seq bigint,
        reason text NOT NULL,
        raw bytea NOT NULL
    );
    CREATE UNIQUE INDEX dead_letters_identity
        ON dead_letters (edge_id, epoch, seq) WHERE seq IS NOT NULL;
    CREATE TABLE edges (
        edge_id text PRIMARY KEY,
        records bigint NOT NULL DEFAULT 0,
        dead_letters bigint NOT NULL DEFAULT 0,
        first_seen timestamptz NOT NULL,
        last_seen timestamptz NOT NULL,
        last_created_at timestamptz
    );
    CREATE TABLE epochs (
        edge_id text NOT NULL,
        epoch text NOT NULL,
        first_seq bigint NOT NULL,
        last_seq bigint NOT NULL,
        records bigint NOT NULL,
        PRIMARY KEY (edge_id, epoch)
    );
    CREATE TABLE collector_state (
        key text PRIMARY KEY,
        value text NOT NULL
    );
    """,
    2: """
    CREATE TABLE skipped (
        edge_id text NOT NULL,
        epoch text NOT NULL,
        stream text NOT NULL,
        first_seq bigint NOT NULL,
        last_seq bigint NOT NULL,
        reason text NOT NULL,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (edge_id, epoch, first_seq, last_seq)
    );
    """,
    # Open gaps per epoch, kept by core.gaps in each batch's transaction, and
    # each edge's liveness; the backfill as in the SQLite backend.
    3: """
    CREATE TABLE gaps (
        edge_id text NOT NULL,
        epoch text NOT NULL,
        first_seq bigint NOT NULL,
        last_seq bigint NOT NULL,
        PRIMARY KEY (edge_id, epoch, first_seq)
    );
    CREATE TABLE edge_status (
        edge_id text PRIMARY KEY,
        online boolean NOT NULL,
        online_since timestamptz NOT NULL,
        reported_at text,
        received_at timestamptz NOT NULL
    );
    INSERT INTO gaps (edge_id, epoch, first_seq, last_seq)
    SELECT edge_id, epoch, seq + 1, next - 1 FROM (
        SELECT edge_id, epoch, seq,
               lead(seq) OVER (PARTITION BY edge_id, epoch ORDER BY seq) AS next
        FROM records
    ) AS r WHERE next > seq + 1;
    DELETE FROM gaps WHERE EXISTS (
        SELECT 1 FROM skipped s
        WHERE s.edge_id = gaps.edge_id AND s.epoch = gaps.epoch
          AND s.first_seq <= gaps.first_seq AND s.last_seq >= gaps.last_seq
    );
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)

CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL
)
"""
# Records arrive by COPY into this per-session table, then move on in one
# INSERT ... SELECT: twice as fast as psycopg's pipelined executemany of
# INSERT ... ON CONFLICT DO NOTHING. 100,000 records in batches of 2,000 from
# 20 edges, PostgreSQL 15 on loopback, best of two or three runs of
# tests/bench_postgres_inserts.py (new rows / all rows duplicates):
#   COPY + INSERT ... SELECT ... RETURNING    1.20 s / 0.88 s
#   executemany, one per batch, RETURNING     2.97 s / 2.00 s
#   executemany, one per edge, rowcount       2.63 s / 2.62 s
STAGING = """
CREATE TEMP TABLE records_staging (LIKE records INCLUDING DEFAULTS)
ON COMMIT DELETE ROWS
"""
COPY_RECORDS = """
COPY records_staging (edge_id, epoch, seq, stream, created_at, clock_unsynced,
                      received_at, payload) FROM STDIN
"""
# ORDER BY: identity order is the lock order two collectors then share. Only
# the new rows are returned: they are what the summary counts.
INSERT_STAGED = """
WITH new AS (
    INSERT INTO records (edge_id, epoch, seq, stream, created_at,
                         clock_unsynced, received_at, payload)
    SELECT edge_id, epoch, seq, stream, created_at, clock_unsynced,
           received_at, payload
    FROM records_staging ORDER BY edge_id, epoch, seq
    ON CONFLICT (edge_id, epoch, seq) DO NOTHING
    RETURNING edge_id, epoch
)
SELECT edge_id, epoch, count(*) FROM new GROUP BY edge_id, epoch
"""
INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (received_at, topic, edge_id, epoch, seq, reason, raw)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING edge_id
"""
INSERT_SKIPPED = """
INSERT INTO skipped (edge_id, epoch, stream, first_seq, last_seq, reason,
                     received_at)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""
UPSERT_EPOCH = """
INSERT INTO epochs AS p (edge_id, epoch, first_seq, last_seq, records)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (edge_id, epoch) DO UPDATE SET
    first_seq = least(p.first_seq, excluded.first_seq),
    last_seq = greatest(p.last_seq, excluded.last_seq),
    records = p.records + excluded.records
"""
# greatest() ignores NULL, and keeps last_seen from going back when two
# collectors commit for one edge at nearly the same time.
UPSERT_EDGE = """
INSERT INTO edges AS e (edge_id, records, dead_letters, first_seen, last_seen,
                        last_created_at)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (edge_id) DO UPDATE SET
    records = e.records + excluded.records,
    dead_letters = e.dead_letters + excluded.dead_letters,
    last_seen = greatest(e.last_seen, excluded.last_seen),
    last_created_at = greatest(e.last_created_at, excluded.last_created_at)
"""
UPSERT_STATUS = """
INSERT INTO edge_status AS s (edge_id, online, online_since, reported_at,
                              received_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (edge_id) DO UPDATE SET
    online_since = CASE WHEN s.online = excluded.online THEN s.online_since
                   ELSE excluded.online_since END,
    online = excluded.online,
    reported_at = excluded.reported_at,
    received_at = excluded.received_at
"""
# Two collectors may store one epoch at once; this transaction-scoped lock,
# taken in id order, serialises their gap updates.
LOCK_EPOCH = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
# The gap that starts at or before `low`, and every one after it up to
# `high`: two index scans on the primary key.
TOUCHING_GAPS = """
SELECT first_seq, last_seq FROM gaps
WHERE edge_id = %(edge)s AND epoch = %(epoch)s AND last_seq >= %(low)s
  AND first_seq BETWEEN coalesce(
        (SELECT max(first_seq) FROM gaps
         WHERE edge_id = %(edge)s AND epoch = %(epoch)s
           AND first_seq <= %(low)s), %(low)s)
      AND %(high)s
ORDER BY first_seq
"""
SKIPPED_OVER = """
SELECT first_seq, last_seq FROM skipped
WHERE edge_id = %s AND epoch = %s AND first_seq <= %s AND last_seq >= %s
"""
EDGE_ROWS = """
SELECT edge_id, records, dead_letters, first_seen, last_seen, last_created_at
FROM edges
"""
STATUS_ROWS = "SELECT edge_id, online, online_since FROM edge_status"
# Read from the small epochs and gaps tables only; EXPLAIN shows a hash or
# merge join of epochs and gaps, never `records` (README, "status").
EPOCH_ROWS = """
SELECT p.edge_id, p.epoch, p.first_seq, p.last_seq, p.records,
       count(g.first_seq) AS gap_count,
       coalesce(sum(g.last_seq - g.first_seq + 1), 0)::bigint AS gap_seqs,
       min(g.first_seq) AS first_gap
FROM epochs p LEFT JOIN gaps g ON g.edge_id = p.edge_id AND g.epoch = p.epoch
GROUP BY p.edge_id, p.epoch
"""
LISTED_GAPS = """
SELECT edge_id, epoch, first_seq, last_seq FROM (
    SELECT *, row_number() OVER (PARTITION BY edge_id
                                 ORDER BY epoch COLLATE "C", first_seq) AS n
    FROM gaps
) AS g WHERE n <= %s ORDER BY edge_id COLLATE "C", epoch COLLATE "C", first_seq
"""
LISTED_SKIPPED = """
SELECT edge_id, epoch, stream, first_seq, last_seq, reason, skipped_ranges,
       skipped_seqs FROM (
    SELECT *, row_number() OVER w AS n,
           count(*) OVER (PARTITION BY edge_id) AS skipped_ranges,
           sum(last_seq - first_seq + 1) OVER (PARTITION BY edge_id)
               AS skipped_seqs
    FROM skipped WINDOW w AS (PARTITION BY edge_id
                              ORDER BY epoch COLLATE "C", first_seq)
) AS s WHERE n <= %s ORDER BY edge_id COLLATE "C", epoch COLLATE "C", first_seq
"""
EDGE_GAPS = """
SELECT epoch, first_seq, last_seq FROM gaps WHERE edge_id = %s
ORDER BY epoch COLLATE "C", first_seq
"""
EDGE_SKIPPED = """
SELECT epoch, stream, first_seq, last_seq, reason FROM skipped WHERE edge_id = %s
ORDER BY epoch COLLATE "C", first_seq
"""
TIME_COLUMNS = ("first_seen", "last_seen", "last_created_at", "online_since")

NUL_REFUSED = "payload holds \\u0000 in a string, which PostgreSQL's jsonb refuses"
SURROGATE_REFUSED = (
    "payload holds a lone UTF-16 surrogate escape, which PostgreSQL's jsonb refuses"
)


class PostgresDatastore(Datastore):
    """A PostgreSQL database holding records, dead letters and the summary."""

    def __init__(self, dsn: str, *, url: str, readonly: bool = False):
        self.url = url
        self.readonly = readonly
        self._dsn = dsn
        self._conn: psycopg.Connection | None = None
        self._conn = self._open()
        try:
            if readonly:
                self._check_version()
            else:
                self._guarded_open(lambda: _migrate(self._conn, self.url))
                self._guarded_open(lambda: self._conn.execute(STAGING))
        except DatastoreError:
            self._conn.close()
            raise

    # -- the connection --------------------------------------------------

    def _open(self) -> psycopg.Connection:
        """A new session, or DatastoreError saying why there is none."""
        params = {**CONNECT_DEFAULTS, **conninfo_to_dict(self._dsn)}
        try:
            conn = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            code, reason = _connect_refusal(exc)
            raise DatastoreError(self.url, reason, exit_code=code) from None
        # Outside UTF8, jsonb refuses every \\u escape above U+007F and text
        # columns refuse what the encoding lacks: batches would fail for good.
        encoding = conn.info.parameter_status("server_encoding")
        if encoding != "UTF8":
            conn.close()
            raise DatastoreError(
                self.url,
                f"the database's encoding is {encoding}; spoolmq needs "
                "UTF8 (createdb -E UTF8 -T template0)",
                exit_code=Exit.CONFIG,
            )
        try:
            for statement in SESSION_SETUP:
                conn.execute(statement)
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            conn.close()
            raise DatastoreError(
                self.url, f"cannot set up the session: {_one_line(exc)}"
            ) from None
        return conn

    def _guarded_open(self, step) -> None:
        try:
            step()
        except psycopg.Error as exc:
            exit_code = Exit.NOPERM if _denied(exc) else Exit.CANTCREAT
            raise DatastoreError(
                self.url,
                f"cannot create or write the schema: {_one_line(exc)}",
                exit_code=exit_code,
            ) from None

    def _check_version(self) -> None:
        try:
            version = _schema_version(self._conn)
        except psycopg.Error as exc:
            raise DatastoreError(
                self.url, f"cannot read: {_one_line(exc)}", exit_code=Exit.UNAVAILABLE
            ) from None
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            reason = "holds no spoolmq tables yet; `core-collector run` creates them"
        else:
            reason = (
                f"schema version {version}, this build reads {SCHEMA_VERSION}; "
                "run `core-collector run` of this build to migrate it"
            )
        raise DatastoreError(self.url, reason, exit_code=Exit.UNAVAILABLE)

    def _connection(self) -> psycopg.Connection:
        """The session, opened anew when the last one was lost."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        started = time.monotonic()
        try:
            conn = self._open()
        except DatastoreError as exc:
            raise DatastoreError(
                self.url, f"cannot reconnect: {exc.reason}", exit_code=Exit.TEMPFAIL
            ) from None
        self._conn = conn
        if not self.readonly:
            conn.execute(STAGING)
        log.info(
            "datastore %s: reconnected in %.2f s",
            self.url,
            time.monotonic() - started,
        )
        return conn

    def _guarded(self, what: str, query):
        """Run `query(conn)`; a failure is a DatastoreError the caller retries."""
        try:
            return query(self._connection())
        except psycopg.Error as exc:
            if self._conn is not None and self._conn.broken:
                # Closed here, so the next call opens a new session.
                self._conn.close()
                log.warning(
                    "datastore %s: connection lost: %s", self.url, _one_line(exc)
                )
            raise DatastoreError(
                self.url, f"{what} failed: {_one_line(exc)}", exit_code=Exit.TEMPFAIL
            ) from None

    # -- the message path ------------------------------------------------

    def store(
        self, items: Sequence[Item], received_at: float | None = None
    ) -> Confirmed:
        now = time.time() if received_at is None else received_at
        stamp = datetime.fromtimestamp(now, UTC)
        records = sorted(
            (item for item in items if isinstance(item, Record)),
            key=lambda r: (r.edge_id, r.epoch, r.seq),
        )
        letters = [item for item in items if isinstance(item, DeadLetter)]
        skipped = [item for item in items if isinstance(item, Skipped)]

        def commit(conn: psycopg.Connection):
            with conn.transaction(), conn.cursor() as cur:
                _insert_skipped(cur, skipped, stamp)
                # Before _update_epochs widens the epochs' spans.
                update_gaps(_PostgresGaps(cur), records, skipped)
                stored = _insert_records(cur, records, stamp)
                lettered = _insert_dead_letters(cur, letters, stamp)
                _update_epochs(cur, records, stored)
                _update_edges(cur, records, stored, lettered, stamp)
                _update_statuses(cur, items, stamp)
            return stored, lettered

        stored, lettered = self._guarded("commit", commit)
        log.debug(
            "committed %d records (%d new) and %d dead letters (%d new)",
            len(records),
            sum(stored.values()),
            len(letters),
            sum(lettered.values()),
        )
        return confirmed_ids(items)

    def refusal(self, record: Record) -> str | None:
        payload = record.payload
        # What jsonb refuses comes as a \\u escape (json.dumps writes U+0000
        # and a lone surrogate so), which most payloads hold none of: they
        # are cleared by one substring test and never parsed again.
        if "\\u" not in payload and "\x00" not in payload:
            return None
        try:
            value = json.loads(payload)
        except ValueError:
            return "payload is not JSON"
        return _jsonb_problem(value)

    # -- reading and small state -----------------------------------------

    def edge_summary(self) -> list[dict]:
        def query(conn: psycopg.Connection) -> list[dict]:
            with conn.cursor(row_factory=dict_row) as cur:

                def rows(sql: str, args=None) -> list[dict]:
                    return [_summary_row(row) for row in cur.execute(sql, args)]

                return assemble_summary(
                    rows(EDGE_ROWS),
                    rows(STATUS_ROWS),
                    rows(EPOCH_ROWS),
                    rows(LISTED_GAPS, [LISTED_RANGES]),
                    rows(LISTED_SKIPPED, [LISTED_RANGES]),
                )

        return self._guarded("query", query)

    def edge_gaps(self, edge_id: str) -> dict:
        def query(conn: psycopg.Connection) -> dict:
            with conn.cursor(row_factory=dict_row) as cur:
                gaps = cur.execute(EDGE_GAPS, [edge_id]).fetchall()
                skipped = cur.execute(EDGE_SKIPPED, [edge_id]).fetchall()
            return {"gaps": gaps, "skipped": skipped}

        return self._guarded("query", query)

    def totals(self) -> dict[str, int]:
        def count(conn: psycopg.Connection) -> dict[str, int]:
            records, edges = conn.execute(
                "SELECT coalesce(sum(records), 0)::bigint, count(*) FROM edges"
            ).fetchone()
            (letters,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            return {"records": records, "dead_letters": letters, "edges": edges}

        return self._guarded("query", count)

    def load_state(self, key: str) -> str | None:
        sql = "SELECT value FROM collector_state WHERE key = %s"
        row = self._guarded("query", lambda c: c.execute(sql, [key]).fetchone())
        return row[0] if row else None

    def save_state(self, key: str, value: str) -> None:
        sql = (
            "INSERT INTO collector_state (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        self._guarded("saving state", lambda c: c.execute(sql, [key, value]))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _insert_records(
    cur: psycopg.Cursor, records: list[Record], stamp: datetime
) -> dict[tuple[str, str], int]:
    """COPY the batch in and keep the new rows; return them per (edge, epoch)."""
    if not records:
        return {}
    with cur.copy(COPY_RECORDS) as copy:
        for rec in records:
            copy.write_row(
                (
                    rec.edge_id,
                    rec.epoch,
                    rec.seq,
                    rec.stream,
                    rec.created_at,
                    rec.clock_unsynced,
                    stamp,
                    rec.payload,
                )
            )
    stored = {(rec.edge_id, rec.epoch): 0 for rec in records}
    for edge_id, epoch, new in cur.execute(INSERT_STAGED).fetchall():
        stored[edge_id, epoch] = new
    return stored


def _insert_dead_letters(
    cur: psycopg.Cursor, letters: list[DeadLetter], stamp: datetime
) -> dict[str | None, int]:
    """Insert each letter; return how many were new per edge (None: unknown)."""
    lettered: dict[str | None, int] = {dl.edge_id: 0 for dl in letters}
    if not letters:
        return lettered
    rows = [
        (stamp, _text(dl.topic), dl.edge_id, dl.epoch, dl.seq, _text(dl.reason))
        + (dl.raw,)
        for dl in letters
    ]
    cur.executemany(INSERT_DEAD_LETTER, rows, returning=True)
    for _ in range(len(rows)):
        for (edge_id,) in cur.fetchall():
            lettered[edge_id] += 1
        if not cur.nextset():
            break
    return lettered


def _update_epochs(
    cur: psycopg.Cursor, records: list[Record], stored: dict[tuple[str, str], int]
) -> None:
    # The range spans every record of the batch, duplicates included: they
    # are stored, if not by this batch.
    ranges: dict[tuple[str, str], tuple[int, int]] = {}
    for rec in records:
        low, high = ranges.get((rec.edge_id, rec.epoch), (rec.seq, rec.seq))
        ranges[rec.edge_id, rec.epoch] = (min(low, rec.seq), max(high, rec.seq))
    rows = [
        (edge_id, epoch, low, high, stored[edge_id, epoch])
        for (edge_id, epoch), (low, high) in sorted(ranges.items())
    ]
    if rows:
        cur.executemany(UPSERT_EPOCH, rows)


def _update_edges(
    cur: psycopg.Cursor,
    records: list[Record],
    stored: dict[tuple[str, str], int],
    lettered: dict[str | None, int],
    stamp: datetime,
) -> None:
    newest: dict[str, str] = {}
    for rec in records:
        if rec.created_at > newest.get(rec.edge_id, ""):
            newest[rec.edge_id] = rec.created_at
    new_records: dict[str, int] = {}
    for (edge_id, _), new in stored.items():
        new_records[edge_id] = new_records.get(edge_id, 0) + new
    concerned = set(new_records) | {e for e in lettered if e is not None}
    rows = [
        (
            edge_id,
            new_records.get(edge_id, 0),
            lettered.get(edge_id, 0),
            stamp,
            stamp,
            newest.get(edge_id),
        )
        for edge_id in sorted(concerned)
    ]
    if rows:
        cur.executemany(UPSERT_EDGE, rows)


def _insert_skipped(
    cur: psycopg.Cursor, skipped: list[Skipped], stamp: datetime
) -> None:
    rows = [
        (s.edge_id, s.epoch, s.stream, s.first_seq, s.last_seq, _text(s.reason))
        + (stamp,)
        for s in skipped
    ]
    if rows:
        cur.executemany(INSERT_SKIPPED, rows)


def _update_statuses(
    cur: psycopg.Cursor, items: Sequence[Item], stamp: datetime
) -> None:
    rows = [
        (item.edge_id, item.online, stamp, item.reported_at, stamp)
        for item in items
        if isinstance(item, EdgeStatus)
    ]
    if rows:
        cur.executemany(UPSERT_STATUS, rows)


class _PostgresGaps(GapTable):
    """The gaps table as core.gaps reads and writes it, inside one batch."""

    def __init__(self, cur: psycopg.Cursor):
        self.cur = cur

    def lock(self, edge_id: str, epoch: str) -> None:
        self.cur.execute(LOCK_EPOCH, [f"{edge_id}/{epoch}"])

    def span(self, edge_id: str, epoch: str) -> Range | None:
        sql = "SELECT first_seq, last_seq FROM epochs WHERE edge_id = %s AND epoch = %s"
        row = self.cur.execute(sql, [edge_id, epoch]).fetchone()
        return tuple(row) if row else None

    def touching(self, edge_id: str, epoch: str, low: int, high: int) -> list[Range]:
        args = {"edge": edge_id, "epoch": epoch, "low": low, "high": high}
        return [tuple(row) for row in self.cur.execute(TOUCHING_GAPS, args)]

    def skipped_over(self, edge_id: str, epoch: str, region: Range) -> list[Range]:
        args = [edge_id, epoch, region[1], region[0]]
        return [tuple(row) for row in self.cur.execute(SKIPPED_OVER, args)]

    def replace(self, edge_id: str, epoch: str, change: Change) -> None:
        if change.removed:
            self.cur.executemany(
                "DELETE FROM gaps WHERE edge_id = %s AND epoch = %s AND first_seq = %s",
                [(edge_id, epoch, first) for first, _ in change.removed],
            )
        if change.added:
            self.cur.executemany(
                "INSERT INTO gaps (edge_id, epoch, first_seq, last_seq) "
                "VALUES (%s, %s, %s, %s)",
                [(edge_id, epoch, first, last) for first, last in change.added],
            )


def _summary_row(row: dict) -> dict:
    """Times as RFC 3339 text, as the SQLite backend returns them."""
    for key in TIME_COLUMNS:
        if row.get(key) is not None:
            row[key] = format_time(row[key].timestamp())
    return row


def _jsonb_problem(value) -> str | None:
    """Why jsonb refuses a string in a JSON value (keys included), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return NUL_REFUSED
            # json.loads joins a valid pair into one character: one left
            # in the string was alone.
            if any("\ud800" <= char <= "\udfff" for char in item):
                return SURROGATE_REFUSED
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _text(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; a reason quoting the bad input
    # must not fail the batch that dead-letters it.
    return value.replace("\x00", "\\u0000")


def _schema_version(conn: psycopg.Connection) -> int:
    (exists,) = conn.execute(
        "SELECT to_regclass('schema_migrations') IS NOT NULL"
    ).fetchone()
    if not exists:
        return 0
    (version,) = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return version or 0


def _migrate(conn: psycopg.Connection, url: str) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        conn.execute(CREATE_MIGRATIONS)
        current = _schema_version(conn)
    if current > SCHEMA_VERSION:
        raise DatastoreError(
            url,
            f"schema version {current} is newer than this build's "
            f"{SCHEMA_VERSION}; run the newer spoolmq",
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
            # Another collector may have applied it while we waited.
            if _schema_version(conn) >= version:
                continue
            conn.execute(MIGRATIONS[version])
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) "
                "VALUES (%s, now())",
                [version],
            )
        log.info("datastore %s: applied schema migration %d", url, version)


def _one_line(exc: BaseException) -> str:
    # libpq's messages span lines (a hint after a tab); the CLI prints one.
    return " ".join(str(exc).split())


def _denied(exc: psycopg.Error) -> bool:
    return exc.sqlstate is not None and exc.sqlstate.startswith(("28", "42501"))


# libpq reports a failed connection as text only (no SQLSTATE reaches psycopg),
# so the server's English FATAL messages are matched.
# TODO: a server with lc_messages in another language is classed unreachable
# (69) even when it refused the credentials. Ends when psycopg exposes the
# SQLSTATE of a connection failure.
AUTH_MESSAGES = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "password is required",
    "no pg_hba.conf entry",
    "permission denied for database",
)


def _connect_refusal(exc: psycopg.Error) -> tuple[Exit, str]:
    """The exit code and the one-line reason for a connection that failed."""
    text = _one_line(exc).removeprefix("connection failed: ")
    text = text.removeprefix("connection is bad: ")
    if 'role "' in text and "does not exist" in text:
        return Exit.NOPERM, f"credentials refused: {text}"
    if any(message in text for message in AUTH_MESSAGES):
        return Exit.NOPERM, f"credentials refused: {text}; check the URL's user"
    if text.startswith("invalid ") or "invalid connection option" in text:
        # libpq refused an option of the URL itself (sslmode=bogus, ...).
        return Exit.CONFIG, f"datastore.url: {text}"
    if 'database "' in text and "does not exist" in text:
        return (
            Exit.UNAVAILABLE,
            f"{text}; create it (createdb) or correct datastore.url",
        )
    return Exit.UNAVAILABLE, f"cannot reach the server: {text}"


def url_problem(url: str) -> str | None:
    """Why `url` is not a PostgreSQL URL libpq can use, or None."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        return f"not a PostgreSQL URL: {mask_url(_one_line(exc))}"
    for port in params.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"port {port!r} is not a number from 1 to 65535"
    return None

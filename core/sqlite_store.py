"""The SQLite datastore, through sqlite-utils.

WAL with `synchronous=FULL`: a commit here is followed by a PUBACK that lets
the broker forget the message, so the commit must survive a power loss, which
`NORMAL` does not promise in WAL mode.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from sqlite_utils import Database

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

log = logging.getLogger("core.sqlite_store")

BUSY_TIMEOUT_MS = 5000

# Each version's DDL; `_migrate` applies the missing ones in order, each in the
# transaction that records it in schema_migrations.
MIGRATIONS = {
    1: """
    CREATE TABLE records (
        edge_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        created_at TEXT NOT NULL,
        clock_unsynced INTEGER NOT NULL,
        received_at TEXT NOT NULL,
        payload TEXT NOT NULL,
        UNIQUE (edge_id, epoch, seq)
    );
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at TEXT NOT NULL,
        topic TEXT NOT NULL,
        edge_id TEXT,
        epoch TEXT,
        seq INTEGER,
        reason TEXT NOT NULL,
        raw BLOB NOT NULL
    );
    CREATE UNIQUE INDEX dead_letters_identity
        ON dead_letters (edge_id, epoch, seq) WHERE seq IS NOT NULL;
    CREATE TABLE edges (
        edge_id TEXT PRIMARY KEY,
        records INTEGER NOT NULL DEFAULT 0,
        dead_letters INTEGER NOT NULL DEFAULT 0,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        last_created_at TEXT
    );
    CREATE TABLE epochs (
        edge_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        records INTEGER NOT NULL,
        PRIMARY KEY (edge_id, epoch)
    );
    CREATE TABLE collector_state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    2: """
    CREATE TABLE skipped (
        edge_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        stream TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (edge_id, epoch, first_seq, last_seq)
    );
    """,
    # Open gaps per epoch, kept by core.gaps in each batch's transaction, and
    # each edge's liveness. The backfill finds the gaps of what is stored
    # already in one pass over the unique index; a gap that a skipped range
    # covers only in part stays whole (see the README's limits).
    3: """
    CREATE TABLE gaps (
        edge_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (edge_id, epoch, first_seq)
    );
    CREATE TABLE edge_status (
        edge_id TEXT PRIMARY KEY,
        online INTEGER NOT NULL,
        online_since TEXT NOT NULL,
        reported_at TEXT,
        received_at TEXT NOT NULL
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

# ON CONFLICT names the identity: unlike INSERT OR IGNORE it does not also
# swallow a NOT NULL violation, which would be confirmed yet never stored.
INSERT_RECORD = """
INSERT INTO records (edge_id, epoch, seq, stream, created_at, clock_unsynced,
                     received_at, payload)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (edge_id, epoch, seq) DO NOTHING
"""
INSERT_SKIPPED = """
INSERT INTO skipped (edge_id, epoch, stream, first_seq, last_seq, reason,
                     received_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""
INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (received_at, topic, edge_id, epoch, seq, reason, raw)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""
UPSERT_EPOCH = """
INSERT INTO epochs (edge_id, epoch, first_seq, last_seq, records)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (edge_id, epoch) DO UPDATE SET
    first_seq = min(first_seq, excluded.first_seq),
    last_seq = max(last_seq, excluded.last_seq),
    records = records + excluded.records
"""
UPSERT_EDGE = """
INSERT INTO edges (edge_id, records, dead_letters, first_seen, last_seen,
                   last_created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (edge_id) DO UPDATE SET
    records = records + excluded.records,
    dead_letters = dead_letters + excluded.dead_letters,
    last_seen = excluded.last_seen,
    last_created_at = CASE
        WHEN last_created_at IS NULL OR excluded.last_created_at > last_created_at
        THEN excluded.last_created_at ELSE last_created_at END
"""
UPSERT_STATUS = """
INSERT INTO edge_status (edge_id, online, online_since, reported_at, received_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (edge_id) DO UPDATE SET
    online_since = CASE WHEN online = excluded.online THEN online_since
                   ELSE excluded.online_since END,
    online = excluded.online,
    reported_at = excluded.reported_at,
    received_at = excluded.received_at
"""
# The gap that starts at or before `low`, and every one that starts after it
# up to `high`: two seeks on the primary key, however many gaps the epoch has.
TOUCHING_GAPS = """
SELECT first_seq, last_seq FROM gaps
WHERE edge_id = :edge AND epoch = :epoch AND last_seq >= :low
  AND first_seq BETWEEN coalesce(
        (SELECT max(first_seq) FROM gaps
         WHERE edge_id = :edge AND epoch = :epoch AND first_seq <= :low), :low)
      AND :high
ORDER BY first_seq
"""
SKIPPED_OVER = """
SELECT first_seq, last_seq FROM skipped
WHERE edge_id = ? AND epoch = ? AND first_seq <= ? AND last_seq >= ?
"""
EDGE_ROWS = """
SELECT edge_id, records, dead_letters, first_seen, last_seen, last_created_at
FROM edges
"""
STATUS_ROWS = "SELECT edge_id, online, online_since FROM edge_status"
# Per epoch: the summary row and its gaps' count, size and first seq, read
# from the small epochs and gaps tables only (EXPLAIN QUERY PLAN: SCAN p,
# then SEARCH g USING INDEX sqlite_autoindex_gaps_1 (edge_id=? AND epoch=?)).
EPOCH_ROWS = """
SELECT p.edge_id, p.epoch, p.first_seq, p.last_seq, p.records,
       count(g.first_seq) AS gap_count,
       coalesce(sum(g.last_seq - g.first_seq + 1), 0) AS gap_seqs,
       min(g.first_seq) AS first_gap
FROM epochs p LEFT JOIN gaps g ON g.edge_id = p.edge_id AND g.epoch = p.epoch
GROUP BY p.edge_id, p.epoch ORDER BY p.edge_id, p.epoch
"""
# The first few of each edge, by the window over the (small) gap table.
LISTED_GAPS = """
SELECT edge_id, epoch, first_seq, last_seq FROM (
    SELECT *, row_number() OVER (PARTITION BY edge_id
                                 ORDER BY epoch, first_seq) AS n
    FROM gaps
) WHERE n <= ? ORDER BY edge_id, epoch, first_seq
"""
LISTED_SKIPPED = """
SELECT edge_id, epoch, stream, first_seq, last_seq, reason, skipped_ranges,
       skipped_seqs FROM (
    SELECT *, row_number() OVER w AS n,
           count(*) OVER (PARTITION BY edge_id) AS skipped_ranges,
           sum(last_seq - first_seq + 1) OVER (PARTITION BY edge_id)
               AS skipped_seqs
    FROM skipped WINDOW w AS (PARTITION BY edge_id ORDER BY epoch, first_seq)
) WHERE n <= ? ORDER BY edge_id, epoch, first_seq
"""
EDGE_GAPS = """
SELECT epoch, first_seq, last_seq FROM gaps WHERE edge_id = ?
ORDER BY epoch, first_seq
"""
EDGE_SKIPPED = """
SELECT epoch, stream, first_seq, last_seq, reason FROM skipped WHERE edge_id = ?
ORDER BY epoch, first_seq
"""


class SQLiteDatastore(Datastore):
    """A SQLite file holding records, dead letters and the edge summary."""

    def __init__(self, path: str, *, url: str, readonly: bool = False):
        self.url = url
        self.path = Path(path)
        self.db = self._open_readonly() if readonly else self._open_writable()

    def _open_writable(self) -> Database:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = Database(self.path, execute_plugins=False)
            _tune(db, self.url)
            _migrate(db, self.url)
        except (OSError, sqlite3.Error) as exc:
            raise DatastoreError(
                self.url, f"cannot create or write {self.path}: {exc}"
            ) from None
        return db

    def _open_readonly(self) -> Database:
        unavailable = Exit.UNAVAILABLE
        if not self.path.is_file():
            raise DatastoreError(
                self.url,
                f"{self.path} does not exist; `core-collector run` creates it",
                exit_code=unavailable,
            )
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            db = Database(sqlite3.connect(uri, uri=True), execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = _schema_version(db)
        except sqlite3.Error as exc:
            raise DatastoreError(
                self.url, f"cannot open {self.path}: {exc}", exit_code=unavailable
            ) from None
        if version != SCHEMA_VERSION:
            raise DatastoreError(
                self.url,
                f"schema version {version}, this build reads {SCHEMA_VERSION}; "
                "run `core-collector run` of this build to migrate it",
                exit_code=unavailable,
            )
        return db

    def store(
        self, items: Sequence[Item], received_at: float | None = None
    ) -> Confirmed:
        stamp = format_time(time.time() if received_at is None else received_at)
        records = [item for item in items if isinstance(item, Record)]
        letters = [item for item in items if isinstance(item, DeadLetter)]
        skipped = [item for item in items if isinstance(item, Skipped)]
        try:
            with self.db.atomic():
                self.db.conn.executemany(
                    INSERT_SKIPPED,
                    [
                        (
                            i.edge_id,
                            i.epoch,
                            i.stream,
                            i.first_seq,
                            i.last_seq,
                            i.reason,
                            stamp,
                        )
                        for i in skipped
                    ],
                )
                # Before _insert_records widens the epochs' spans.
                update_gaps(_SQLiteGaps(self.db), records, skipped)
                stored = self._insert_records(records, stamp)
                lettered = self._insert_dead_letters(letters, stamp)
                self._update_edges(records, stored, lettered, stamp)
                self._update_statuses(items, stamp)
        except sqlite3.Error as exc:
            raise DatastoreError(
                self.url, f"commit failed: {exc}", exit_code=Exit.TEMPFAIL
            ) from None
        log.debug(
            "committed %d records (%d new) and %d dead letters (%d new)",
            len(records),
            sum(stored.values()),
            len(letters),
            sum(lettered.values()),
        )
        return confirmed_ids(items)

    def _insert_records(self, records: list[Record], stamp: str) -> dict[str, int]:
        """Insert by (edge, epoch); return how many rows were new per edge."""
        groups: dict[tuple[str, str], list[Record]] = {}
        for rec in records:
            groups.setdefault((rec.edge_id, rec.epoch), []).append(rec)
        stored: dict[str, int] = {}
        conn = self.db.conn
        for (edge_id, epoch), group in groups.items():
            before = conn.total_changes
            conn.executemany(INSERT_RECORD, [_record_row(r, stamp) for r in group])
            new = conn.total_changes - before
            seqs = [r.seq for r in group]
            self.db.execute(UPSERT_EPOCH, [edge_id, epoch, min(seqs), max(seqs), new])
            stored[edge_id] = stored.get(edge_id, 0) + new
        return stored

    def _insert_dead_letters(
        self, letters: list[DeadLetter], stamp: str
    ) -> dict[str | None, int]:
        """Insert each letter; return how many were new per edge (None: unknown)."""
        lettered: dict[str | None, int] = {}
        for dl in letters:
            row = [stamp, dl.topic, dl.edge_id, dl.epoch, dl.seq, dl.reason, dl.raw]
            new = self.db.execute(INSERT_DEAD_LETTER, row).rowcount
            lettered[dl.edge_id] = lettered.get(dl.edge_id, 0) + new
        return lettered

    def _update_edges(
        self,
        records: list[Record],
        stored: dict[str, int],
        lettered: dict[str | None, int],
        stamp: str,
    ) -> None:
        newest: dict[str, str] = {}
        for rec in records:
            if rec.created_at > newest.get(rec.edge_id, ""):
                newest[rec.edge_id] = rec.created_at
        concerned = set(stored) | {e for e in lettered if e is not None}
        for edge_id in sorted(concerned):
            self.db.execute(
                UPSERT_EDGE,
                [
                    edge_id,
                    stored.get(edge_id, 0),
                    lettered.get(edge_id, 0),
                    stamp,
                    stamp,
                    newest.get(edge_id),
                ],
            )

    def _update_statuses(self, items: Sequence[Item], stamp: str) -> None:
        for item in items:
            if isinstance(item, EdgeStatus):
                row = [item.edge_id, int(item.online), stamp, item.reported_at]
                self.db.execute(UPSERT_STATUS, row + [stamp])

    def edge_summary(self) -> list[dict]:
        def read() -> list[dict]:
            return assemble_summary(
                list(self.db.query(EDGE_ROWS)),
                list(self.db.query(STATUS_ROWS)),
                list(self.db.query(EPOCH_ROWS)),
                list(self.db.query(LISTED_GAPS, [LISTED_RANGES])),
                list(self.db.query(LISTED_SKIPPED, [LISTED_RANGES])),
            )

        return self._guarded(read)

    def edge_gaps(self, edge_id: str) -> dict:
        def read() -> dict:
            return {
                "gaps": list(self.db.query(EDGE_GAPS, [edge_id])),
                "skipped": list(self.db.query(EDGE_SKIPPED, [edge_id])),
            }

        return self._guarded(read)

    def totals(self) -> dict[str, int]:
        def count() -> dict[str, int]:
            row = self.db.execute(
                "SELECT coalesce(sum(records), 0), count(*) FROM edges"
            ).fetchone()
            letters = self.db.execute("SELECT count(*) FROM dead_letters").fetchone()
            return {"records": row[0], "dead_letters": letters[0], "edges": row[1]}

        return self._guarded(count)

    def load_state(self, key: str) -> str | None:
        sql = "SELECT value FROM collector_state WHERE key = ?"
        row = self._guarded(lambda: self.db.execute(sql, [key]).fetchone())
        return row[0] if row else None

    def save_state(self, key: str, value: str) -> None:
        sql = (
            "INSERT INTO collector_state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        self._guarded(lambda: self.db.execute(sql, [key, value]))

    def _guarded(self, query):
        try:
            return query()
        except sqlite3.Error as exc:
            raise DatastoreError(
                self.url, f"query failed: {exc}", exit_code=Exit.TEMPFAIL
            ) from None

    def close(self) -> None:
        self.db.close()


class _SQLiteGaps(GapTable):
    """The gaps table as core.gaps reads and writes it, inside one batch."""

    def __init__(self, db: Database):
        self.db = db

    def span(self, edge_id: str, epoch: str) -> Range | None:
        sql = "SELECT first_seq, last_seq FROM epochs WHERE edge_id = ? AND epoch = ?"
        row = self.db.execute(sql, [edge_id, epoch]).fetchone()
        return tuple(row) if row else None

    def touching(self, edge_id: str, epoch: str, low: int, high: int) -> list[Range]:
        args = {"edge": edge_id, "epoch": epoch, "low": low, "high": high}
        return [tuple(row) for row in self.db.execute(TOUCHING_GAPS, args)]

    def skipped_over(self, edge_id: str, epoch: str, region: Range) -> list[Range]:
        args = [edge_id, epoch, region[1], region[0]]
        return [tuple(row) for row in self.db.execute(SKIPPED_OVER, args)]

    def replace(self, edge_id: str, epoch: str, change: Change) -> None:
        self.db.conn.executemany(
            "DELETE FROM gaps WHERE edge_id = ? AND epoch = ? AND first_seq = ?",
            [(edge_id, epoch, first) for first, _ in change.removed],
        )
        self.db.conn.executemany(
            "INSERT INTO gaps (edge_id, epoch, first_seq, last_seq) "
            "VALUES (?, ?, ?, ?)",
            [(edge_id, epoch, first, last) for first, last in change.added],
        )


def _record_row(rec: Record, stamp: str) -> tuple:
    return (
        rec.edge_id,
        rec.epoch,
        rec.seq,
        rec.stream,
        rec.created_at,
        int(rec.clock_unsynced),
        stamp,
        rec.payload,
    )


def _tune(db: Database, url: str) -> None:
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.enable_wal()
    if db.journal_mode != "wal":
        log.warning("datastore %s: journal mode is %s, not wal", url, db.journal_mode)
    db.execute("PRAGMA synchronous = FULL")


def _schema_version(db: Database) -> int:
    if not db["schema_migrations"].exists():
        return 0
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def _migrate(db: Database, url: str) -> None:
    if not db["schema_migrations"].exists():
        # A file of another program (an edge outbox, say) is not taken over.
        others = db.table_names()
        if others:
            raise DatastoreError(
                url,
                f"the file holds tables of another program "
                f"({', '.join(sorted(others)[:5])}); "
                "point datastore.url at a new file",
                exit_code=Exit.CONFIG,
            )
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    current = _schema_version(db)
    if current > SCHEMA_VERSION:
        raise DatastoreError(
            url,
            f"schema version {current} is newer than this build's "
            f"{SCHEMA_VERSION}; run the newer spoolmq",
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with db.atomic():
            # One statement at a time: executescript() would COMMIT first and
            # so apply the migration outside the transaction that records it.
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                [version, format_time(time.time())],
            )
        log.info("datastore %s: applied schema migration %d", url, version)

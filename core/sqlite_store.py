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
    Confirmed,
    Datastore,
    DeadLetter,
    Item,
    Record,
    Skipped,
    confirmed_ids,
)
from core.errors import DatastoreError

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
EDGE_SUMMARY = """
SELECT e.edge_id, e.records, e.dead_letters, e.first_seen, e.last_seen,
       e.last_created_at,
       coalesce((SELECT sum(p.last_seq - p.first_seq + 1 - p.records)
                 FROM epochs p WHERE p.edge_id = e.edge_id), 0) AS missing
FROM edges e ORDER BY e.edge_id
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
        try:
            with self.db.atomic():
                stored = self._insert_records(records, stamp)
                lettered = self._insert_dead_letters(letters, stamp)
                self._update_edges(records, stored, lettered, stamp)
                self.db.conn.executemany(INSERT_SKIPPED, [
                    (i.edge_id, i.epoch, i.stream, i.first_seq, i.last_seq,
                     i.reason, stamp) for i in items if isinstance(i, Skipped)])
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

    def edge_summary(self) -> list[dict]:
        return self._guarded(lambda: list(self.db.query(EDGE_SUMMARY)))

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

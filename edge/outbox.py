"""The outbox: accepted records on disk until a receipt confirms them.

Records are kept in segments: one row holds up to a few hundred records of
one stream, accepted in one transaction, with consecutive seqs. A receipt
usually covers whole segments, so forgetting confirmed records deletes whole
rows, which writes far less than deleting record by record.

Identity: `meta` holds the edge id, the epoch (random, made with the outbox)
and `next_seq`, a counter row, so a seq is never used twice even when the
table empties (SQLite reuses the largest rowid otherwise).
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from common.envelope import to_ranges
from common.exits import Exit
from edge.errors import OutboxBusy, OutboxError, OutboxFull, SpoolError

log = logging.getLogger("edge.outbox")

SCHEMA_VERSION = 1
# A wall clock before this instant has not been set: a host without a
# real-time clock boots in 1970 and steps forward once it reaches NTP.
CLOCK_FLOOR = 1767225600.0  # 2026-01-01T00:00:00Z
BUSY_TIMEOUT_S = 30.0

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch TEXT NOT NULL,
    stream TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    -- The outbox clock (seconds the daemon ran) at acceptance: ages measured
    -- on it survive a wall clock that starts in 1970 or steps back.
    -- NULL until the daemon first sees the segment: only it knows the clock.
    accepted_uptime REAL,
    priority INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX segments_by_seq ON segments (epoch, first_seq);
CREATE INDEX segments_by_priority ON segments (priority, id);
CREATE TABLE claims (claim TEXT PRIMARY KEY, records INTEGER NOT NULL);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,
    dead_at REAL NOT NULL,
    UNIQUE (epoch, seq)
);
CREATE TABLE skipped (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch TEXT NOT NULL,
    stream TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""

# Totals of what waits, kept by triggers in `meta` so that every path that
# adds or removes segments keeps them right and no check scans the table.
_TRIGGERS_V1 = (
    """CREATE TRIGGER segments_added AFTER INSERT ON segments BEGIN
        UPDATE meta SET value = CAST(value AS INTEGER) + NEW.count
            WHERE key = 'records';
        UPDATE meta SET value = CAST(value AS INTEGER) + NEW.bytes
            WHERE key = 'bytes';
    END""",
    """CREATE TRIGGER segments_removed AFTER DELETE ON segments BEGIN
        UPDATE meta SET value = CAST(value AS INTEGER) - OLD.count
            WHERE key = 'records';
        UPDATE meta SET value = CAST(value AS INTEGER) - OLD.bytes
            WHERE key = 'bytes';
    END""",
)


@dataclass(frozen=True)
class Limits:
    """How full the outbox may get, and which streams make room when it is."""

    max_records: int = 0  # 0: no limit
    max_bytes: int = 0
    default_drop: bool = False  # when_full of streams not named in `flip`
    flip: frozenset[str] = frozenset()  # streams whose when_full is the other

    @property
    def can_drop(self) -> bool:
        return self.default_drop or bool(self.flip)

    def drop_clause(self) -> tuple[str, list[str]]:
        """SQL condition on `stream` selecting droppable segments."""
        if not self.flip:
            # "x NOT IN (NULL)" is never true in SQL: every stream may go.
            return ("1", []) if self.default_drop else ("0", [])
        marks = ",".join("?" * len(self.flip))
        op = "NOT IN" if self.default_drop else "IN"
        return f"stream {op} ({marks})", sorted(self.flip)

    def over(self, records: int, bytes_: int) -> bool:
        return (bool(self.max_records) and records > self.max_records) or (
            bool(self.max_bytes) and bytes_ > self.max_bytes)


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """Ids given up on, to report to the core until a receipt covers them."""

    id: int
    epoch: str
    stream: str
    first_seq: int
    last_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """A record to accept: its stream, payload as compact JSON, edge clock."""

    stream: str
    payload: str
    created_at: float
    clock_unsynced: bool = False


@dataclass(frozen=True, slots=True)
class RecordId:
    edge_id: str
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.edge_id}:{self.epoch}:{self.seq}"


@dataclass(slots=True)
class SegmentRow:
    id: int
    epoch: str
    stream: str
    first_seq: int
    count: int
    accepted_at: float
    body: str
    priority: int = 0


def encode_body(records: Iterable[Record]) -> str:
    """One line per record: created_at, unsynced flag, payload JSON.

    Compact JSON holds no raw tab or newline, so the split is unambiguous.
    """
    return "".join(
        f"{r.created_at:.3f}\t{int(r.clock_unsynced)}\t{r.payload}\n" for r in records
    )


def decode_body(body: str) -> Iterator[tuple[float, bool, str]]:
    # Split on "\n" only: splitlines() also splits on U+2028, U+2029 and
    # U+0085, which compact JSON keeps unescaped inside strings.
    for line in body.split("\n"):
        if not line:
            continue
        created, unsynced, payload = line.split("\t", 2)
        yield float(created), unsynced == "1", payload


class Outbox:
    """The SQLite outbox file; safe to use from several processes at once."""

    def __init__(self, path: str | os.PathLike, edge_id: str, *, create=True):
        self.path = Path(path)
        self.edge_id = edge_id
        if create:
            # Imported here: salvage builds its new outbox with this class.
            from edge.salvage import salvage_if_damaged

            salvage_if_damaged(self.path, edge_id)
        self.conn = self._connect(create)
        self.epoch = self._open_identity()
        # Higher goes first; set by the caller from the streams config.
        self.priorities: dict[str, int] = {}
        self._uptime_base = self._read_uptime()
        self._uptime_since = time.monotonic()
        # Only the daemon's outbox keeps the clock; other processes leave
        # accepted_uptime NULL for the daemon to stamp, since a value they
        # derived from the last saved clock would make records look older.
        self.keeps_clock = False
        self.dropped = 0  # records dropped to make room, by this process

    # --- opening -------------------------------------------------------

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.exists():
            raise OutboxError(f"outbox {self.path} does not exist")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
            _set_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            # Debian's SQLite zeroes every freed page by default, which writes
            # each delivered segment a second time; FAST zeroes only what
            # costs no extra write.
            conn.execute("PRAGMA secure_delete=FAST")
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(
                f"cannot open outbox {self.path}: {exc}; check the path and "
                "that this user may write its directory"
            ) from None
        return conn

    def _open_identity(self) -> str:
        """Create the schema on first use; check the edge id on every use."""
        try:
            with self.transaction():
                version = self._schema_version()
                if version == 0:
                    self._create()
                elif version > SCHEMA_VERSION:
                    raise OutboxError(
                        f"outbox {self.path} has schema {version}, newer than this "
                        f"build's {SCHEMA_VERSION}; upgrade spoolmq",
                        exit_code=Exit.CONFIG,
                    )
                meta = dict(self.conn.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"outbox {self.path} is not usable: {exc}") from None
        if meta["edge_id"] != self.edge_id:
            raise OutboxError(
                f"outbox {self.path} belongs to edge {meta['edge_id']!r}, "
                f"but the config says edge_id {self.edge_id!r}; fix edge_id or "
                "outbox.path",
                exit_code=Exit.CONFIG,
            )
        return meta["epoch"]

    def _schema_version(self) -> int:
        tables = {r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            return 0
        row = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _create(self) -> None:
        for statement in _SCHEMA_V1.split(";"):
            if statement.strip():
                self.conn.execute(statement)
        for trigger in _TRIGGERS_V1:
            self.conn.execute(trigger)
        epoch = secrets.token_hex(8)
        self.conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("schema_version", str(SCHEMA_VERSION)),
                ("edge_id", self.edge_id),
                ("epoch", epoch),
                ("next_seq", "1"),
                ("records", "0"),
                ("uptime", "0"),
                ("bytes", "0"),
                ("created_at", f"{time.time():.3f}"),
            ],
        )
        log.info("created outbox %s for edge %s, epoch %s", self.path,
                 self.edge_id, epoch)

    # --- transactions --------------------------------------------------

    def transaction(self):
        return _Transaction(self)

    def close(self) -> None:
        self.conn.close()

    # --- accepting -----------------------------------------------------

    def accept(
        self,
        records: list[Record],
        *,
        claims: Iterable[str] = (),
        forget_claims: Iterable[str] = (),
        segment_records: int = 1000,
        segment_bytes: int = 262144,
        limits: Limits | None = None,
    ) -> list[RecordId]:
        """Commit records (and the spool claims they came from) in one go.

        With `limits`, a full outbox first drops the oldest segments of the
        droppable streams; if that does not make room, OutboxFull is raised
        and nothing is accepted.
        """
        with self.transaction():
            if limits is not None:
                self._make_room(records, limits)
            first = self._take_seqs(len(records))
            ids = [RecordId(self.edge_id, self.epoch, first + i)
                   for i in range(len(records))]
            self._insert_segments(records, first, segment_records, segment_bytes)
            self.conn.executemany(
                "INSERT OR REPLACE INTO claims (claim, records) VALUES (?, ?)",
                [(c, len(records)) for c in claims],
            )
            self.conn.executemany(
                "DELETE FROM claims WHERE claim = ?", [(c,) for c in forget_claims]
            )
        return ids

    def totals(self) -> tuple[int, int]:
        """(records, bytes) waiting, from the counters the triggers keep."""
        values = dict(self.conn.execute(
            "SELECT key, CAST(value AS INTEGER) FROM meta "
            "WHERE key IN ('records', 'bytes')"))
        return values["records"], values["bytes"]

    def is_full(self, limits: Limits) -> bool:
        """True when nothing more fits and no droppable stream can make room."""
        records, bytes_ = self.totals()
        return limits.over(records + 1, bytes_ + 1) and not limits.can_drop

    def _make_room(self, records: list[Record], limits: Limits) -> None:
        have_records, have_bytes = self.totals()
        need_records = len(records)
        need_bytes = sum(len(r.payload) + 20 for r in records)
        if not limits.over(have_records + need_records, have_bytes + need_bytes):
            return
        dropped = self._drop_oldest(limits, have_records + need_records,
                                    have_bytes + need_bytes)
        left_records, left_bytes = self.totals()
        if limits.over(left_records + need_records, left_bytes + need_bytes):
            streams = ", ".join(sorted({r.stream for r in records}))
            raise OutboxFull(
                f"outbox {self.path} is full ({have_records} records, "
                f"{have_bytes} bytes; limits {limits.max_records or '-'} records, "
                f"{limits.max_bytes or '-'} bytes): records of {streams} are "
                "refused; retry once the link drains the outbox")
        if dropped:
            self.dropped += dropped
            log.warning("outbox full: dropped the %d oldest records of droppable "
                        "streams to make room", dropped)

    def _drop_oldest(self, limits: Limits, records: int, bytes_: int) -> int:
        """Delete oldest droppable segments until within limits; report them."""
        if not limits.can_drop:
            return 0
        where, params = limits.drop_clause()
        cursor = self.conn.execute(
            f"SELECT id, epoch, stream, first_seq, count, bytes FROM segments "
            f"WHERE {where} ORDER BY id", params)
        victims = []
        for seg_id, epoch, stream, first_seq, count, size in cursor:
            if not limits.over(records, bytes_):
                break
            victims.append((seg_id, epoch, stream, first_seq, count))
            records, bytes_ = records - count, bytes_ - size
        cursor.close()
        return self._give_up(
            victims, "outbox full: dropped oldest (when_full: drop_oldest)")

    def _give_up(self, victims: list[tuple], reason: str) -> int:
        """Delete segments (id, epoch, stream, first_seq, count) and note
        them as skipped, inside the caller's transaction; returns records."""
        now = time.time()
        self.conn.executemany("DELETE FROM segments WHERE id = ?",
                              [(v[0],) for v in victims])
        self.conn.executemany(
            "INSERT INTO skipped (epoch, stream, first_seq, last_seq, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(epoch, stream, first, first + count - 1, reason, now)
             for _, epoch, stream, first, count in victims])
        return sum(v[4] for v in victims)

    def _take_seqs(self, n: int) -> int:
        row = self.conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + ? "
            "WHERE key = 'next_seq' RETURNING CAST(value AS INTEGER)", (n,)
        ).fetchone()
        return row[0] - n

    def _insert_segments(self, records, first_seq, max_records, max_bytes):
        now, uptime = time.time(), self.uptime() if self.keeps_clock else None
        rows = []
        for stream, start, chunk in _split(records, max_records, max_bytes):
            body = encode_body(chunk)
            rows.append((self.epoch, stream, first_seq + start, len(chunk),
                         len(body), now, uptime, self.priorities.get(stream, 0),
                         body))
        self.conn.executemany(
            "INSERT INTO segments (epoch, stream, first_seq, count, bytes, "
            "accepted_at, accepted_uptime, priority, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # --- the outbox clock -------------------------------------------------

    def _read_uptime(self) -> float:
        row = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'uptime'").fetchone()
        return float(row[0]) if row else 0.0

    def uptime(self) -> float:
        """Seconds the daemon has run on this outbox, across restarts.

        Another process sees the value the daemon last saved, so its records
        look younger, never older, than they are.
        """
        return self._uptime_base + (time.monotonic() - self._uptime_since)

    def save_uptime(self) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('uptime', ?)",
                (f"{self.uptime():.3f}",))

    # --- expiry ------------------------------------------------------------

    def expire(self, ttls: dict[str, float], keep: set[int]) -> int:
        """Drop segments whose stream's TTL passed; report them as skipped.

        Age is the outbox clock's, or the wall clock's when that was set both
        at acceptance and now and has not gone back: time a powered-off host
        spent counts only when the clock can be trusted. Segments in `keep`
        (being published) are left alone. Returns records dropped.
        """
        uptime, wall = self.uptime(), time.time()
        with self.transaction():
            # Segments a producer accepted since the last look start their
            # clock now: at most one sweep later than their true acceptance.
            self.conn.execute("UPDATE segments SET accepted_uptime = ? "
                              "WHERE accepted_uptime IS NULL", (uptime,))
        victims = []
        for stream, ttl in ttls.items():
            rows = self.conn.execute(
                "SELECT id, epoch, first_seq, count, accepted_at, accepted_uptime "
                "FROM segments WHERE stream = ? ORDER BY id", (stream,)).fetchall()
            for seg_id, epoch, first_seq, count, accepted_at, accepted_up in rows:
                if seg_id in keep or accepted_up is None:  # None: accepted just now
                    continue
                if _age(uptime - accepted_up, wall, accepted_at) >= ttl:
                    victims.append((seg_id, epoch, stream, first_seq, count))
        if not victims:
            return 0
        with self.transaction():
            return self._give_up(victims, "ttl expired")

    def committed_claims(self, claims: Iterable[str]) -> set[str]:
        """Which of these spool claims an earlier transaction committed."""
        wanted = list(claims)
        found = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            found.update(r[0] for r in self.conn.execute(
                f"SELECT claim FROM claims WHERE claim IN ({marks})", part))
        return found

    def all_claims(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT claim FROM claims")}

    def forget_claims(self, claims: Iterable[str]) -> None:
        with self.transaction():
            self.conn.executemany(
                "DELETE FROM claims WHERE claim = ?", [(c,) for c in claims])

    # --- reading for the publisher ---------------------------------------

    def segments_after(self, last_id: int, limit_records: int) -> list[SegmentRow]:
        """The oldest segments with id > last_id, about limit_records in all."""
        return self.segments_by_priority({}, limit_records, default_last=last_id)

    def segments_by_priority(self, last_ids: dict[int, int], limit_records: int,
                             default_last: int = 0) -> list[SegmentRow]:
        """Segments not yet loaded, highest priority first, oldest first.

        `last_ids` holds, per priority, the highest id already loaded.
        """
        out, total = [], 0
        priorities = [r[0] for r in self.conn.execute(
            "SELECT DISTINCT priority FROM segments ORDER BY priority DESC")]
        for priority in priorities:
            cursor = self.conn.execute(
                "SELECT id, epoch, stream, first_seq, count, accepted_at, body, "
                "priority FROM segments WHERE priority = ? AND id > ? ORDER BY id",
                (priority, last_ids.get(priority, default_last)))
            for row in cursor:
                out.append(SegmentRow(*row))
                total += row[4]
                if total >= limit_records:
                    break
            cursor.close()
            if total >= limit_records:
                break
        return out

    def segments_overlapping(self, epoch: str, first: int, last: int):
        """(id, first_seq, count) of segments holding any seq in first..last."""
        return self.conn.execute(
            "SELECT id, first_seq, count FROM segments WHERE epoch = ? "
            "AND first_seq <= ? AND first_seq + count > ?",
            (epoch, last, first),
        ).fetchall()

    def delete_segments(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self.transaction():
            self.conn.executemany(
                "DELETE FROM segments WHERE id = ?", [(i,) for i in ids])

    # --- giving up on records ----------------------------------------------

    def dead_letter(self, epoch: str, stream: str, records, reason: str) -> None:
        """Keep records no broker will carry, and note them as skipped.

        `records` are WireRecord-like (seq, created_at, payload). The skipped
        rows are what the core is told, so its accounting stays exact.
        """
        now = time.time()
        seqs = sorted(r.seq for r in records)
        with self.transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO dead_letters (epoch, seq, stream, "
                "created_at, reason, payload, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(epoch, r.seq, stream, r.created_at, reason, r.payload, now)
                 for r in records],
            )
            self._note_skipped(epoch, stream, seqs, f"dead-lettered: {reason}", now)

    def _note_skipped(self, epoch, stream, seqs, reason, now) -> None:
        self.conn.executemany(
            "INSERT INTO skipped (epoch, stream, first_seq, last_seq, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(epoch, stream, a, b, reason, now) for a, b in to_ranges(seqs)])

    def skipped_pending(self) -> list[SkippedRow]:
        return [SkippedRow(*r) for r in self.conn.execute(
            "SELECT id, epoch, stream, first_seq, last_seq, reason FROM skipped "
            "ORDER BY id")]

    def confirm_skipped(self, epoch: str, first: int, last: int) -> int:
        """Forget skipped notices a receipt fully covers; returns how many."""
        with self.transaction():
            return self.conn.execute(
                "DELETE FROM skipped WHERE epoch = ? AND first_seq >= ? "
                "AND last_seq <= ?", (epoch, first, last)).rowcount

    def data_version(self) -> int:
        """Changes whenever another connection commits to the file."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    # --- reporting -----------------------------------------------------

    def summary(self) -> dict:
        records, segments, oldest, bytes_ = self.conn.execute(
            "SELECT COALESCE(SUM(count), 0), COUNT(*), MIN(accepted_at), "
            "COALESCE(SUM(bytes), 0) FROM segments").fetchone()
        next_seq = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        dead = self.conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return {
            "records_waiting": records,
            "segments": segments,
            "bytes_waiting": bytes_,
            "oldest_accepted_at": oldest,
            "next_seq": int(next_seq),
            "dead_letters": dead,
        }


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch a file to WAL, waiting while another process creates it.

    Changing the journal mode of a file that another connection is using
    fails at once with "database is locked", without waiting for the busy
    timeout. Two processes opening a new outbox together (the daemon and a `send`)
    meet exactly that, so retry for as long as a busy transaction would wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def _age(uptime_age: float, wall_now: float, wall_then: float) -> float:
    """A segment's age: the outbox clock's, or a trustworthy wall clock's."""
    trusted = wall_then >= CLOCK_FLOOR and wall_now >= CLOCK_FLOOR
    wall_age = wall_now - wall_then
    if trusted and wall_age >= 0:
        return max(uptime_age, wall_age)
    return uptime_age


def _split(records: list[Record], max_records: int, max_bytes: int):
    """(stream, start index, records) runs of one stream within the limits."""
    start = 0
    while start < len(records):
        stream = records[start].stream
        end, size = start, 0
        while end < len(records) and records[end].stream == stream:
            size += len(records[end].payload) + 20
            if end > start and (end - start >= max_records or size > max_bytes):
                break
            end += 1
        yield stream, start, records[start:end]
        start = end


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, with SQLite errors turned into ours."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def __enter__(self):
        try:
            self.outbox.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, self.outbox.path) from None
        return self

    def __exit__(self, exc_type, exc, tb):
        conn = self.outbox.conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
                return False
            except sqlite3.Error as err:
                exc = err
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed after %s", exc)
        if isinstance(exc, sqlite3.Error):
            raise _translate(exc, self.outbox.path) from None
        return False


def _translate(exc: sqlite3.Error, path: Path) -> SpoolError:
    text = str(exc)
    if "database or disk is full" in text or getattr(exc, "sqlite_errorcode", 0) == 13:
        return OutboxBusy(f"disk full writing outbox {path}; free space and retry")
    if "locked" in text or "busy" in text:
        return OutboxBusy(f"outbox {path} is busy ({text}); retry")
    if "readonly" in text or "unable to open" in text:
        return OutboxError(f"cannot write outbox {path}: {text}")
    if isinstance(exc, sqlite3.OperationalError) and "disk I/O" in text:
        return SpoolError(f"I/O error on outbox {path}: {text}", exit_code=Exit.IOERR)
    return SpoolError(f"outbox {path}: {text}")



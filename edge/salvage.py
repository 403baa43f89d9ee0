"""A damaged outbox: keep every record still readable, set the file aside.

An outbox file can be damaged by a failing SD card, by a power cut on a file
system that does not honour fsync, or by an `outbox.path` that names another
program's database. None of that may block the edge, and none of it may
delete what is still readable. Every opening that may create the outbox (the
daemon, `send`, the Python API) first makes a cheap check of the file; when
it is damaged:

1. each readable segment, dead letter and skipped notice is copied into a
   new outbox built beside it, with its own epoch and seq: some of those
   records may already be stored at the core, whose unique key must meet
   them again under the same id. Only records accepted from now on get the
   new outbox's epoch, whose seqs start at 1;
2. the damaged file, with its -wal, -shm or -journal, is set aside as
   `<path>.damaged-<UTC time>`, byte for byte as it was;
3. the new outbox takes the configured path, and a warning says what was
   salvaged and how many rows were lost.

The check lets these through untouched: a missing file, and a zero-length one,
which is a valid empty database and what SQLite leaves between creating a
file and writing its first page, so a process creating the outbox at the same
moment is never mistaken for damage; another edge's outbox and a newer
schema, which the outbox refuses (exit 78): neither is damage, and salvaging
them would hide a configuration mistake; and a file that cannot be read for
a reason other than damage (busy, permissions, I/O), which the outbox
reports as usual.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.topics import name_problem
from edge.errors import OutboxBusy, OutboxError
from edge.outbox import SCHEMA_VERSION, Outbox

log = logging.getLogger("edge.salvage")

META_KEYS = ("schema_version", "edge_id", "epoch", "next_seq")
# SQLITE_CORRUPT and SQLITE_NOTADB: the file's contents are wrong. Any other
# error (busy, locked, permission, I/O) may pass and is not damage.
DAMAGE_CODES = {11, 26}
COMPANIONS = ("-wal", "-shm", "-journal")
LOCK_WAIT_S = 300.0
IN_USE_WAIT_S = 3.0
# Unreadable regions of one table after which the rest of it is given up.
MAX_SKIPS = 100_000
COPY_ROWS = 500
COPY_BYTES = 8 * 1024 * 1024
MAX_ROWID = 2**63 - 1
# SQLite's WAL index: the lock bytes start at 120; the "DMS" one is the 9th.
SHM_DMS_OFFSET = 128

SEGMENTS = "id, epoch, stream, first_seq, count, accepted_at, body"
DEAD_LETTERS = "id, epoch, seq, stream, created_at, reason, payload, dead_at"
SKIPPED = "id, epoch, stream, first_seq, last_seq, reason, at"

# The columns that make a file an outbox: schema 1 as first made. Columns
# added since have defaults, so an outbox made before them is still one, and
# what salvage copies leaves them at their defaults.
REQUIRED = {
    "meta": {"key", "value"},
    "segments": {
        "id",
        "epoch",
        "stream",
        "first_seq",
        "count",
        "bytes",
        "accepted_at",
        "body",
    },
    "claims": {"claim", "records"},
    "dead_letters": {
        "id",
        "epoch",
        "seq",
        "stream",
        "created_at",
        "reason",
        "payload",
        "dead_at",
    },
    "skipped": {"id", "epoch", "stream", "first_seq", "last_seq", "reason", "at"},
}

INSERTS = {
    "segments": "INSERT INTO segments (epoch, stream, first_seq, count, bytes, "
    "accepted_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "dead_letters": "INSERT OR IGNORE INTO dead_letters (epoch, seq, stream, "
    "created_at, reason, payload, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "skipped": "INSERT INTO skipped (epoch, stream, first_seq, last_seq, reason, "
    "at) VALUES (?, ?, ?, ?, ?, ?)",
}


@dataclass
class Tally:
    """What salvage read from one table of the damaged file."""

    table: str
    salvaged: int = 0
    records: int = 0  # records in the salvaged segments
    invalid: int = 0  # rows read whose contents make no sense
    unreadable: int = 0  # regions whose pages could not be read
    total: int | None = None  # rows the file says the table held, if known

    @property
    def lost(self) -> int | None:
        """Rows not salvaged; None when unreadable pages hide how many."""
        if self.total is not None:
            return max(self.invalid, self.total - self.salvaged)
        return None if self.unreadable else self.invalid


@dataclass
class Salvage:
    """What one salvage did, for the log and for tests."""

    path: Path
    aside: Path
    reason: str
    old_epoch: str | None
    new_epoch: str
    epochs: set[str] = field(default_factory=set)  # of the salvaged rows
    tallies: dict[str, Tally] = field(default_factory=dict)
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)


def mark_damaged(path: Path, exc: Exception) -> None:
    """Note that the running daemon found the outbox damaged.

    The daemon then exits; its next start salvages, since the cheap check at
    start reads too little to see damage deep inside the file.
    """
    marker = Path(f"{path}.damaged")
    marker.write_text(f"{exc}\n", encoding="utf-8")


def is_damage(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc)


def salvage_if_damaged(path: Path, edge_id: str) -> Salvage | None:
    """Salvage the outbox at `path` when it is damaged; None when it is not."""
    if damage(path, edge_id) is None:
        return None
    lock = _lock(path)
    if lock is None:
        return None  # set aside by another process meanwhile
    try:
        # Another process may have salvaged it while this one waited.
        reason = damage(path, edge_id)
        return None if reason is None else _salvage(path, edge_id, reason)
    finally:
        os.close(lock)


# --- the cheap check -------------------------------------------------------


def damage(path: Path, edge_id: str) -> str | None:
    """Why the outbox file at `path` is damaged, or None when it is not.

    Reads the schema, `meta` and the first and last row of each table:
    `PRAGMA quick_check` would read every page, too slow on a big outbox.
    TODO: damage past those rows shows only when the daemon reads it; it
    then marks the file and exits (74), and its next start salvages. Ends
    with salvage in place, without the restart.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None  # missing, or an error the outbox reports itself
    marker = Path(f"{path}.damaged")
    if marker.exists():
        return f"found damaged while running: {marker.read_text().strip()}"
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return None
    try:
        conn = _open_readonly(path)
    except sqlite3.Error:
        return None
    try:
        return _inspect(conn, edge_id)
    except sqlite3.DatabaseError as exc:
        return f"unreadable: {exc}" if _is_damage(exc) else None
    except UnicodeDecodeError:
        return "its schema holds names that are not UTF-8"
    finally:
        conn.close()


def _inspect(conn: sqlite3.Connection, edge_id: str) -> str | None:
    tables = _columns(conn)
    if not tables:
        return None  # an empty database: a new outbox
    if "meta" not in tables:
        return f"not an outbox: no meta table among {', '.join(sorted(tables))}"
    meta = _meta(conn)
    if meta is None:
        return "its meta table holds text that is not UTF-8"
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        return f"not an outbox: meta lacks {', '.join(missing)}"
    if meta["edge_id"] != edge_id:
        return None  # another edge's outbox: refused, not damage
    try:
        version = int(meta["schema_version"])
    except ValueError:
        return f"schema_version {meta['schema_version']!r} is not a number"
    if version > SCHEMA_VERSION:
        return None  # a newer spoolmq's outbox: refused, not damage
    problem = _schema_problem(version, tables)
    if problem:
        return problem
    _first_reads(conn, tables)
    return None


def _schema_problem(version: int, tables: dict[str, set[str]]) -> str | None:
    if version < 1:
        return f"schema_version {version} is unknown"
    for table, columns in REQUIRED.items():
        if table not in tables:
            return f"unknown schema: table {table} is missing"
        if not columns <= tables[table]:
            lacks = ", ".join(sorted(columns - tables[table]))
            return f"unknown schema: table {table} lacks {lacks}"
    return None


def _first_reads(conn: sqlite3.Connection, tables) -> None:
    """Read what an opening reads first; a DatabaseError here is damage.

    A truncated file fails before this: SQLite refuses a file shorter than
    its header says (unless the WAL holds the rest).
    """
    names = [t for t in REQUIRED if t in tables]
    if "sqlite_sequence" in tables:
        names.append("sqlite_sequence")
    for table in names:
        for order in ("", " DESC"):
            conn.execute(f"SELECT * FROM {table} ORDER BY rowid{order} LIMIT 1")


def _columns(conn: sqlite3.Connection) -> dict[str, set[str]]:
    names = [
        _text(r[0])
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    return {
        n: {_text(r[1]) for r in conn.execute(f'PRAGMA table_info("{n}")')}
        for n in names
    }


def _meta(conn: sqlite3.Connection) -> dict[str, str] | None:
    try:
        return {
            _text(k): _text(v) for k, v in conn.execute("SELECT key, value FROM meta")
        }
    except (UnicodeDecodeError, TypeError):
        return None


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in DAMAGE_CODES


def _open_readonly(
    path: Path, *, immutable: bool = False, lenient: bool = False
) -> sqlite3.Connection:
    """A connection that cannot change the file; text comes back as bytes.

    `immutable=1` also ignores the WAL and locks: the last resort for a file
    whose WAL or lock files themselves are beyond use. `lenient` reads a
    file shorter than its header says (SQLite refuses it otherwise), as far
    as it goes; on a read-only connection it can change nothing.
    """
    uri = path.resolve().as_uri() + ("?immutable=1" if immutable else "?mode=ro")
    conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
    conn.text_factory = bytes  # bad UTF-8 is a bad row, not a failed cursor
    conn.execute("PRAGMA cell_size_check=ON")
    if lenient:
        conn.execute("PRAGMA writable_schema=ON")
    return conn


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# --- salvaging -----------------------------------------------------------


def _lock(path: Path) -> int | None:
    """An flock on the damaged file, so that one process salvages it.

    Waited for boundedly; None when the file is gone. A process that waited
    then finds a new outbox at the path and leaves it alone.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise OutboxBusy(
                    f"outbox {path} is being salvaged by another process; retry"
                ) from None
            time.sleep(0.05)


def _refuse_in_use(path: Path, reason: str) -> None:
    """Raise OutboxBusy while another process keeps the damaged file open.

    Waits a little first: a process checking the file for damage, on its way
    to wait for this salvage, has it open for a moment.
    """
    deadline = time.monotonic() + IN_USE_WAIT_S
    while _in_use(path):
        if time.monotonic() >= deadline:
            raise OutboxBusy(
                f"outbox {path} is damaged ({reason}), but another process has "
                "it open; stop that process (edge-spooler run) and retry"
            )
        time.sleep(0.05)


def _in_use(path: Path) -> bool:
    """True while another connection has the file open in WAL mode.

    Each such connection holds a shared lock on the "DMS" byte of the -shm
    file for as long as it is open. Setting the file aside under it would
    strand what it writes from then on, so that waits for it to close.
    POSIX locks are per process: a connection of this same process is not
    seen, and none is open to a damaged file here.
    """
    try:
        fd = os.open(f"{path}-shm", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_OFFSET)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHM_DMS_OFFSET)
        return False
    finally:
        os.close(fd)


def _salvage(path: Path, edge_id: str, reason: str) -> Salvage:
    _refuse_in_use(path, reason)
    tmp = path.with_name(f"{path.name}.salvage-{secrets.token_hex(4)}")
    try:
        result = _build(path, tmp, edge_id, reason)
        # 2**-64 per salvaged epoch, but a collision would merge identities.
        if result.new_epoch in result.epochs:
            _remove_database(tmp)
            result = _build(path, tmp, edge_id, reason)
        _refuse_in_use(path, reason)
        result.aside = _set_aside(path, tmp)
        Path(f"{path}.damaged").unlink(missing_ok=True)
    except BaseException:
        _remove_database(tmp)
        raise
    _log(result)
    return result


def _build(path: Path, tmp: Path, edge_id: str, reason: str) -> Salvage:
    """A new outbox at `tmp` holding every readable row of the one at `path`."""
    source = _open_source(path)
    box = Outbox(tmp, edge_id)
    result = Salvage(path, path, reason, None, box.epoch)
    try:
        if source is not None:
            result.old_epoch = _old_epoch(source)
            _copy(source, box, result)
            _note_lost(source, box, result)
        # One self-contained file: no WAL beside it to leave behind.
        box.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        box.conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        box.close()
        if source is not None:
            source.close()
    # The damaged file's permissions, but never one this process cannot write.
    os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) | stat.S_IRUSR | stat.S_IWUSR)
    return result


LOST_REASON = "lost in a damaged outbox (some may have been stored before)"


def _note_lost(source: sqlite3.Connection, box: Outbox, result: Salvage) -> None:
    """Report the old epoch's seqs that nothing salvaged holds as skipped.

    So the core's accounting says what the edge lost, instead of counting
    nothing missing. Seqs confirmed and deleted before the damage are among
    them too, and the core keeps those stored: `records` wins over `skipped`.
    """
    epoch = result.old_epoch
    if epoch is None:
        return
    try:
        row = source.execute(
            "SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        last = int(row[0]) - 1 if row else None
    except (sqlite3.DatabaseError, ValueError, UnicodeDecodeError):
        last = None
    covered = box.conn.execute(
        "SELECT first_seq, first_seq + count - 1 FROM segments WHERE epoch = ? "
        "UNION ALL SELECT seq, seq FROM dead_letters WHERE epoch = ? "
        "UNION ALL SELECT first_seq, last_seq FROM skipped WHERE epoch = ? "
        "ORDER BY 1", (epoch, epoch, epoch)).fetchall()
    if last is None:
        # TODO: without a readable next_seq, ids after the last salvaged one
        # are not reported; ends when next_seq is also kept in each segment.
        last = max((hi for _, hi in covered), default=0)
    lost, expected = [], 1
    for lo, hi in covered:
        if lo > expected:
            lost.append((expected, lo - 1))
        expected = max(expected, hi + 1)
    if expected <= last:
        lost.append((expected, last))
    if not lost:
        return
    with box.transaction():
        box.conn.executemany(
            "INSERT INTO skipped (epoch, stream, first_seq, last_seq, reason, at) "
            "VALUES (?, 'unknown', ?, ?, ?, ?)",
            [(epoch, lo, hi, LOST_REASON, time.time()) for lo, hi in lost])
    result.lost_ranges = lost
    log.warning("outbox %s: %d ids of epoch %s were lost with the damage; they "
                "are reported to the core as skipped", result.path,
                sum(hi - lo + 1 for lo, hi in lost), epoch)


def _open_source(path: Path) -> sqlite3.Connection | None:
    """The damaged file opened read-only, or None when its header is lost."""
    for immutable in (False, True):
        try:
            conn = _open_readonly(path, immutable=immutable, lenient=True)
        except sqlite3.Error:
            continue
        try:
            _columns(conn)
            return conn
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            log.debug("reading %s (immutable=%s) failed: %s", path, immutable, exc)
            conn.close()
    return None


def _old_epoch(source: sqlite3.Connection) -> str | None:
    try:
        row = source.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return _text(row[0]) if row else None
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return None


def _copy(source: sqlite3.Connection, box: Outbox, result: Salvage) -> None:
    """Copy segments, dead letters and skipped notices, keeping their ids.

    Claims are not copied: a claim says a spool file's records are in the
    outbox, which may no longer be true of a damaged one. A claimed file
    still on disk is then taken again, under the new epoch: at worst
    duplicates with new ids, never a loss.
    """
    try:
        tables = _columns(source)
    except sqlite3.DatabaseError:
        tables = {}
    readers = (
        ("segments", SEGMENTS, _segment),
        ("dead_letters", DEAD_LETTERS, _dead_letter),
        ("skipped", SKIPPED, _skipped),
    )
    for table, columns, check in readers:
        tally = Tally(table)
        result.tallies[table] = tally
        wanted = {c.strip() for c in columns.split(",")}
        if not wanted <= tables.get(table, set()):
            continue  # nothing of ours to read in this file
        rows = _readable_rows(source, table, columns, tally)
        _insert(box, table, _checked(rows, check, tally, result.epochs))
        tally.total = _count(source, table)


def _checked(rows, check: Callable, tally: Tally, epochs: set[str]) -> Iterator:
    for row in rows:
        good = check(row)
        if good is None:
            tally.invalid += 1
            log.debug("%s row %s is not valid; lost", tally.table, row[0])
            continue
        tally.salvaged += 1
        if tally.table == "segments":
            tally.records += good[3]
        epochs.add(good[0])
        yield good


def _insert(box: Outbox, table: str, rows: Iterator[tuple]) -> None:
    """Insert in bounded transactions: the file is not in use until complete."""
    batch, size = [], 0
    for row in rows:
        batch.append(row)
        size += sum(len(v) for v in row if isinstance(v, str))
        if len(batch) >= COPY_ROWS or size >= COPY_BYTES:
            _commit(box, table, batch)
            batch, size = [], 0
    _commit(box, table, batch)


def _commit(box: Outbox, table: str, rows: list[tuple]) -> None:
    if rows:
        with box.transaction():
            box.conn.executemany(INSERTS[table], rows)


def _count(source: sqlite3.Connection, table: str) -> int | None:
    """Rows the table held, if its smallest b-tree can still be read."""
    try:
        return source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError:
        return None


# --- reading what can be read ------------------------------------------------


def _readable_rows(conn, table: str, columns: str, tally: Tally) -> Iterator[tuple]:
    """Every row of `table` that can still be read, in rowid order.

    A damaged page costs the rows it holds, not the rest: after a read fails,
    the next readable row is found by probing ever further rowids, then
    narrowing down to where reading works again.
    """
    sql = f"SELECT {columns} FROM {table} WHERE rowid > ? ORDER BY rowid"
    after = 0  # the outbox's tables number their rows from 1
    for _ in range(MAX_SKIPS):
        try:
            for row in conn.execute(sql, (after,)):
                after = row[0]
                yield row
            return
        except sqlite3.DatabaseError as exc:
            tally.unreadable += 1
            log.debug("%s: rows after rowid %d unreadable: %s", table, after, exc)
            resume = _next_readable(conn, sql + " LIMIT 1", after)
            if resume is None:
                return
            after = resume


def _next_readable(conn, probe: str, after: int) -> int | None:
    """A rowid past the unreadable region after `after`; None if none is."""
    bad, step = after, 1
    while True:  # bounded: step doubles up to the largest rowid, 63 probes
        good = min(after + step, MAX_ROWID)
        if _readable(conn, probe, good):
            break
        if good == MAX_ROWID:
            return None
        bad, step = good, step * 2
    while good - bad > 1:  # bounded: halves the gap each time, 63 probes
        mid = (bad + good) // 2
        if _readable(conn, probe, mid):
            good = mid
        else:
            bad = mid
    return good


def _readable(conn, probe: str, after: int) -> bool:
    try:
        conn.execute(probe, (after,)).fetchall()
        return True
    except sqlite3.DatabaseError:
        return False


# --- checking rows -----------------------------------------------------------


def _segment(row) -> tuple | None:
    """A segment row as the new outbox takes it, or None when it makes no sense.

    The body is checked line by line as it was written (split on newline
    alone: JSON text may hold U+2028, which str.splitlines also splits on).
    """
    _, epoch, stream, first_seq, count, accepted_at, body = row
    try:
        epoch, stream, body = _text(epoch), _text(stream), _text(body)
    except (UnicodeDecodeError, AttributeError):
        return None
    lines = body.split("\n") if isinstance(body, str) else []
    if not (lines and lines.pop() == "" and _count_ok(count, len(lines))):
        return None
    if not (
        _id_text(epoch)
        and name_problem(stream) is None
        and _seq(first_seq)
        and _number(accepted_at)
    ):
        return None
    if not all(_body_line(line) for line in lines):
        return None
    return (epoch, stream, first_seq, count, len(body), accepted_at, body)


def _body_line(line: str) -> bool:
    parts = line.split("\t", 2)
    if len(parts) != 3 or parts[1] not in ("0", "1") or not parts[2]:
        return False
    try:
        float(parts[0])
    except ValueError:
        return False
    return True


def _dead_letter(row) -> tuple | None:
    _, epoch, seq, stream, created_at, reason, payload, dead_at = row
    try:
        epoch, stream = _text(epoch), _text(stream)
        reason, payload = _text(reason), _text(payload)
    except (UnicodeDecodeError, AttributeError):
        return None
    ok = _id_text(epoch) and _seq(seq) and name_problem(stream) is None
    ok = ok and isinstance(reason, str) and isinstance(payload, str) and payload
    if not (ok and _number(created_at) and _number(dead_at)):
        return None
    return (epoch, seq, stream, created_at, reason, payload, dead_at)


def _skipped(row) -> tuple | None:
    _, epoch, stream, first_seq, last_seq, reason, at = row
    try:
        epoch, stream, reason = _text(epoch), _text(stream), _text(reason)
    except (UnicodeDecodeError, AttributeError):
        return None
    ok = _id_text(epoch) and name_problem(stream) is None and isinstance(reason, str)
    ok = ok and _seq(first_seq) and _seq(last_seq) and first_seq <= last_seq
    if not (ok and _number(at)):
        return None
    return (epoch, stream, first_seq, last_seq, reason, at)


def _id_text(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable()


def _seq(value) -> bool:
    return isinstance(value, int) and value >= 1


def _count_ok(count, lines: int) -> bool:
    return isinstance(count, int) and count == lines >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float))


# --- setting the damaged file aside --------------------------------------------


def _set_aside(path: Path, tmp: Path) -> Path:
    """Move the damaged file aside and the new outbox into its place.

    The damaged file is first linked to its new name, so the path always
    holds one of the two outboxes; its WAL and journal move before the new
    file arrives, or SQLite would apply them to it. A crash in between
    leaves the damaged file at the path, salvaged again at the next start
    (from the main file alone if its WAL had moved already: that WAL stays
    beside the first aside name), and a `.salvage-*` file to remove.
    """
    aside = _link_aside(path)
    for suffix in COMPANIONS:
        companion = Path(f"{path}{suffix}")
        if companion.exists():
            os.rename(companion, f"{aside}{suffix}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return aside


def _link_aside(path: Path) -> Path:
    """A new, unique `<path>.damaged-<UTC time>` name for the damaged file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n else ""))
        if any(os.path.lexists(f"{aside}{s}") for s in ("", *COMPANIONS)):
            continue
        try:
            os.link(path, aside)
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this file system: a plain move, which leaves
            # the path empty for a moment.
            os.rename(path, aside)
        return aside
    raise OutboxError(f"too many damaged outboxes named {path.name}.damaged-{stamp}")


def _remove_database(path: Path) -> None:
    for suffix in ("", *COMPANIONS):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log(result: Salvage) -> None:
    tallies = result.tallies
    segments = tallies.get("segments", Tally("segments"))
    lost = (
        ", ".join(
            f"{t.table} {'unknown' if t.lost is None else t.lost}"
            + (f" ({t.unreadable} unreadable regions)" if t.unreadable else "")
            for t in tallies.values()
        )
        or "unknown (the file's header is unreadable)"
    )
    log.warning(
        "outbox %s is damaged (%s): set it aside as %s and started a new outbox "
        "(epoch %s; the old one was %s); salvaged %d segments (%d records), %d "
        "dead letters, %d skipped notices, each under its original id; rows "
        "lost: %s",
        result.path,
        result.reason,
        result.aside,
        result.new_epoch,
        result.old_epoch or "unreadable",
        segments.salvaged,
        segments.records,
        tallies.get("dead_letters", Tally("")).salvaged,
        tallies.get("skipped", Tally("")).salvaged,
        lost,
    )

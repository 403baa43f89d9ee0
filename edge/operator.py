"""Operator tools: the edge's dead letters and quarantined spool files.

Both kinds of bad input stay on the edge until an operator decides (design,
guarantee 7); these functions list them and put them back or remove them,
for `edge-spooler dead-letters` and `edge-spooler quarantine`. They work
beside a running daemon:

- dead letters change in one outbox transaction each; requeued records go
  back as new segments under their original epoch and seq, which the daemon
  loads by itself as it loads what `send` commits. The core was told they
  were skipped; when they arrive after all, it stores them, and its records
  table wins over the skipped notice;
- a quarantined file moves back into its spool directory the way a producer
  puts one there: under a name no file holds, so that a producer's new file
  is never overwritten, and the daemon takes it at its next scan.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common.exits import Exit
from edge.config import SpoolConfig
from edge.errors import SpoolError
from edge.outbox import Outbox, Record, encode_body
from edge.records import clock_unsynced
from edge.spool import FAILED_DIR

log = logging.getLogger("edge.operator")

REASON_SUFFIX = ".reason"
QUERY_IDS = 500  # ids per SQL statement, well under SQLite's variable limit
MAX_NAMES = 10000  # names tried for a requeued file before giving up
# Quarantine makes names unique by appending ".N": "a.json" -> "a.json.2".
UNIQUE_SUFFIX = re.compile(r"^(?P<name>.+\.(?:json|jsonl))\.\d+\Z")


# --- dead letters ----------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A record no broker would carry, kept in the outbox's dead_letters."""

    id: int
    epoch: str
    seq: int
    stream: str
    reason: str
    dead_at: float
    payload_bytes: int


def list_dead_letters(outbox: Outbox) -> list[DeadLetter]:
    """Every dead letter, oldest first."""
    return [
        DeadLetter(*row)
        for row in outbox.conn.execute(
            "SELECT id, epoch, seq, stream, reason, dead_at, "
            "length(CAST(payload AS BLOB)) FROM dead_letters ORDER BY id"
        )
    ]


def requeue_dead_letters(
    outbox: Outbox,
    ids: list[int] | None,
    *,
    segment_records: int = 1000,
    segment_bytes: int = 262144,
) -> tuple[int, int]:
    """Put dead letters (all when `ids` is None) back as segments.

    Each keeps its epoch and seq. Returns (records, segments); nothing
    changes when an id does not exist.
    """
    with outbox.transaction():
        rows = _dead_rows(outbox, ids)
        segments = _as_segments(rows, segment_records, segment_bytes)
        outbox.conn.executemany(
            "INSERT INTO segments (epoch, stream, first_seq, count, bytes, "
            "accepted_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            segments,
        )
        _delete_dead(outbox, [r[0] for r in rows])
    log.info("requeued %d dead letters as %d segments", len(rows), len(segments))
    return len(rows), len(segments)


def purge_dead_letters(outbox: Outbox, ids: list[int] | None) -> int:
    """Delete dead letters (all when `ids` is None); returns how many."""
    with outbox.transaction():
        rows = _dead_rows(outbox, ids)
        _delete_dead(outbox, [r[0] for r in rows])
    log.info("purged %d dead letters", len(rows))
    return len(rows)


def _dead_rows(outbox: Outbox, ids: list[int] | None) -> list[tuple]:
    """(id, epoch, seq, stream, created_at, payload) of the named dead letters."""
    sql = "SELECT id, epoch, seq, stream, created_at, payload FROM dead_letters"
    if ids is None:
        return outbox.conn.execute(sql + " ORDER BY id").fetchall()
    wanted = sorted(set(ids))
    rows = []
    for i in range(0, len(wanted), QUERY_IDS):
        part = wanted[i : i + QUERY_IDS]
        marks = ",".join("?" * len(part))
        rows.extend(outbox.conn.execute(f"{sql} WHERE id IN ({marks})", part))
    missing = sorted(set(wanted) - {r[0] for r in rows})
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (
            " ..." if len(missing) > 10 else ""
        )
        raise SpoolError(
            f"no dead letter with id {shown}; nothing was changed; see "
            "edge-spooler dead-letters list",
            exit_code=Exit.DATAERR,
        )
    return sorted(rows)


def _delete_dead(outbox: Outbox, ids: list[int]) -> None:
    outbox.conn.executemany(
        "DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids]
    )


def _as_segments(rows: list[tuple], max_records: int, max_bytes: int) -> list[tuple]:
    """Segment rows: runs of consecutive seqs of one epoch and stream."""
    now = time.time()
    out, run, size = [], [], 0
    for row in sorted(rows, key=lambda r: (r[1], r[3], r[2])):
        _, epoch, seq, stream, _, payload = row
        follows = run and (run[-1][1], run[-1][3], run[-1][2] + 1) == (
            epoch,
            stream,
            seq,
        )
        fits = len(run) < max_records and size + len(payload) <= max_bytes
        if run and not (follows and fits):
            out.append(_segment(run, now))
            run, size = [], 0
        run.append(row)
        size += len(payload)
    if run:
        out.append(_segment(run, now))
    return out


def _segment(run: list[tuple], now: float) -> tuple:
    _, epoch, first_seq, stream, _, _ = run[0]
    body = encode_body(
        Record(stream, payload, created, clock_unsynced(created))
        for _, _, _, _, created, payload in run
    )
    return (epoch, stream, first_seq, len(run), len(body), now, body)


# --- quarantined spool files -------------------------------------------------


@dataclass(frozen=True)
class Quarantined:
    """A spool file the daemon could not take, in DIR/.failed/ with a reason."""

    spool: SpoolConfig
    path: Path
    size: int
    reason: str | None  # None when its .reason file is missing

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def reason_path(self) -> Path:
        return self.path.with_name(self.path.name + REASON_SUFFIX)


def list_quarantined(spools: list[SpoolConfig]) -> list[Quarantined]:
    """Every quarantined file of the configured spool dirs, by dir and name."""
    out = []
    for spool in spools:
        folder = Path(spool.dir, FAILED_DIR)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SpoolError(
                f"cannot read {folder}: {exc.strerror}", exit_code=Exit.IOERR
            ) from None
        for entry in entries:
            if not entry.name.endswith(REASON_SUFFIX):
                out.append(_quarantined(spool, Path(entry.path)))
    return out


def _quarantined(spool: SpoolConfig, path: Path) -> Quarantined:
    try:
        size = path.lstat().st_size
    except OSError:
        size = 0
    try:
        text = path.with_name(path.name + REASON_SUFFIX).read_text(
            encoding="utf-8", errors="replace"
        )
        reason = text.strip()
    except OSError:
        reason = None
    return Quarantined(spool, path, size, reason)


def find_quarantined(spools: list[SpoolConfig], names: list[str]) -> list[Quarantined]:
    """The quarantined files named by bare name or by path.

    Exit 65 when one does not exist, 64 when a bare name is in several spool
    dirs; nothing is done to any of them then.
    """
    every = list_quarantined(spools)
    found = []
    for name in dict.fromkeys(names):
        matches = [q for q in every if _matches(q, name)]
        if not matches:
            raise SpoolError(
                f"no quarantined file {name}; nothing was changed; see "
                "edge-spooler quarantine list",
                exit_code=Exit.DATAERR,
            )
        if len(matches) > 1:
            paths = ", ".join(str(q.path) for q in matches)
            raise SpoolError(
                f"{name} is quarantined in several spool dirs ({paths}); name "
                "it by its path",
                exit_code=Exit.USAGE,
            )
        found.append(matches[0])
    return found


def _matches(item: Quarantined, name: str) -> bool:
    if "/" not in name:
        return item.name == name
    return os.path.abspath(name) == os.path.abspath(item.path)


def requeue_quarantined(items: list[Quarantined]) -> list[tuple[Quarantined, Path]]:
    """Move files back into their spool dirs; returns (item, new path) pairs."""
    moved = []
    for item in items:
        target = _move_back(item)
        item.reason_path.unlink(missing_ok=True)
        moved.append((item, target))
        log.info("requeued %s as %s", item.path, target)
    _fsync_dirs(
        {p for item, target in moved for p in (item.path.parent, target.parent)}
    )
    return moved


def purge_quarantined(items: list[Quarantined]) -> int:
    """Delete quarantined files and their reasons; returns how many."""
    for item in items:
        if item.path.is_dir() and not item.path.is_symlink():
            shutil.rmtree(item.path)
        else:
            item.path.unlink(missing_ok=True)
        item.reason_path.unlink(missing_ok=True)
        log.info("purged %s", item.path)
    _fsync_dirs({item.path.parent for item in items})
    return len(items)


def requeue_name(name: str) -> str:
    """The name a quarantined file goes back under: the producer's own.

    Quarantine appended ".N" to keep names unique; without it, "a.json.2"
    would not end in .json and would never be taken again.
    """
    match = UNIQUE_SUFFIX.match(name)
    return match["name"] if match else name


def _move_back(item: Quarantined) -> Path:
    name = requeue_name(item.name)
    stem, dot, suffix = name.rpartition(".")
    folder = Path(item.spool.dir)
    for n in range(MAX_NAMES):
        candidate = name if n == 0 else f"{stem}.requeued-{n}{dot}{suffix}"
        if _move_no_replace(item.path, folder / candidate):
            return folder / candidate
    raise SpoolError(f"no free name for {name} in {folder}", exit_code=Exit.CANTCREAT)


def _move_no_replace(src: Path, dst: Path) -> bool:
    """Rename src to dst unless dst exists (a producer's new file, say)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError:
        # A directory, or a file system without hard links: check, then
        # rename; a producer renaming into this name at this instant is the
        # one case left, and producers' names rarely end in .requeued-N.
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
        return True
    os.unlink(src)
    return True


def _fsync_dirs(folders: set[Path]) -> None:
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

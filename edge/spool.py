"""Spool-directory intake: claim, commit with the claim, remove.

A producer renames a finished file into a spool directory. The spooler:

1. claims it by renaming it to a unique name under DIR/.spoolmq/ and fsyncs
   both directories, so the claim survives a power cut;
2. commits its records and the claim's name in one outbox transaction;
3. removes the claimed file, fsyncs, and forgets the claim in a later
   transaction.

After a crash, a claimed file whose name the outbox holds was committed (it
is removed); one whose name it lacks was not (it is taken again). A new file
that a producer renamed over the old name is a different file under the
spool name, never the claimed one, so it is never removed by mistake.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from edge.config import IntakeConfig, OutboxConfig, SpoolConfig
from edge.errors import OutboxBusy, OutboxFull, RecordError, SpoolError
from edge.outbox import Limits, Outbox, Record
from edge.records import clock_unsynced, parse_lines, parse_value

log = logging.getLogger("edge.spool")

CLAIM_DIR = ".spoolmq"
FAILED_DIR = ".failed"
SUFFIXES = (".json", ".jsonl")
MAX_BATCH_RECORDS = 50000
MAX_BATCH_BYTES = 32 * 1024 * 1024


def is_candidate(name: str) -> bool:
    """A finished spool file: not hidden, not .tmp, ends in .json or .jsonl."""
    return not name.startswith(".") and name.endswith(SUFFIXES)


@dataclass
class Claim:
    spool: SpoolConfig
    path: Path  # under DIR/.spoolmq/
    name: str  # the name the producer gave it

    @property
    def key(self) -> str:
        """The claim's identity in the outbox: unique per claimed file."""
        return f"{self.spool.dir}/{self.path.name}"


class SpoolIntake:
    """Moves records from spool directories into the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        spools: list[SpoolConfig],
        outbox_cfg: OutboxConfig,
        intake_cfg: IntakeConfig,
        limits: Limits | None = None,
        max_record_bytes: int = 0,
    ):
        self.outbox = outbox
        self.max_record_bytes = max_record_bytes
        self.limits = limits
        self._stranded: list[Claim] = []  # claimed, refused, name since taken
        self.spools = spools
        self.outbox_cfg = outbox_cfg
        self.intake_cfg = intake_cfg
        self._counter = itertools.count(1)
        self._token = secrets.token_hex(4)
        self._removed: list[str] = []  # claims whose files are gone
        self.accepted = 0
        self.quarantined = 0

    # --- start ---------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories and settle claims left by an earlier run."""
        for spool in self.spools:
            for sub in ("", CLAIM_DIR, FAILED_DIR):
                try:
                    Path(spool.dir, sub).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise SpoolError(f"cannot create spool dir {spool.dir}: {exc}")
        leftovers = [c for spool in self.spools for c in self._leftover_claims(spool)]
        done = self.outbox.committed_claims(c.key for c in leftovers)
        redo = [c for c in leftovers if c.key not in done]
        self._remove([c for c in leftovers if c.key in done])
        if leftovers:
            log.info("settled %d claimed files from an earlier run: %d committed "
                     "(removed), %d not (taking again)", len(leftovers),
                     len(leftovers) - len(redo), len(redo))
        if redo:
            self._take(redo)
        self._forget_stale_claims()

    def _leftover_claims(self, spool: SpoolConfig) -> list[Claim]:
        out = []
        for entry in os.scandir(Path(spool.dir, CLAIM_DIR)):
            name = entry.name.split("~", 1)[-1]
            out.append(Claim(spool, Path(entry.path), name))
        return out

    def _forget_stale_claims(self) -> None:
        """Claims in the outbox whose files no longer exist."""
        stale = [k for k in self.outbox.all_claims() if not Path(
            k.rsplit("/", 1)[0], CLAIM_DIR, k.rsplit("/", 1)[1]).exists()]
        if stale:
            self.outbox.forget_claims(stale)

    # --- scanning ------------------------------------------------------

    def scan(self) -> int:
        """Take what is waiting in the spool dirs; returns records accepted.

        Raises OutboxBusy (full, disk full, locked): the files it had claimed
        are back under their names, so producers see them wait.
        """
        if self.limits is not None and self.outbox.is_full(self.limits):
            raise OutboxFull(f"outbox {self.outbox.path} is full; spool files wait")
        claims, self._stranded = self._stranded, []
        for spool in self.spools:
            claims.extend(self._claim_new(spool, self.intake_cfg.batch_files -
                                          len(claims)))
            if len(claims) >= self.intake_cfg.batch_files:
                break
        if not claims:
            return 0
        return self._take(claims)

    def _claim_new(self, spool: SpoolConfig, limit: int) -> list[Claim]:
        claims = []
        try:
            entries = sorted(
                (e for e in os.scandir(spool.dir) if is_candidate(e.name)),
                key=lambda e: e.name,
            )
        except OSError as exc:
            log.warning("cannot read spool dir %s: %s", spool.dir, exc)
            return claims
        for entry in entries[:limit]:
            claim_name = f"{self._token}-{next(self._counter)}~{entry.name}"
            target = Path(spool.dir, CLAIM_DIR, claim_name)
            try:
                os.rename(entry.path, target)
            except FileNotFoundError:
                continue  # the producer took it back
            claims.append(Claim(spool, target, entry.name))
        if claims:
            _fsync_dir(spool.dir)
            _fsync_dir(Path(spool.dir, CLAIM_DIR))
        return claims

    def _take(self, claims: list[Claim]) -> int:
        """Parse claimed files, commit their records, remove the files."""
        before = self.accepted
        records, good, size = [], [], 0
        for i, claim in enumerate(claims):
            try:
                if len(records) >= MAX_BATCH_RECORDS or size >= MAX_BATCH_BYTES:
                    self._commit(records, good)
                    records, good, size = [], [], 0
                try:
                    taken = self._read(claim)
                except RecordError as exc:
                    self._quarantine(claim, str(exc))
                    continue
            except OutboxBusy:
                # Nothing of `good` nor from here on was committed.
                self._unclaim(good + claims[i:])
                raise
            records.extend(taken)
            size += sum(len(r.payload) for r in taken)
            good.append(claim)
        try:
            self._commit(records, good)
        except OutboxBusy:
            self._unclaim(good)
            raise
        return self.accepted - before

    def _commit(self, records: list[Record], claims: list[Claim]) -> None:
        if not claims:
            return
        self.outbox.accept(
            records,
            claims=[c.key for c in claims],
            forget_claims=self._removed,
            segment_records=self.outbox_cfg.segment_records,
            segment_bytes=self.outbox_cfg.segment_bytes,
            limits=self.limits,
        )
        self._removed = []
        self.accepted += len(records)
        log.debug("accepted %d records from %d files", len(records), len(claims))
        self._remove(claims)

    def _unclaim(self, claims: list[Claim]) -> None:
        """Put refused files back under their own names, never over a new one."""
        dirs = set()
        for claim in claims:
            target = Path(claim.spool.dir, claim.name)
            if not os.path.lexists(claim.path):
                continue
            try:
                os.link(claim.path, target)
                os.unlink(claim.path)
                dirs.update((target.parent, claim.path.parent))
            except FileExistsError:
                self._stranded.append(claim)  # taken again at the next scan
            except OSError as exc:
                log.warning("cannot put %s back: %s; it stays claimed", claim.name, exc)
                self._stranded.append(claim)
        for d in dirs:
            _fsync_dir(d)

    def _remove(self, claims: list[Claim]) -> None:
        dirs = set()
        for claim in claims:
            try:
                claim.path.unlink()
            except FileNotFoundError:
                pass
            dirs.add(claim.path.parent)
        for d in dirs:
            _fsync_dir(d)
        # Only now, with the removal durable, may the claim be forgotten.
        self._removed.extend(c.key for c in claims)

    # --- reading one file ------------------------------------------------

    def _read(self, claim: Claim) -> list[Record]:
        data, mtime = self._read_bytes(claim)
        what = claim.name
        if claim.name.endswith(".jsonl"):
            payloads = parse_lines(data, what)
        else:
            payloads = [parse_value(data, what)]
        limit = self.max_record_bytes
        for number, p in enumerate(payloads, 1):
            if limit and len(p.encode()) > limit:
                where = f" line {number}" if claim.name.endswith(".jsonl") else ""
                raise RecordError(
                    f"{claim.name}{where} holds a record of {len(p.encode())} bytes, "
                    f"over the {limit} that fit a message the broker accepts")
        unsynced = clock_unsynced(mtime)
        return [Record(claim.spool.stream, p, mtime, unsynced) for p in payloads]

    def _read_bytes(self, claim: Claim) -> tuple[bytes, float]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(claim.path, flags)
        except OSError as exc:
            raise RecordError(f"{claim.name} cannot be opened: {_kind(claim.path, exc)}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RecordError(f"{claim.name} is not a regular file")
            limit = claim.spool.max_file_bytes
            if info.st_size > limit:
                raise RecordError(
                    f"{claim.name} is {info.st_size} bytes, over the limit of {limit}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise RecordError(f"{claim.name} cannot be read: {exc}") from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise RecordError(f"{claim.name} grew over the limit of {limit} bytes")
        return data, info.st_mtime

    # --- quarantine ----------------------------------------------------

    def _quarantine(self, claim: Claim, reason: str) -> None:
        """Move a file that cannot be taken to DIR/.failed/ with a reason."""
        failed = Path(claim.spool.dir, FAILED_DIR)
        target = _unique(failed, claim.name)
        reason_path = target.with_name(target.name + ".reason")
        try:
            # The reason first: a full disk then leaves the file where it was.
            with open(reason_path, "w", encoding="utf-8") as f:
                f.write(reason + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(claim.path, target)
            _fsync_dir(failed)
        except OSError as exc:
            reason_path.unlink(missing_ok=True)
            raise OutboxBusy(f"cannot quarantine {claim.name}: {exc}") from None
        self.quarantined += 1
        log.warning("quarantined %s: %s", target, reason)


def _kind(path: Path, exc: OSError) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return str(exc)
    if stat.S_ISLNK(mode):
        return "it is a symbolic link"
    if stat.S_ISDIR(mode):
        return "it is a directory"
    return str(exc)


def _unique(folder: Path, name: str) -> Path:
    candidate = folder / name
    for n in range(1, 100000):
        if not os.path.lexists(candidate) and not os.path.lexists(
            str(candidate) + ".reason"
        ):
            return candidate
        candidate = folder / f"{name}.{n}"
    raise SpoolError(f"too many quarantined files named {name} in {folder}")


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

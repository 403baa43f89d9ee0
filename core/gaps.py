"""Gap bookkeeping: which seqs of an epoch are still missing, as ranges.

A gap is a range of seqs between 1 (where every epoch starts) and the highest
stored seq of an epoch that is neither stored nor reported skipped. The backends keep the open
gaps in a `gaps` table, updated in the transaction of each batch, so that
`status` reads a few small rows instead of scanning `records`. This module is
the arithmetic both backends share; it never touches a database.

Ranges are `(first, last)` pairs, both ends included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Range = tuple[int, int]


def merged(ranges: Iterable[Range]) -> list[Range]:
    """The ranges sorted, with overlapping and adjacent ones joined."""
    out: list[Range] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def as_ranges(seqs: Iterable[int]) -> list[Range]:
    """Seqs (in any order, repeats allowed) as merged ranges."""
    ordered = sorted(set(seqs))
    if not ordered:
        return []
    out: list[Range] = []
    first = last = ordered[0]
    for seq in ordered[1:]:
        if seq != last + 1:
            out.append((first, last))
            first = seq
        last = seq
    out.append((first, last))
    return out


def subtract(ranges: Iterable[Range], covered: Iterable[Range]) -> list[Range]:
    """What of `ranges` lies outside `covered`."""
    holes = merged(covered)
    out: list[Range] = []
    for first, last in merged(ranges):
        start = first
        for low, high in holes:
            if high < start or low > last:
                continue
            if low > start:
                out.append((start, low - 1))
            start = max(start, high + 1)
            if start > last:
                break
        if start <= last:
            out.append((start, last))
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """How one batch changes one epoch's open gaps."""

    removed: list[Range]  # gap rows to delete
    added: list[Range]  # gap rows to insert


def apply_batch(
    span: Range | None,
    stored: list[Range],
    covered: list[Range],
    touched_gaps: list[Range],
    skipped: list[Range],
) -> Change:
    """The gap rows to replace after a batch of one (edge, epoch).

    `span` is the lowest and highest stored seq before the batch (None for a
    new epoch); `stored` the batch's record seqs as ranges, duplicates
    included (a duplicate is stored already, so it lies in no gap);
    `covered` everything the batch accounts for (records and skipped);
    `touched_gaps` the open gaps that overlap `covered`; `skipped` the
    skipped ranges on file (this batch's included) that overlap the new part
    of the span.
    """
    kept = subtract(touched_gaps, covered)
    removed = [gap for gap in touched_gaps if gap not in kept]
    added = [gap for gap in kept if gap not in touched_gaps]
    for region in _new_regions(span, stored):
        added.extend(subtract([region], stored + covered + skipped))
    return Change(removed=removed, added=merged(added))


def _new_regions(span: Range | None, stored: list[Range]) -> list[Range]:
    """The parts of the epoch's span that this batch's records add."""
    if not stored:
        return []
    low, high = stored[0][0], stored[-1][1]
    if span is None:
        # Every epoch's seqs start at 1: what came before the first stored
        # seq is missing too (a damaged outbox, a lost first batch).
        return [(1, high)]
    regions = []
    if low < span[0]:
        regions.append((low, span[0] - 1))
    if high > span[1]:
        regions.append((span[1] + 1, high))
    return regions


class GapTable:
    """What a backend gives `update_epoch`: reads and writes inside its batch."""

    def lock(self, edge_id: str, epoch: str) -> None:
        """Keep other writers off this epoch's gaps until the batch commits."""

    def span(self, edge_id: str, epoch: str) -> Range | None:
        """The lowest and highest stored seq of the epoch, before this batch."""
        raise NotImplementedError

    def touching(self, edge_id: str, epoch: str, low: int, high: int) -> list[Range]:
        """The open gaps that overlap [low, high]."""
        raise NotImplementedError

    def skipped_over(self, edge_id: str, epoch: str, region: Range) -> list[Range]:
        """The skipped ranges on file that overlap `region`."""
        raise NotImplementedError

    def replace(self, edge_id: str, epoch: str, change: Change) -> None:
        """Delete `change.removed` and insert `change.added`."""
        raise NotImplementedError


def update_epoch(
    table: GapTable,
    edge_id: str,
    epoch: str,
    seqs: list[int],
    skipped: list[Range],
) -> None:
    """Bring one epoch's open gaps up to date with a batch's seqs and skips.

    Call it after the batch's skipped ranges are inserted and before the
    epoch's span is widened by its records.
    """
    stored = as_ranges(seqs)
    covered = merged(stored + skipped)
    if not covered:
        return
    span = table.span(edge_id, epoch)
    touched = table.touching(edge_id, epoch, covered[0][0], covered[-1][1])
    on_file = [
        found
        for region in _new_regions(span, stored)
        for found in table.skipped_over(edge_id, epoch, region)
    ]
    change = apply_batch(span, stored, covered, touched, on_file)
    if change.removed or change.added:
        table.replace(edge_id, epoch, change)


def update_gaps(table: GapTable, records: list, skipped: list) -> None:
    """`update_epoch` for every (edge, epoch) a batch touches, in id order.

    `records` and `skipped` are the batch's Record and Skipped items; id
    order is the lock order concurrent batches share.
    """
    seqs: dict[tuple[str, str], list[int]] = {}
    skips: dict[tuple[str, str], list[Range]] = {}
    for rec in records:
        seqs.setdefault((rec.edge_id, rec.epoch), []).append(rec.seq)
    for skip in skipped:
        key = (skip.edge_id, skip.epoch)
        skips.setdefault(key, []).append((skip.first_seq, skip.last_seq))
    for edge_id, epoch in sorted(set(seqs) | set(skips)):
        key = (edge_id, epoch)
        table.lock(edge_id, epoch)
        update_epoch(table, edge_id, epoch, seqs.get(key, []), skips.get(key, []))

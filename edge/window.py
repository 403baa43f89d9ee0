"""What is published and not yet confirmed: the window, receipts, resends.

The outbox on disk holds every accepted record; this module holds in memory
only the segments being worked on, at most about W + one batch of records,
however large the backlog. A record is *unconfirmed* from the moment it is
published until a receipt covers it. At most W records are unconfirmed, so
paho's own queue never holds more than W records either.

Each publication (a *flight*) carries a resend timer: initial delay, doubling
per attempt up to a cap. `resend_all` makes every flight due now, for when
the path is known to have lost messages.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
from dataclasses import dataclass, field

from common.envelope import WireRecord
from edge.outbox import SegmentRow, decode_body

log = logging.getLogger("edge.window")

PRUNE_FLOOR = 64  # flights kept before dead ones are pruned


class Segment:
    """One outbox row in memory: its records and which are still unconfirmed."""

    __slots__ = ("id", "epoch", "stream", "first_seq", "count", "records",
                 "unconfirmed", "sent_upto", "loaded_at", "priority")

    def __init__(self, row: SegmentRow, now: float):
        self.id = row.id
        self.epoch = row.epoch
        self.stream = row.stream
        self.first_seq = row.first_seq
        self.count = row.count
        self.records = [
            WireRecord(row.first_seq + i, created, unsynced, payload)
            for i, (created, unsynced, payload) in enumerate(decode_body(row.body))
        ]
        self.unconfirmed = set(range(row.count))
        self.sent_upto = 0  # offsets below this were published at least once
        self.loaded_at = now
        self.priority = row.priority

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass(order=True)
class Flight:
    """Records published together, and when to send them again.

    It names its segments by id, so a confirmed flight waiting for its timer
    does not keep their records in memory.
    """

    due: float
    order: int
    attempt: int = field(compare=False)
    pieces: list[tuple[int, list[int]]] = field(compare=False)
    since: float = field(compare=False, default=0.0)  # first publication

    def pending(self, segments: dict[int, Segment]) -> list[tuple[Segment, list[int]]]:
        out = []
        for seg_id, offsets in self.pieces:
            seg = segments.get(seg_id)
            if seg is None:
                continue  # wholly confirmed and dropped
            left = [o for o in offsets if o in seg.unconfirmed]
            if left:
                out.append((seg, left))
        return out


@dataclass(frozen=True)
class Chunk:
    """Records ready to go as one message: one epoch and stream."""

    epoch: str
    stream: str
    pieces: list[tuple[Segment, list[int]]]
    attempt: int
    since: float | None = None  # first publication, for a resend

    def records(self) -> list[WireRecord]:
        return [seg.records[o] for seg, offsets in self.pieces for o in offsets]

    def __len__(self) -> int:
        return sum(len(offsets) for _, offsets in self.pieces)


class Window:
    """Segments in memory, the unconfirmed count, and resend timers."""

    def __init__(self, window: int, batch_records: int, batch_bytes: int,
                 linger: float, resend_initial: float, resend_max: float):
        self.limit = window
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.resend_initial = resend_initial
        self.resend_max = resend_max
        self.segments: dict[int, Segment] = {}
        # Publication order: priority (highest first), then id.
        self._by_priority: dict[int, dict[int, Segment]] = {}
        self.last_ids: dict[int, int] = {}  # per priority, highest id loaded
        self._by_epoch: dict[str, list[tuple[int, int]]] = {}  # (first_seq, id)
        self._flights: list[Flight] = []
        self._prune_at = PRUNE_FLOOR
        self._order = itertools.count()
        self.unconfirmed = 0  # published and not yet confirmed
        self.held = 0  # records in memory not yet confirmed
        self.done: list[int] = []  # segment ids fully confirmed, to delete
        self.confirmed_total = 0
        self.resent_total = 0

    # --- loading -------------------------------------------------------

    def wants(self) -> int:
        """How many more records to load to keep W + one batch in memory."""
        return max(0, self.limit + self.batch_records - self.held)

    def add(self, rows: list[SegmentRow], now: float) -> None:
        for row in rows:
            seg = Segment(row, now)
            self.segments[seg.id] = seg
            self._by_priority.setdefault(seg.priority, {})[seg.id] = seg
            self.last_ids[seg.priority] = max(self.last_ids.get(seg.priority, 0),
                                              seg.id)
            self.held += seg.count
            bisect.insort(self._by_epoch.setdefault(seg.epoch, []),
                          (seg.first_seq, seg.id))

    # --- publishing ------------------------------------------------------

    def next_chunk(self, now: float, flush: bool = False) -> Chunk | None:
        """The next records to publish for the first time, if W allows."""
        room = min(self.limit - self.unconfirmed, self.batch_records)
        if room <= 0:
            return None
        pieces, taken, size, key, oldest = [], 0, 0, None, now
        for seg in self._in_order():
            # Records confirmed (or dead-lettered) before their first
            # publication are passed over, not published.
            while seg.sent_upto < seg.count and seg.sent_upto not in seg.unconfirmed:
                seg.sent_upto += 1
            if seg.sent_upto >= seg.count:
                continue
            if key is None:
                key, oldest = (seg.epoch, seg.stream), seg.loaded_at
            elif key != (seg.epoch, seg.stream):
                flush = True  # the run of this stream ends here: send it
                break
            offsets = []
            for o in range(seg.sent_upto, seg.count):
                cost = len(seg.records[o].payload) + 80
                if taken >= room or (taken and size + cost > self.batch_bytes):
                    break
                offsets.append(o)
                taken += 1
                size += cost
            if offsets:
                pieces.append((seg, offsets))
            if taken >= room or size >= self.batch_bytes:
                flush = True
                break
            if len(offsets) < seg.count - seg.sent_upto:
                flush = True
                break
        if not pieces:
            return None
        full = taken >= self.batch_records or size >= self.batch_bytes
        if not (flush or full or now - oldest >= self.linger):
            return None
        return Chunk(key[0], key[1], pieces, 0)

    def _in_order(self):
        for priority in sorted(self._by_priority, reverse=True):
            yield from self._by_priority[priority].values()

    def mark_published(self, chunk: Chunk, now: float) -> None:
        """Record a publication and arm its resend timer."""
        if chunk.attempt == 0:
            for seg, offsets in chunk.pieces:
                seg.sent_upto = max(seg.sent_upto, offsets[-1] + 1)
                self.unconfirmed += sum(1 for o in offsets if o in seg.unconfirmed)
        delay = min(self.resend_max, self.resend_initial * 2 ** chunk.attempt)
        since = now if chunk.since is None else chunk.since
        pieces = [(seg.id, offsets) for seg, offsets in chunk.pieces]
        heapq.heappush(self._flights, Flight(now + delay, next(self._order),
                                             chunk.attempt, pieces, since))
        # A confirmed flight stays in the heap until its timer runs out. Past
        # twice the live ones of the last pruning (plus a floor), prune the
        # dead: the heap stays near the live count, at a cost per flight
        # pushed that does not grow.
        if len(self._flights) > self._prune_at:
            self._flights = [f for f in self._flights if f.pending(self.segments)]
            heapq.heapify(self._flights)
            self._prune_at = 2 * len(self._flights) + PRUNE_FLOOR

    def due_resends(self, now: float, paused: bool = False) -> list[Chunk]:
        """Flights whose timer ran out, as chunks to publish again."""
        out = []
        while self._flights and self._flights[0].due <= now:
            flight = heapq.heappop(self._flights)
            left = flight.pending(self.segments)
            if not left:
                continue
            if paused:
                # The core is away: sending now only fills the broker's queue.
                flight.due = now + min(self.resend_max, self.resend_initial)
                heapq.heappush(self._flights, flight)
                break
            out.extend(self._regroup(left, flight.attempt + 1, flight.since))
        self.resent_total += sum(len(c) for c in out)
        return out

    def _regroup(self, pieces, attempt: int, since: float) -> list[Chunk]:
        groups: dict[tuple[str, str], list] = {}
        for seg, offsets in pieces:
            groups.setdefault((seg.epoch, seg.stream), []).append((seg, offsets))
        return [Chunk(k[0], k[1], v, attempt, since) for k, v in groups.items()]

    def resend_all(self, now: float) -> int:
        """Make every unconfirmed publication due now; returns records."""
        for flight in self._flights:
            flight.due = now
        heapq.heapify(self._flights)
        return self.unconfirmed

    # --- receipts ------------------------------------------------------

    def confirm(self, epoch: str, first: int, last: int) -> tuple[int, list]:
        """Apply one receipt range; returns (records confirmed, uncovered).

        `uncovered` lists (first, last) parts that no segment in memory holds:
        the caller looks them up in the outbox.
        """
        index = self._by_epoch.get(epoch, [])
        i = max(0, bisect.bisect_right(index, (first, float("inf"))) - 1)
        touched = []
        while i < len(index) and index[i][0] <= last:
            touched.append(self.segments[index[i][1]])
            i += 1
        confirmed = 0
        covered_to = first - 1
        uncovered = []
        for seg in touched:  # confirming may drop segments from the index
            if seg.last_seq < first:
                continue
            lo, hi = max(first, seg.first_seq), min(last, seg.last_seq)
            if lo > covered_to + 1:
                uncovered.append((covered_to + 1, lo - 1))
            covered_to = max(covered_to, hi)
            confirmed += self._confirm_in(seg, lo - seg.first_seq, hi - seg.first_seq)
        if covered_to < last:
            uncovered.append((covered_to + 1, last))
        self.confirmed_total += confirmed
        return confirmed, uncovered

    def _confirm_in(self, seg: Segment, lo: int, hi: int) -> int:
        n = 0
        for o in range(lo, hi + 1):
            if o in seg.unconfirmed:
                seg.unconfirmed.discard(o)
                self.held -= 1
                n += 1
                if o < seg.sent_upto:
                    self.unconfirmed -= 1
        if not seg.unconfirmed:
            self._drop(seg)
        return n

    def drop_offsets(self, seg: Segment, offsets: list[int]) -> None:
        """Stop carrying records that will never be sent (dead-lettered)."""
        for o in offsets:
            self._confirm_in(seg, o, o)

    def _drop(self, seg: Segment) -> None:
        del self.segments[seg.id]
        level = self._by_priority[seg.priority]
        del level[seg.id]
        if not level:
            del self._by_priority[seg.priority]
        index = self._by_epoch[seg.epoch]
        index.remove((seg.first_seq, seg.id))
        if not index:
            del self._by_epoch[seg.epoch]
        self.done.append(seg.id)

    def take_done(self) -> list[int]:
        done, self.done = self.done, []
        return done

    # --- reporting -----------------------------------------------------

    def oldest_unconfirmed_since(self) -> float | None:
        """When the oldest still-unconfirmed flight was first published."""
        live = [f.since for f in self._flights if f.pending(self.segments)]
        return min(live) if live else None

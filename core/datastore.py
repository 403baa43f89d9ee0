"""The datastore interface: the one place a backend's duties are written down.

A backend holds four things:

- `records`, one row per record, unique on `(edge_id, epoch, seq)`;
- `dead_letters`, what the core refused, with the reason and the raw bytes;
  unique on the identity when the identity is known;
- a per-edge summary kept in the same transaction as the rows it counts, so
  `status` never scans `records`;
- small named values for the collector itself (the topics it subscribed).

`store()` is the only write on the message path. It commits a whole batch in
one transaction and returns the identities the edges may now forget: every
record of the batch, including those the unique key ignored as duplicates,
and every dead letter whose identity is known. The collector acknowledges the
batch's messages to the broker only after `store()` returned.

Backends are chosen by URL scheme in `open_datastore`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.config import mask_url
from common.errors import ConfigError

# edge_id -> epoch -> seqs now in records, dead_letters or skipped.
Confirmed = dict[str, dict[str, list[int]]]

SCHEMES = ("sqlite", "postgresql")


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 2x per record
class Record:
    """One record ready to store; `created_at` is RFC 3339 UTC text."""

    edge_id: str
    epoch: str
    seq: int
    stream: str
    created_at: str
    clock_unsynced: bool
    payload: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the core refused; the identity is known for a bad record only."""

    topic: str
    reason: str
    raw: bytes
    edge_id: str | None = None
    epoch: str | None = None
    seq: int | None = None

    @property
    def identified(self) -> bool:
        return None not in (self.edge_id, self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class Skipped:
    """Ids an edge gave up on (TTL, when-full policy, dead-lettered there).

    Stored so that the core's accounting counts them apart from gaps, and
    confirmed like records, so the edge stops reporting them.
    """

    edge_id: str
    epoch: str
    stream: str
    first_seq: int
    last_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class EdgeStatus:
    """An edge's retained birth or last will: online or not, by its own word.

    `reported_at` is the edge's `ts`, kept as it said it; the time the state
    began is the core's clock when the state flipped, since a last will's
    `ts` is when the edge connected, not when it went away.
    """

    edge_id: str
    online: bool
    reported_at: str | None


Item = Record | DeadLetter | Skipped | EdgeStatus

# How many gap and skipped ranges `status` lists per edge; `gaps` lists all.
LISTED_RANGES = 20


class Datastore(ABC):
    """Where committed records live. See the module docstring for the duties."""

    #: The URL the store was opened from, password masked.
    url: str

    @abstractmethod
    def store(
        self, items: Sequence[Item], received_at: float | None = None
    ) -> Confirmed:
        """Commit records and dead letters in one transaction.

        `received_at` (seconds since the epoch, default now) is the core's
        clock for every row. Raises DatastoreError when nothing was committed;
        the caller then retries the same items later.
        """

    @abstractmethod
    def edge_summary(self) -> list[dict]:
        """One mapping per edge, by edge_id.

        Keys: edge_id, records, dead_letters, first_seen, last_seen,
        last_created_at (RFC 3339 text or None), missing (seqs from 1 to
        the highest stored of each epoch that are neither stored nor
        skipped), online (bool, None before any status message),
        online_since, epochs (per epoch: first_seq, last_seq, records,
        contiguous, missing), gaps and skipped (the first LISTED_RANGES
        ranges of each), skipped_ranges and skipped_seqs (how many in all). An edge known
        only by its status message has zero counts and no seen times.
        """

    @abstractmethod
    def edge_gaps(self, edge_id: str) -> dict:
        """Every open gap and skipped range of one edge, by epoch and seq.

        Keys: gaps (epoch, first_seq, last_seq), skipped (epoch, stream,
        first_seq, last_seq, reason).
        """

    @abstractmethod
    def totals(self) -> dict[str, int]:
        """Counts over the whole store: records, dead_letters, edges."""

    @abstractmethod
    def load_state(self, key: str) -> str | None:
        """A value saved by `save_state`, or None."""

    @abstractmethod
    def save_state(self, key: str, value: str) -> None:
        """Keep a small named value (committed before returning)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; the object is unusable afterwards."""

    def refusal(self, record: Record) -> str | None:
        """Why this backend cannot hold `record`, or None.

        The collector dead-letters a refused record on its own instead of
        letting it fail its batch (PostgreSQL's jsonb refuses `\\u0000`).
        """
        return None


def confirmed_ids(items: Sequence[Item]) -> Confirmed:
    """edge -> epoch -> seqs of every record and identified dead letter."""
    found: dict[str, dict[str, set[int]]] = {}
    for item in items:
        if isinstance(item, EdgeStatus):
            continue
        if isinstance(item, DeadLetter) and not item.identified:
            continue
        seqs = found.setdefault(item.edge_id, {}).setdefault(item.epoch, set())
        if isinstance(item, Skipped):
            seqs.update(range(item.first_seq, item.last_seq + 1))
        else:
            seqs.add(item.seq)
    return {
        edge_id: {epoch: sorted(seqs) for epoch, seqs in epochs.items()}
        for edge_id, epochs in found.items()
    }


def assemble_summary(
    edges: list[dict],
    statuses: list[dict],
    epochs: list[dict],
    gaps: list[dict],
    skipped: list[dict],
) -> list[dict]:
    """Join the rows each backend reads into `edge_summary()`'s mappings.

    `epochs` carry each epoch's gap count and first gap (`gap_count`,
    `gap_seqs`, `first_gap`); `gaps` and `skipped` are lists already limited
    per edge, with `skipped_ranges` the full count on each skipped row.
    """
    by_edge: dict[str, dict] = {}
    for row in edges:
        by_edge[row["edge_id"]] = {**_blank(row["edge_id"]), **row}
    for row in statuses:
        entry = by_edge.setdefault(row["edge_id"], _blank(row["edge_id"]))
        entry["online"] = bool(row["online"])
        entry["online_since"] = row["online_since"]
    for row in epochs:
        entry = by_edge.setdefault(row["edge_id"], _blank(row["edge_id"]))
        first_gap = row["first_gap"]
        contiguous = row["last_seq"] if first_gap is None else first_gap - 1
        entry["missing"] += row["gap_seqs"]
        entry["epochs"].append(
            {
                "epoch": row["epoch"],
                "first_seq": row["first_seq"],
                "last_seq": row["last_seq"],
                "records": row["records"],
                "contiguous": contiguous,
                "missing": row["gap_seqs"],
            }
        )
    for row in gaps:
        by_edge[row["edge_id"]]["gaps"].append(_range(row))
    for row in skipped:
        entry = by_edge.setdefault(row["edge_id"], _blank(row["edge_id"]))
        entry["skipped"].append({**_range(row), "reason": row["reason"]})
        entry["skipped_ranges"] = row["skipped_ranges"]
        entry["skipped_seqs"] = int(row["skipped_seqs"])
    return [by_edge[edge_id] for edge_id in sorted(by_edge)]


def _blank(edge_id: str) -> dict:
    return {
        "edge_id": edge_id,
        "records": 0,
        "dead_letters": 0,
        "first_seen": None,
        "last_seen": None,
        "last_created_at": None,
        "missing": 0,
        "online": None,
        "online_since": None,
        "epochs": [],
        "gaps": [],
        "skipped": [],
        "skipped_ranges": 0,
        "skipped_seqs": 0,
    }


def _range(row: dict) -> dict:
    return {
        "epoch": row["epoch"],
        "first_seq": row["first_seq"],
        "last_seq": row["last_seq"],
    }


def url_problem(url: str) -> str | None:
    """Why `url` is not a datastore URL, or None."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # an unclosed "[" of an IPv6 address
        return f"not a URL ({exc}): {mask_url(url)!r}"
    if scheme not in SCHEMES:
        allowed = " or ".join(f"{s}://" for s in SCHEMES)
        return f"must start with {allowed}, not {mask_url(url)!r}"
    if scheme == "sqlite":
        return _sqlite_url_problem(url)
    from core.postgres_store import url_problem as postgresql_url_problem

    return postgresql_url_problem(url)


def _sqlite_url_problem(url: str) -> str | None:
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        return (
            "a sqlite URL needs a file: sqlite:////abs/path.db (four slashes) "
            "or sqlite:///relative/path.db"
        )
    if url.endswith(":memory:"):
        return "an in-memory datastore would lose what it confirmed; name a file"
    return None


def sqlite_path(url: str) -> str:
    """The file a sqlite URL names (SQLAlchemy's convention)."""
    return url[len("sqlite:///") :]


def require_backend(url: str) -> None:
    """Raise ConfigError unless this build can open `url`."""
    problem = url_problem(url)
    if problem:
        raise ConfigError("datastore.url", problem)


def open_datastore(url: str, *, readonly: bool = False) -> Datastore:
    """The backend for `url`, schema migrated unless `readonly`.

    Raises DatastoreError (73) when it cannot be created or written, or (69)
    with `readonly` when it cannot be opened; ConfigError for a URL this build
    has no backend for.
    """
    require_backend(url)
    if urlsplit(url).scheme == "postgresql":
        from core.postgres_store import PostgresDatastore

        return PostgresDatastore(url, url=mask_url(url), readonly=readonly)
    from core.sqlite_store import SQLiteDatastore

    return SQLiteDatastore(sqlite_path(url), url=mask_url(url), readonly=readonly)

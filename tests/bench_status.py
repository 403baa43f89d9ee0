"""How long `core-collector status` takes on a big datastore, on both backends.

Fills a store through its own `store()` in big batches (100 edges, some
seqs left out so there are gaps, some reported skipped), then times the
status report read by a fresh read-only store, and prints the query plans.

    .venv/bin/python -m tests.bench_status [--records 1000000] [--backend both]

PostgreSQL gets a database of its own on the shared test server, dropped at
the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from core.config import StatusConfig
from core.datastore import Record, Skipped, open_datastore
from core.status import build_gaps_report, build_report
from tests.harness.stores import own_database

EDGES = 100
BATCH = 20000
RUNS = 5


def fill(url: str, total: int) -> float:
    """Store `total` records; every 997th seq is lost, every 991st skipped."""
    store = open_datastore(url)
    started = time.monotonic()
    per_edge = total // EDGES
    batch: list = []
    for edge in range(EDGES):
        edge_id = f"edge-{edge:03d}"
        for seq in range(1, per_edge + 1):
            if seq % 997 == 0:
                continue
            if seq % 991 == 0:
                batch.append(Skipped(edge_id, "ep1", "s", seq, seq, "ttl"))
                continue
            created = f"2024-05-01T00:00:{seq % 60:02d}.000Z"
            batch.append(Record(edge_id, "ep1", seq, "s", created, False, "{}"))
            if len(batch) >= BATCH:
                store.store(batch)
                batch = []
    if batch:
        store.store(batch)
    store.close()
    return time.monotonic() - started


def time_status(url: str) -> tuple[float, float, int]:
    """Best-of-RUNS seconds for status and for one edge's gaps; edges seen."""
    best_status = best_gaps = float("inf")
    edges = 0
    for _ in range(RUNS):
        started = time.monotonic()
        store = open_datastore(url, readonly=True)
        report = build_report(store, StatusConfig())
        store.close()
        best_status = min(best_status, time.monotonic() - started)
        edges = len(report["edges"])
        started = time.monotonic()
        store = open_datastore(url, readonly=True)
        build_gaps_report(store, "edge-042")
        store.close()
        best_gaps = min(best_gaps, time.monotonic() - started)
    return best_status, best_gaps, edges


def plans(url: str) -> list[str]:
    """The plan of every summary query, as the backend explains it."""
    from core import postgres_store, sqlite_store

    store = open_datastore(url, readonly=True)
    lines = []
    try:
        if url.startswith("sqlite"):
            for name in ("EPOCH_ROWS", "LISTED_GAPS", "LISTED_SKIPPED", "EDGE_GAPS"):
                sql = getattr(sqlite_store, name)
                args = ["edge-042"] if "?" in sql and name == "EDGE_GAPS" else [20]
                args = args if "?" in sql else []
                rows = store.db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
                lines.append(f"{name}: " + "; ".join(row[-1] for row in rows))
        else:
            conn = store._connection()
            for name in ("EPOCH_ROWS", "LISTED_GAPS", "EDGE_GAPS"):
                sql = getattr(postgres_store, name)
                args = ["edge-042"] if name == "EDGE_GAPS" else [20]
                args = args if "%s" in sql else None
                rows = conn.execute("EXPLAIN " + sql, args).fetchall()
                lines.append(f"{name}: " + "; ".join(r[0].strip() for r in rows))
    finally:
        store.close()
    return lines


def bench(backend: str, url: str, total: int) -> None:
    filled = fill(url, total)
    best_status, best_gaps, edges = time_status(url)
    print(
        f"{backend}: {total} records from {edges} edges filled in {filled:.1f} s; "
        f"status {best_status * 1000:.0f} ms, gaps of one edge "
        f"{best_gaps * 1000:.0f} ms (best of {RUNS}, store opened each time)"
    )
    for line in plans(url):
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql", "both"), default="both"
    )
    args = parser.parse_args()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            bench("sqlite", f"sqlite:///{Path(tmp) / 'core.db'}", args.records)
    if args.backend in ("postgresql", "both"):
        with own_database() as url:
            bench("postgresql", url, args.records)


if __name__ == "__main__":
    main()

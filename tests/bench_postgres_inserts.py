"""How fast PostgreSQL takes batches of records that may be duplicates.

Compares the two ways `core.postgres_store` could insert a batch and count
the rows that were new: psycopg 3's `executemany` (pipelined) of
`INSERT ... ON CONFLICT DO NOTHING`, against `COPY` into a staging table
followed by one `INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING`.
Each runs in a database of its own, created and dropped here.

    .venv/bin/python -m tests.bench_postgres_inserts \
        [postgresql://postgres@127.0.0.1:5432/postgres] [RECORDS] [BATCH]
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable

import psycopg

from core.datastore import Record
from core.postgres_store import MIGRATIONS

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

EXECUTEMANY = """
INSERT INTO records (edge_id, epoch, seq, stream, created_at, clock_unsynced,
                     received_at, payload)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (edge_id, epoch, seq) DO NOTHING
"""
STAGING = """
CREATE TEMP TABLE records_staging (LIKE records INCLUDING DEFAULTS)
ON COMMIT DELETE ROWS
"""
COPY = """
COPY records_staging (edge_id, epoch, seq, stream, created_at, clock_unsynced,
                      received_at, payload) FROM STDIN
"""
FROM_STAGING = """
WITH new AS (
    INSERT INTO records SELECT * FROM records_staging
    ON CONFLICT (edge_id, epoch, seq) DO NOTHING
    RETURNING edge_id
)
SELECT edge_id, count(*) FROM new GROUP BY edge_id
"""


def make_records(count: int) -> list[Record]:
    return [
        Record(
            edge_id=f"edge-{seq % 20}",
            epoch="ep1",
            seq=seq,
            stream="readings",
            created_at="2024-05-01T12:00:00.000Z",
            clock_unsynced=False,
            payload=f'{{"n":{seq},"temp":21.5,"unit":"C","sensor":"s-{seq % 7}"}}',
        )
        for seq in range(1, count + 1)
    ]


def rows(batch: list[Record], stamp: str) -> list[tuple]:
    return [
        (r.edge_id, r.epoch, r.seq, r.stream, r.created_at, r.clock_unsynced, stamp)
        + (r.payload,)
        for r in batch
    ]


def by_executemany(conn: psycopg.Connection, batch: list[Record]) -> int:
    """One executemany per edge, its rowcount the new rows of that edge."""
    stamp = "2024-05-01T12:00:01.000Z"
    groups: dict[str, list[Record]] = {}
    for rec in batch:
        groups.setdefault(rec.edge_id, []).append(rec)
    new: Counter[str] = Counter()
    with conn.transaction(), conn.cursor() as cur:
        for edge_id, group in sorted(groups.items()):
            cur.executemany(EXECUTEMANY, rows(group, stamp))
            new[edge_id] += cur.rowcount
    return sum(new.values())


def by_executemany_returning(conn: psycopg.Connection, batch: list[Record]) -> int:
    """One executemany for the batch, the new rows read from RETURNING."""
    stamp = "2024-05-01T12:00:01.000Z"
    new: Counter[str] = Counter()
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            EXECUTEMANY + " RETURNING edge_id", rows(batch, stamp), returning=True
        )
        for _ in range(len(batch)):
            for (edge_id,) in cur.fetchall():
                new[edge_id] += 1
            if not cur.nextset():
                break
    return sum(new.values())


def by_copy(conn: psycopg.Connection, batch: list[Record]) -> int:
    """COPY into the staging table, one INSERT ... SELECT counting per edge."""
    stamp = "2024-05-01T12:00:01.000Z"
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(COPY) as copy:
            for row in rows(batch, stamp):
                copy.write_row(row)
        return sum(n for _, n in cur.execute(FROM_STAGING).fetchall())


def measure(
    admin_url: str,
    name: str,
    insert: Callable[[psycopg.Connection, list[Record]], int],
    records: list[Record],
    batch: int,
) -> tuple[float, float]:
    """Seconds for all records new, then for all of them again as duplicates."""
    db = f"spoolmq_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}" TEMPLATE template0')
    try:
        url = psycopg.conninfo.make_conninfo(admin_url, dbname=db)
        with psycopg.connect(url, autocommit=True) as conn:
            for version in sorted(MIGRATIONS):
                conn.execute(MIGRATIONS[version])
            conn.execute(STAGING)
            times = []
            for expected in (len(records), 0):
                start = time.perf_counter()
                stored = 0
                for i in range(0, len(records), batch):
                    stored += insert(conn, records[i : i + batch])
                times.append(time.perf_counter() - start)
                assert stored == expected, (name, stored, expected)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return times[0], times[1]


def main(argv: list[str]) -> None:
    admin_url = argv[0] if argv else ADMIN_URL
    count = int(argv[1]) if len(argv) > 1 else 100_000
    batch = int(argv[2]) if len(argv) > 2 else 2_000
    records = make_records(count)
    print(f"{count} records in batches of {batch}, 20 edges per batch:")
    for name, insert in (
        ("executemany, one per edge (rowcount)", by_executemany),
        ("executemany, one per batch (RETURNING)", by_executemany_returning),
        ("COPY + INSERT ... SELECT (RETURNING)", by_copy),
    ):
        new, again = measure(admin_url, name, insert, records, batch)
        print(
            f"  {name:40} new: {new:6.2f} s ({count / new:8.0f}/s)   "
            f"all duplicates: {again:6.2f} s ({count / again:8.0f}/s)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

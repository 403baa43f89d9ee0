"""PostgreSQL ingest, end to end: scripts/bench --pg (or --only pg).

N real edge spoolers, each with a backlog accepted into its outbox by
``edge.api.Producer.send_many`` (bench_producer.py, 1,000 records a call)
while the spoolers are stopped, drain through one Mosquitto with the
project's config into (a) one ``core-collector run`` and (b) three in a
share group (``share_group: collectors``, client ids core-a, core-b,
core-c), each run into a new database of its own on the shared server,
dropped at the end (tests/harness/stores.py ``own_database``).

The clock runs from the first spooler's start to the poll (every 0.2 s,
``SELECT count(*) FROM records``) that sees the last row. CPU is utime+stime
from /proc: the collectors', and that of the server backends serving their
sessions (the server's own background processes, such as the WAL writer,
are not counted). Each run ends with a check that the database holds every
accepted record once: per edge, as many rows as accepted, and no key
(edge_id, epoch, seq) twice.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml
from bench_bridge import time_limit
from bench_procs import (
    BenchError,
    MosquittoBroker,
    Proc,
    Procs,
    make_records,
    measure_into,
    usage,
    wait_bounded,
    write_lines,
)
from bench_spoolmq import PRODUCER, SEND_BATCH, _env

from tests.harness.stores import own_database, postgres_unavailable

SYSTEMS = {"1 collector": ("core-1",), "share group": ("core-a", "core-b", "core-c")}
GROUP = "collectors"
POLL_S = 0.2
# A finite session, as a share group needs; longer than any run.
SESSION_EXPIRY_S = 3600


@dataclass(frozen=True)
class PgResult:
    records: int
    rate: float
    collector_cpu_s: float
    postgres_cpu_s: float | None  # None: the backends' /proc was not readable


@dataclass
class PgCell:
    results: list[PgResult] = field(default_factory=list)
    error: str | None = None

    def median(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.results]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def measure(args, scratch: Path) -> dict[str, PgCell]:
    """Every system, ``args.runs`` times, alternating; a cell per system."""
    cells = {system: PgCell() for system in SYSTEMS}
    why = postgres_unavailable()
    if why:
        for cell in cells.values():
            cell.error = f"no PostgreSQL server: {why}"
        return cells
    records = write_lines(
        scratch / f"pg-records-{args.pg_records}.jsonl",
        make_records(args.pg_records, args.seed),
    )
    total = args.pg_edges * args.pg_records
    for run in range(1, args.runs + 1):
        for system, client_ids in SYSTEMS.items():
            cell = cells[system]
            if cell.error:
                continue
            print(
                f"  postgres      {system:<16}run {run}/{args.runs}: "
                f"{args.pg_edges} edges x {args.pg_records} records ...",
                end="",
                flush=True,
            )
            workdir = scratch / f"pg-{system.replace(' ', '-')}-{run}"
            measure_into(
                cell,
                drain,
                workdir,
                records,
                args.pg_edges,
                total,
                client_ids,
                errors=(psycopg.Error,),
            )
    return cells


def drain(
    workdir: Path, records: Path, edges: int, total: int, client_ids: tuple[str, ...]
) -> PgResult:
    """One backlog drain into a database made for it and dropped after."""
    procs = Procs()
    with own_database() as url:
        # Stopped before the database is dropped, whatever happened.
        try:
            broker = MosquittoBroker("broker", workdir / "broker", procs)
            broker.start()

            # Collectors first, so every member is subscribed before a record moves.
            collectors = [
                _collector(workdir, procs, broker.port, url, client_id, client_ids)
                for client_id in client_ids
            ]
            for collector in collectors:
                collector.wait_for_log("subscribed to")

            # The backlog: every edge's records accepted, no spooler running.
            edge_yamls = [
                _edge_yaml(workdir, broker.port, f"pg-e{n}")
                for n in range(1, edges + 1)
            ]
            producers = [
                procs.add(
                    Proc(
                        f"producer-{path.stem}",
                        [sys.executable, PRODUCER, path, records, str(SEND_BATCH)],
                        workdir / f"{path.stem}-producer.log",
                        stdout=workdir / f"{path.stem}-producer.json",
                        env=_env(),
                    )
                )
                for path in edge_yamls
            ]
            for producer in producers:
                code = producer.wait(time_limit(total))
                if code != 0:
                    raise BenchError(
                        f"{producer.name} exited {code}; log {producer.log}"
                    )

            with psycopg.connect(url, autocommit=True) as conn:
                backends = _backends(conn)
                before = [usage(c.pid).cpu_s for c in collectors]
                pg_before = _cpu_s(backends)
                began = time.time()
                for path in edge_yamls:
                    procs.add(
                        Proc(
                            "edge-spooler",
                            [sys.executable, "-m", "edge", "run", "-c", path],
                            workdir / f"{path.stem}-spooler.log",
                            env=_env(),
                            cwd=workdir,
                        )
                    )
                wait_bounded(
                    lambda: _stored(conn, procs) >= total,
                    time_limit(total),
                    f"{total} records stored",
                    interval=POLL_S,
                )
                ended = time.time()
                cpu = sum(usage(c.pid).cpu_s - b for c, b in zip(collectors, before))
                pg_after = _cpu_s(backends)
                _check(conn, [p.stem for p in edge_yamls], total // edges)
        finally:
            procs.stop_all()
    pg_cpu = None if pg_before is None or pg_after is None else pg_after - pg_before
    return PgResult(total, total / (ended - began), cpu, pg_cpu)


def _collector(workdir, procs, port, url, client_id, members) -> Proc:
    config = {
        "broker": {"host": "127.0.0.1", "port": port, "protocol": 5},
        "datastore": {"url": url},
        "client_id": client_id,
    }
    if len(members) > 1:
        config["share_group"] = GROUP
        config["broker"]["session_expiry"] = SESSION_EXPIRY_S
    path = workdir / f"{client_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return procs.add(
        Proc(
            client_id,
            [sys.executable, "-m", "core", "run", "-c", path],
            workdir / f"{client_id}.log",
            env=_env(),
            cwd=workdir,
        )
    )


def _edge_yaml(workdir: Path, port: int, edge_id: str) -> Path:
    spool = workdir / f"{edge_id}-spool"
    spool.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{edge_id}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "edge_id": edge_id,
                "broker": {"host": "127.0.0.1", "port": port, "protocol": 5},
                "outbox": {"path": str(workdir / f"{edge_id}-outbox.db")},
                "spool": [{"dir": str(spool), "stream": "spooled"}],
            }
        )
    )
    return path


def _stored(conn: psycopg.Connection, procs: Procs) -> int:
    for proc in procs.started:
        if not proc.name.startswith("producer") and not proc.running:
            raise BenchError(
                f"{proc.name} exited {proc.popen.returncode}; log {proc.log}"
            )
    if not conn.execute("SELECT to_regclass('records') IS NOT NULL").fetchone()[0]:
        return 0
    return conn.execute("SELECT count(*) FROM records").fetchone()[0]


def _backends(conn: psycopg.Connection) -> list[int]:
    """The server processes of every other session on this run's database."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return [pid for (pid,) in rows]


def _cpu_s(pids: list[int]) -> float | None:
    # NOTE: the server must run on this host and its /proc be readable (root,
    # or the postgres user); otherwise its CPU is not reported.
    try:
        return sum(usage(pid).cpu_s for pid in pids) if pids else None
    except BenchError:
        return None


def _check(conn: psycopg.Connection, edge_ids: list[str], per_edge: int) -> None:
    rows, keys = conn.execute(
        "SELECT count(*), count(DISTINCT (edge_id, epoch, seq)) FROM records"
    ).fetchone()
    if rows != keys:
        raise BenchError(f"{rows - keys} duplicate keys among {rows} rows")
    found = dict(
        conn.execute(
            "SELECT edge_id, count(DISTINCT payload->>'rid') FROM records "
            "GROUP BY edge_id"
        ).fetchall()
    )
    wanted = dict.fromkeys(edge_ids, per_edge)
    if found != wanted or rows != per_edge * len(edge_ids):
        raise BenchError(
            f"database holds {rows} rows, per edge {found}; accepted {wanted}"
        )


# --- The table --------------------------------------------------------------------

COLUMNS = [
    ("postgres", 14, "<"),
    ("collectors", 10, ">"),
    ("records", 9, ">"),
    ("records/s", 10, ">"),
    ("collector CPU s/100k", 21, ">"),
    ("PostgreSQL CPU s/100k", 22, ">"),
]


def print_table(args, cells: dict[str, PgCell]) -> None:
    print()
    print(_row([name for name, _, _ in COLUMNS]))
    print(_row(["-" * width for _, width, _ in COLUMNS]))
    for system, cell in cells.items():
        members = str(len(SYSTEMS[system]))
        if cell.error or not cell.results:
            print(_row([system, members, f"failed: {cell.error or 'no run'}"]))
            continue
        count = cell.results[0].records
        pg = cell.median("postgres_cpu_s")
        print(
            _row(
                [
                    system,
                    members,
                    f"{count:,}",
                    f"{cell.median('rate'):,.0f}",
                    f"{cell.median('collector_cpu_s') / count * 1e5:.2f}",
                    f"{pg / count * 1e5:.2f}" if pg is not None else "n/a",
                ]
            )
        )
    print()
    print(
        f"postgres: {args.pg_edges} edge-spoolers x {args.pg_records} records "
        "accepted while stopped, then drained through one Mosquitto into a new"
    )
    print(
        "  database; records/s from the first spooler start to the poll (0.2 s) "
        "that sees the last row. CPU:"
    )
    print(
        "  the collectors' and their server backends' utime+stime "
        "(n/a: backends' /proc not readable here)."
    )


def _row(values: list[str]) -> str:
    return "  ".join(
        f"{v:{align}{width}}" for v, (_, width, align) in zip(values, COLUMNS)
    ).rstrip()

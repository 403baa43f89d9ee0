"""spoolmq itself: Producer.send_many -> edge-spooler -> Mosquitto -> collector.

Every process is the real one of this checkout: ``edge-spooler run`` and
``core-collector run`` (as ``python -m edge`` / ``python -m core``) with the
shipped defaults, receipts on, a Mosquitto with the project's config, and a
producer process (bench_producer.py) calling ``edge.api.Producer.send_many``.
The clock runs from the first record accepted (steady state) or from the
spooler's start (backlog) to the moment the core's SQLite datastore, polled
read-only, holds the last record.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import yaml
from bench_bridge import Result, time_limit
from bench_procs import (
    LOOPBACK,
    BenchError,
    MosquittoBroker,
    Proc,
    Procs,
    Site,
    Usage,
    usage,
    wait_bounded,
)

ROOT = Path(__file__).resolve().parents[2]
PRODUCER = Path(__file__).resolve().parent / "bench_producer.py"
EDGE_ID = "bench-edge"
CLIENT_ID = "bench-core"
SEND_BATCH = 1000  # records per send_many: one commit each
DB_POLL_S = 0.02


class Pipeline:
    """A broker, a collector and (once started) a spooler, in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        procs: Procs,
        *,
        edge_site: Site = LOOPBACK,
        core_site: Site = LOOPBACK,
        codec: str = "json",
    ) -> None:
        self.codec = codec
        self.workdir = workdir
        self.procs = procs
        self.edge_site = edge_site
        self.core_site = core_site
        self.db = workdir / "core.db"
        self.broker = MosquittoBroker(
            "broker", workdir / "broker", procs, site=core_site
        )
        self.spooler: Proc | None = None
        self.edge_yaml = workdir / "edge.yaml"

    def start_core(self) -> None:
        """Broker and collector; returns once the collector has subscribed."""
        self.broker.start()
        core_yaml = self.workdir / "core.yaml"
        core_yaml.write_text(
            yaml.safe_dump(
                {
                    "broker": {
                        "host": self.core_site.host,
                        "port": self.broker.port,
                        "protocol": 5,
                    },
                    "datastore": {"url": f"sqlite:///{self.db}"},
                    "client_id": CLIENT_ID,
                }
            )
        )
        collector = self.procs.add(
            self._daemon("core-collector", "core", core_yaml, self.core_site)
        )
        collector.wait_for_log("subscribed to")
        spool = self.workdir / "spool"
        spool.mkdir(exist_ok=True)
        self.edge_yaml.write_text(
            yaml.safe_dump(
                {
                    "edge_id": EDGE_ID,
                    "broker": {
                        "host": self.core_site.host,
                        "port": self.broker.port,
                        "protocol": 5,
                    },
                    "outbox": {"path": str(self.workdir / "outbox.db")},
                    "publish": {"codec": self.codec},
                    "spool": [{"dir": str(spool), "stream": "spooled"}],
                }
            )
        )

    def start_spooler(self, *, wait_connected: bool = True) -> Proc:
        self.spooler = self.procs.add(
            self._daemon("edge-spooler", "edge", self.edge_yaml, self.edge_site)
        )
        if wait_connected:
            self.spooler.wait_for_log("connected to")
        return self.spooler

    def produce(self, records: Path, count: int) -> Proc:
        return self.procs.add(
            Proc(
                "producer",
                self.edge_site.argv(
                    [sys.executable, PRODUCER, self.edge_yaml, records, SEND_BATCH]
                ),
                self.workdir / "producer.log",
                stdout=self.workdir / "producer.json",
                env=_env(),
            )
        )

    def producer_report(self, proc: Proc, count: int) -> dict:
        code = proc.wait(time_limit(count))
        if code != 0:
            raise BenchError(f"producer exited {code}; log {proc.log}")
        report = json.loads((self.workdir / "producer.json").read_text())
        if report["accepted"] != count:
            raise BenchError(f"producer accepted {report['accepted']} of {count}")
        return report

    def wait_stored(self, count: int) -> float:
        """Wall-clock time at which the datastore was seen holding ``count``."""
        with contextlib.ExitStack() as stack:
            db = []

            def stored() -> bool:
                for proc in self.procs.started:
                    if (
                        proc.name in ("edge-spooler", "core-collector")
                        and not proc.running
                    ):
                        raise BenchError(
                            f"{proc.name} exited "
                            f"{proc.popen.returncode}; log {proc.log}"
                        )
                if not db:
                    db.extend(_open_ro(self.db, stack))
                    if not db:
                        return False
                row = _stored_count(db[0])
                return row is not None and row >= count

            wait_bounded(
                stored, time_limit(count), f"{count} records stored", interval=DB_POLL_S
            )
            return time.time()

    def check_stored(self, count: int) -> None:
        with contextlib.ExitStack() as stack:
            conns = _open_ro(self.db, stack)
            rows = (
                conns[0]
                .execute(
                    "SELECT count(*), count(DISTINCT json_extract(payload, '$.rid')) "
                    "FROM records WHERE edge_id = ?",
                    (EDGE_ID,),
                )
                .fetchone()
            )
        if tuple(rows) != (count, count):
            raise BenchError(
                f"datastore holds {rows[0]} rows, {rows[1]} distinct "
                f"records; {count} were accepted"
            )

    def _daemon(self, name: str, module: str, config: Path, site: Site) -> Proc:
        return Proc(
            name,
            site.argv([sys.executable, "-m", module, "run", "-c", config]),
            self.workdir / f"{name}.log",
            env=_env(),
            cwd=self.workdir,
        )


def _env() -> dict[str, str]:
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def _open_ro(path: Path, stack: contextlib.ExitStack) -> list[sqlite3.Connection]:
    if not path.exists():
        return []
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    stack.callback(conn.close)
    return [conn]


def _stored_count(conn: sqlite3.Connection) -> int | None:
    # The collector keeps per-edge counts in the transaction of each batch,
    # so this never scans the records table.
    try:
        row = conn.execute(
            "SELECT records FROM edges WHERE edge_id = ?", (EDGE_ID,)
        ).fetchone()
    except sqlite3.OperationalError:
        return None  # tables not made yet
    return row[0] if row else None


def steady(
    workdir: Path,
    records: Path,
    count: int,
    *,
    edge_site: Site = LOOPBACK,
    core_site: Site = LOOPBACK,
    codec: str = "json",
) -> Result:
    """Producer and the whole pipeline running together."""
    procs = Procs()
    try:
        pipe = Pipeline(
            workdir, procs, edge_site=edge_site, core_site=core_site, codec=codec
        )
        pipe.start_core()
        spooler = pipe.start_spooler()
        before = usage(spooler.pid)
        producer = pipe.produce(records, count)
        ended = pipe.wait_stored(count)
        used = usage(spooler.pid) - before
        report = pipe.producer_report(producer, count)
        pipe.check_stored(count)
        return Result(count, ended - report["first"], used + _producer_usage(report))
    finally:
        procs.stop_all()


def backlog(
    workdir: Path,
    records: Path,
    count: int,
    *,
    edge_site: Site = LOOPBACK,
    core_site: Site = LOOPBACK,
    codec: str = "json",
) -> Result:
    """Records accepted into the outbox with the spooler stopped, then drained.

    The clock starts when the spooler is started; the edge's CPU and disk
    count both the accepting and the draining.
    """
    procs = Procs()
    try:
        pipe = Pipeline(
            workdir, procs, edge_site=edge_site, core_site=core_site, codec=codec
        )
        pipe.start_core()
        report = pipe.producer_report(pipe.produce(records, count), count)
        began = time.time()
        spooler = pipe.start_spooler(wait_connected=False)
        ended = pipe.wait_stored(count)
        used = usage(spooler.pid)
        pipe.check_stored(count)
        return Result(count, ended - began, used + _producer_usage(report))
    finally:
        procs.stop_all()


def _producer_usage(report: dict) -> Usage:
    return Usage(report["cpu_s"], report["write_bytes"], 0)


def idle_spooler(workdir: Path, procs: Procs) -> Proc:
    """A spooler with an empty outbox, connected, with a collector listening."""
    pipe = Pipeline(workdir, procs)
    pipe.start_core()
    return pipe.start_spooler()

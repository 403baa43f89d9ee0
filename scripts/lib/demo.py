"""The demo behind scripts/demo; see that file. Options: --help."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.broker import Broker  # noqa: E402
from tests.harness.ulb import R1_PATH, read_readings  # noqa: E402

VENV_BIN = Path(sys.executable).parent
EDGE_ID = "demo-edge"
DRAIN_TIMEOUT_S = 180.0


def main() -> int:
    args = parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="spoolmq-demo-"))
    scratch.mkdir(parents=True, exist_ok=True)
    readings = list(read_readings(R1_PATH))
    print(f"spoolmq demo: {len(readings)} readings from {R1_PATH.relative_to(ROOT)}")
    print(f"scratch folder: {scratch}")

    broker = Broker()
    broker.start()
    print(f"broker: mosquitto pid {broker.pid} on 127.0.0.1:{broker.port}")
    core_cfg, edge_cfg, spool = write_configs(scratch, broker.port)
    procs = {}
    try:
        procs["collector"] = start(scratch, "collector", "core-collector", core_cfg)
        procs["spooler"] = start(scratch, "spooler", "edge-spooler", edge_cfg)
        outage = replay(readings, spool, args.rate, broker, args.outage)
        print(f"replayed {len(readings)} spool files; broker was down "
              f"{outage:.1f} s mid-way")
        started = time.monotonic()
        stored = wait_for_drain(scratch / "core.db", len(readings), procs)
        print(f"drained in {time.monotonic() - started:.1f} s after the last file")
    finally:
        for name in ("spooler", "collector"):
            if name in procs:
                stop(procs[name])
        broker.stop()
    return report(readings, stored, scratch)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=600.0,
                        help="readings written per second (default 600)")
    parser.add_argument("--outage", type=float, default=3.0,
                        help="seconds the broker is stopped mid-way (default 3)")
    parser.add_argument("--scratch", help="folder for configs, databases, logs")
    return parser.parse_args()


def write_configs(scratch: Path, port: int):
    spool = scratch / "spool" / "readings"
    core = scratch / "core.yaml"
    core.write_text(
        f"broker: {{host: 127.0.0.1, port: {port}, protocol: 5}}\n"
        f'datastore: {{url: "sqlite:///{scratch}/core.db"}}\n'
        "client_id: demo-core\n"
    )
    edge = scratch / "edge.yaml"
    edge.write_text(
        f"edge_id: {EDGE_ID}\n"
        f"broker: {{host: 127.0.0.1, port: {port}, protocol: 5,"
        " reconnect_min: 0.5, reconnect_max: 2}\n"
        f"outbox: {{path: {scratch}/outbox.db}}\n"
        f"spool:\n  - {{dir: {spool}, stream: readings}}\n"
        "publish: {resend_initial: 10}\n"
    )
    return core, edge, spool


def start(scratch: Path, name: str, command: str, config: Path):
    log = open(scratch / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(VENV_BIN / command), "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=scratch,
    )
    print(f"{name}: pid {proc.pid}, log {scratch / (name + '.log')}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def replay(readings, spool: Path, rate: float, broker: Broker, outage: float):
    """Write each reading as a spool file by the producer protocol."""
    spool.mkdir(parents=True, exist_ok=True)
    half = len(readings) // 2
    began = time.monotonic()
    down = 0.0
    for i, reading in enumerate(readings):
        if i == half and outage > 0:
            broker.stop()
            print(f"broker stopped at reading {i}; starting it in {outage:.0f} s")
            stopped = time.monotonic()
        if i > half and down == 0.0 and outage > 0 and \
                time.monotonic() - stopped >= outage:
            broker.start()
            down = time.monotonic() - stopped
            print(f"broker started again at reading {i}, pid {broker.pid}")
        write_spool_file(spool, f"r{i + 1:05d}.json", reading)
        lag = began + (i + 1) / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    if outage > 0 and down == 0.0:
        time.sleep(max(0.0, outage - (time.monotonic() - stopped)))
        broker.start()
        down = time.monotonic() - stopped
    return down


def write_spool_file(spool: Path, name: str, value) -> None:
    tmp = spool / f".{name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, spool / name)


def wait_for_drain(db: Path, expected: int, procs) -> list[dict]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    rows: list[dict] = []
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"demo: the {name} exited with {proc.returncode}; "
                                 "see its log in the scratch folder")
        rows = stored_rows(db)
        if len(rows) >= expected:
            time.sleep(1.0)  # let late duplicates show, if there were any
            return stored_rows(db)
        time.sleep(0.5)
    print(f"demo: gave up waiting after {DRAIN_TIMEOUT_S:.0f} s", file=sys.stderr)
    return rows


def stored_rows(db: Path) -> list[dict]:
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return [json.loads(p) for (p,) in conn.execute(
                "SELECT payload FROM records WHERE edge_id = ?", (EDGE_ID,))]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return []  # the collector has not created its tables yet


def report(readings, stored, scratch: Path) -> int:
    key = lambda r: (r["node_id"], r["seq"])  # noqa: E731 - unique in R1
    wanted = {key(r): r for r in readings}
    seen: dict = {}
    for row in stored:
        seen[key(row)] = seen.get(key(row), 0) + 1
    duplicates = sum(n - 1 for n in seen.values())
    missing = len(set(wanted) - set(seen))
    unexpected = len(set(seen) - set(wanted))
    altered = sum(1 for row in stored if key(row) in wanted and row != wanted[key(row)])
    print()
    print(f"{'readings in file':<20}{len(readings):>8}")
    print(f"{'records stored':<20}{len(stored):>8}")
    print(f"{'duplicates':<20}{duplicates:>8}")
    print(f"{'missing':<20}{missing:>8}")
    if unexpected or altered:
        print(f"{'unexpected':<20}{unexpected:>8}")
        print(f"{'altered':<20}{altered:>8}")
    ok = (len(stored) == len(readings) and not duplicates and not missing
          and not unexpected and not altered)
    print()
    print("OK: every reading stored exactly once" if ok else
          f"FAILED: see the logs in {scratch}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

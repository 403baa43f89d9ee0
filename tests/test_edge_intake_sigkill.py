"""kill -9 of the real daemon while producers write spool files.

The daemon runs as users run it (`python -m edge run -c edge.yaml`) with its
broker down, which is normal for an edge. A producer thread writes 3,000 spool
files by the protocol while the daemon is killed with SIGKILL at seeded
pseudo-random moments and started again. At the end every record is in the
outbox exactly once and the spool directory is empty.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from edge.outbox import Outbox, decode_body
from edge.spool import CLAIM_DIR, FAILED_DIR

EDGE = "pi-017"
FILES = 3000
KILLS = 8
SEED = 20261204

# --- fixtures ------------------------------------------------------------


def free_port() -> int:
    """A loopback port where nothing listens (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def produce(folder: Path, name: str, data: bytes) -> None:
    """The producer protocol: hidden .tmp name, fsync, rename."""
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / name)


class Producer(threading.Thread):
    """Writes FILES spool files in small bursts; remembers every id it wrote."""

    def __init__(self, folder: Path, rng: random.Random):
        super().__init__(daemon=True)
        self.folder = folder
        self.rng = rng
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for i in range(FILES):
                if self.stop.is_set():
                    return
                self._write(i)
                if i % 40 == 39:
                    time.sleep(0.06)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _write(self, i: int) -> None:
        lines = self.rng.randint(1, 5)
        records = [
            {"id": f"{i}.{j}", "pad": "x" * self.rng.randint(0, 200)}
            for j in range(lines)
        ]
        self.ids.extend(r["id"] for r in records)
        if lines == 1 and self.rng.random() < 0.5:
            produce(self.folder, f"r{i:05}.json", json.dumps(records[0]).encode())
        else:
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
            produce(self.folder, f"r{i:05}.jsonl", data)


@pytest.fixture
def edge_config(tmp_path) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(
        f"edge_id: {EDGE}\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}, reconnect_min: 2}}\n"
        f"outbox: {{path: '{tmp_path}/outbox.db', segment_records: 50}}\n"
        f"spool:\n  - {{dir: '{tmp_path}/spool', stream: readings}}\n"
        "intake: {scan_interval: 0.05, batch_files: 60}\n"
    )
    return path


@pytest.fixture
def daemons(tmp_path, edge_config):
    """Start daemons with `start()`; every one still alive is killed at the end."""
    started: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start() -> subprocess.Popen:
        log = tmp_path / f"run-{len(started)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "-c", str(edge_config)],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        started.append(proc)
        logs.append(log)
        return proc

    start.logs = logs
    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def spool_is_empty(spool: Path) -> bool:
    names = [n for n in os.listdir(spool) if n not in (CLAIM_DIR, FAILED_DIR)]
    return not names and not os.listdir(spool / CLAIM_DIR)


def stored_ids(outbox_path: Path) -> Counter:
    box = Outbox(outbox_path, EDGE)
    try:
        ids = Counter()
        for seg in box.segments_after(0, 10**9):
            for _, _, payload in decode_body(seg.body):
                ids[json.loads(payload)["id"]] += 1
        return ids
    finally:
        box.close()


# --- the test ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_intake_neither_loses_nor_duplicates_a_record(tmp_path, daemons):
    rng = random.Random(SEED)
    spool = tmp_path / "spool"
    spool.mkdir()
    producer = Producer(spool, random.Random(SEED + 1))

    # Kill the daemon at pseudo-random moments while the producer writes.
    producer.start()
    try:
        for n in range(KILLS):
            proc = daemons()
            if rng.random() < 0.7:  # else kill it while it may still settle
                assert wait_for(
                    lambda: b" started:" in daemons.logs[-1].read_bytes(), 10
                ), daemons.logs[-1].read_text()
            time.sleep(rng.uniform(0.05, 0.6))
            if n % 2:  # aim inside the claim-commit-remove steps
                wait_for(lambda: os.listdir(spool / CLAIM_DIR), 0.3, step=0.001)
            assert proc.poll() is None, daemons.logs[-1].read_text()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
    finally:
        producer.join(60)
        producer.stop.set()
    assert producer.error is None
    assert not producer.is_alive()

    # A last run takes what is left, then stops as asked.
    last = daemons()
    settled = wait_for(lambda: spool_is_empty(spool), 30, step=0.1)
    os.kill(last.pid, signal.SIGTERM)
    assert last.wait(15) == 0, daemons.logs[-1].read_text()
    assert settled, sorted(os.listdir(spool))

    # Every record is in the outbox exactly once.
    ids = stored_ids(tmp_path / "outbox.db")
    assert len(producer.ids) == len(set(producer.ids)) > FILES
    missing = set(producer.ids) - set(ids)
    doubled = {i: n for i, n in ids.items() if n > 1}
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    assert not doubled, f"{len(doubled)} records doubled, e.g. {list(doubled)[:5]}"
    assert set(ids) == set(producer.ids)
    assert os.listdir(spool / FAILED_DIR) == []
    assert sorted(os.listdir(spool)) == sorted([CLAIM_DIR, FAILED_DIR])

    # And the kills did land between a claim and its removal.
    logs = b"".join(log.read_bytes() for log in daemons.logs)
    assert b"claimed files from an earlier run" in logs

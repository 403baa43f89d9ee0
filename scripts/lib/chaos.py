"""Records through seeded faults, then an audit: the run behind scripts/chaos.

Several edges, each a real `edge-spooler run` with its own outbox and spool
directory behind its own TCP proxy, send to a real Mosquitto and a real
`core-collector run` into SQLite. Producers accept records at a steady pace
through spool files and `edge.api.Producer.send_many` while a seeded random
fault is injected every few seconds. Once the last fault has run its length
and the last record is accepted, the run waits until the datastore holds
every accepted record and every outbox is empty, and an audit counts what is
missing or stored twice, by id and by the payload's unique `rid`.

Duplicate deliveries absorbed are counted from the collector's own log (it
runs with -v): each commit logs "committed N records (M new)", and N - M of
them were already stored.

Exits 0 only when the drain finished, nothing accepted is missing, nothing
is stored twice, nothing unexpected is stored, no daemon died on its own and
no tool failed; 1 otherwise; 64 on bad options. Every address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.exits import Exit
from edge.api import Producer
from edge.errors import OutboxBusy, OutboxError
from tests.harness.broker import Broker, BrokerError
from tests.harness.daemons import (
    Daemon,
    DaemonError,
    spooler,
    wait_until,
    write_core_config,
    write_edge_config,
)
from tests.harness.proxy import MAX_LIFETIME_S, Proxy, ProxyError

STREAM = "readings"
EDGE_PREFIX = "chaos-e"
CLIENT_ID = "chaos-core"

# What each fault does; the order is the order of the printed table.
KINDS = {
    "spooler-kill": "SIGKILL one edge-spooler, start it again 0-2 s later",
    "broker-kill-keep": "SIGKILL Mosquitto, start it again on its saved state",
    "broker-kill-wipe": "SIGKILL Mosquitto, delete its state, start it again",
    "broker-term": "SIGTERM Mosquitto (it saves), start it again 0-2 s later",
    "collector-kill": "SIGKILL the core-collector, start it again 0-2 s later",
    "link-cut": "reset one edge's link and refuse it for 1-5 s",
    "link-blackhole": "drop every byte of one edge's link for 2-8 s; every "
    "third one (the 2nd, 5th, ...) for 11-16 s, over two keepalives",
    "link-delay": "delay one edge's link by 0.1-1.5 s for 3-10 s",
    "link-flap": "cut and pass one edge's link in turns for 4-12 s",
}
PROCESS_DOWN_S = (0.0, 2.0)
CUT_S = (1.0, 5.0)
BLACKHOLE_S = (2.0, 8.0)
# Longer than two keepalives: the peers must notice the dead link themselves.
LONG_BLACKHOLE_S = (11.0, 16.0)
LONG_BLACKHOLE_EVERY = 3
DELAY_S = (0.1, 1.5)
DELAY_FOR_S = (3.0, 10.0)
FLAP_FOR_S = (4.0, 12.0)
FLAP_PERIOD_S = (1.0, 3.0)
FLAP_DOWN_SHARE = (0.2, 0.6)
FAULT_JITTER = (0.5, 1.5)

# How records go in, by share of records, and how many per step at most.
SOURCES = {"api": 0.45, "jsonl": 0.40, "json": 0.15}
MAX_PER_STEP = 40
SEND_ATTEMPTS = 5
SEND_RETRY_S = 0.5

# Test-speed settings; the keepalive is the smallest the config accepts.
BROKER_LINK = {"keepalive": 5, "reconnect_min": 0.2, "reconnect_max": 2}
PUBLISH = {"resend_initial": 3.0, "resend_max": 15.0}

TICK_S = 0.1
READY_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 15.0
LATE_DUPLICATES_S = 2.0
MAX_UNEXPECTED_RESTARTS = 5
MISSING_SHOWN = 20

COMMITTED_LINE = re.compile(r"committed (\d+) records \((\d+) new\)")
RECEIVED_LINE = re.compile(r"received mid \d+ on \S+/data/\S+: (\d+) items")
TOTALS_LINE = re.compile(r"stopped: (\d+) messages, (\d+) records")


class ChaosError(Exception):
    """The run could not go on: a tool failed, or a bound was reached."""


# -- options ---------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse that exits 64 (usage) with one line, as spoolmq's commands do."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="scripts/chaos",
        description=__doc__.split("\n\n")[0],
        epilog="Fault kinds: "
        + "; ".join(f"{kind}: {text}" for kind, text in KINDS.items()),
    )
    add = parser.add_argument
    add("--records", type=int, default=100000, help="records in all (100000)")
    add("--edges", type=int, default=4, help="edge-spooler processes (4)")
    add("--faults", type=int, default=50, help="faults to inject (50)")
    add(
        "--fault-every",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds between faults, jittered x0.5-1.5 (3)",
    )
    add("--seed", type=int, help="seed of every random choice (default: random)")
    add(
        "--drain-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for the drain after the last fault (300)",
    )
    add("--window", type=int, default=2000, help="publish.window W of each edge (2000)")
    add("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (5)")
    add(
        "--kinds",
        default=",".join(KINDS),
        metavar="K,K",
        help="fault kinds to draw from, comma separated (all)",
    )
    add(
        "--scratch",
        type=Path,
        help="folder for configs, databases and logs (default: a new temp dir)",
    )
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.records < 1 or args.edges < 1 or args.faults < 0:
        parser.error("--records and --edges must be >= 1, --faults >= 0")
    if args.fault_every <= 0 or args.drain_timeout <= 0 or args.window < 1:
        parser.error("--fault-every, --drain-timeout and --window must be > 0")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or not args.kinds:
        parser.error(f"unknown fault kinds {unknown}; choose from {', '.join(KINDS)}")
    # The proxies end on their own after MAX_LIFETIME_S.
    if planned_s(args) * FAULT_JITTER[1] + args.drain_timeout > MAX_LIFETIME_S * 0.9:
        parser.error("the run would outlast the proxies' one-hour lifetime")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)


def planned_s(args: argparse.Namespace) -> float:
    """How long faults and production last, as planned."""
    return max(args.faults * args.fault_every, 1.0)


# -- the ledger of what was accepted -----------------------------------------


@dataclass
class Entry:
    """One record as the producer made it."""

    edge: int
    source: str  # api, json or jsonl
    written_s: float  # seconds since the run began
    payload: dict
    record_id: tuple | None = None  # what send_many returned (api only)


@dataclass
class Ledger:
    entries: dict[str, Entry] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # send_many never succeeded
    files: int = 0

    def api_ids(self) -> dict[tuple, str]:
        return {e.record_id: rid for rid, e in self.entries.items() if e.record_id}


# -- the processes -----------------------------------------------------------


class Rig:
    """The broker, one collector, and per edge a proxy and a spooler."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.db = scratch / "core.db"
        self.broker = Broker()
        self.proxies: list[Proxy] = []
        self.spoolers: list[Daemon] = []
        self.edge_configs: list[Path] = []
        self.edge_dirs: list[Path] = []
        self.collector: Daemon | None = None

    def edge_id(self, i: int) -> str:
        return f"{EDGE_PREFIX}{i + 1}"

    def spool_dir(self, i: int) -> Path:
        return self.edge_dirs[i] / "spool"

    def outbox(self, i: int) -> Path:
        return self.edge_dirs[i] / "outbox.db"

    def start(self) -> None:
        self.broker.start()
        print(
            f"broker: mosquitto pid {self.broker.pid} on 127.0.0.1:{self.broker.port}"
        )
        self.collector = self._make_collector()
        self.collector.start()
        try:
            wait_until(
                lambda: "subscribed to" in self.collector.log_text(), READY_TIMEOUT_S
            )
        except AssertionError:
            raise ChaosError(
                f"the collector did not subscribe within {READY_TIMEOUT_S:.0f} s"
            ) from None
        print(f"collector: pid {self.collector.pid}")
        for i in range(self.args.edges):
            self._start_edge(i)

    def _make_collector(self) -> Daemon:
        config = write_core_config(
            self.scratch / "core.yaml",
            port=self.broker.port,
            db_url=f"sqlite:///{self.db}",
            client_id=CLIENT_ID,
            protocol=self.args.protocol,
            broker=BROKER_LINK,
        )
        # -v: the collector logs "committed N records (M new)" per commit,
        # which is how the audit counts the duplicates it absorbed.
        argv = [sys.executable, "-m", "core", "-v", "run", "-c", str(config)]
        return Daemon(
            "core-collector",
            argv,
            self.scratch / "core-collector.log",
            cwd=self.scratch,
        )

    def _start_edge(self, i: int) -> None:
        workdir = self.scratch / self.edge_id(i)
        self.edge_dirs.append(workdir)
        proxy = Proxy(self.broker.port).start()
        self.proxies.append(proxy)
        config = write_edge_config(
            workdir / "edge.yaml",
            edge_id=self.edge_id(i),
            port=proxy.port,
            outbox=self.outbox(i),
            spools=[(self.spool_dir(i), STREAM)],
            protocol=self.args.protocol,
            broker=BROKER_LINK,
            publish={**PUBLISH, "window": self.args.window},
        )
        self.edge_configs.append(config)
        self.spool_dir(i).mkdir(parents=True, exist_ok=True)
        daemon = spooler(config, workdir, name=self.edge_id(i))
        daemon.start()
        self.spoolers.append(daemon)
        print(
            f"{self.edge_id(i)}: spooler pid {daemon.pid}, proxy "
            f"127.0.0.1:{proxy.port} -> {self.broker.port}"
        )

    def daemons(self) -> dict[str, Daemon]:
        named = {f"spooler-{i}": d for i, d in enumerate(self.spoolers)}
        if self.collector:
            named["collector"] = self.collector
        return named

    def outbox_waiting(self, i: int) -> int:
        rows = read_only(self.outbox(i), "SELECT COALESCE(SUM(count), 0) FROM segments")
        return rows[0][0] if rows else 0

    def stop(self) -> list[str]:
        """Stop every process by PID and close every proxy; return what failed."""
        problems = []
        for daemon in [*self.spoolers, self.collector]:
            if daemon is not None:
                problems += _attempt(f"stop {daemon.name}", daemon.stop)
                problems += _attempt(f"kill {daemon.name}", daemon.kill)
        for proxy in self.proxies:
            problems += _attempt(f"close proxy {proxy.port}", proxy.close)
        problems += _attempt("stop broker", self.broker.stop)
        problems += _attempt("kill broker", self.broker.kill)
        return problems

    def close(self) -> None:
        """Keep the broker's log beside the others; drop its state file."""
        log = self.broker.log_file
        if log.exists():
            shutil.copyfile(log, self.scratch / "mosquitto.log")
        self.broker.close()


def _attempt(what: str, action: Callable[[], object]) -> list[str]:
    """Run one clean-up step; a failure is reported and the next step still runs."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - clean-up must reach every process
        return [f"{what}: {exc!r}"]
    return []


# -- faults --------------------------------------------------------------------


class Chaos:
    """Injects faults and runs their recoveries when they fall due.

    A target (the broker, the collector, a spooler, a link) has at most one
    fault at a time; what is down on purpose is in ``down``, so that a daemon
    found dead anywhere else died on its own.
    """

    def __init__(self, rig: Rig, rng: random.Random, began: float) -> None:
        self.rig = rig
        self.rng = rng
        self.began = began
        self.busy: set[str] = set()
        self.down: set[str] = set()
        self.pending: list[tuple[float, int, str, Callable[[], None]]] = []
        self._order = 0
        self.counts: collections.Counter = collections.Counter()
        self.timeline: list[tuple[float, str, str]] = []
        self.unexpected: list[str] = []
        self.last_fault_s = 0.0

    def now_s(self) -> float:
        return time.monotonic() - self.began

    def plan(self, kinds: list[str], count: int) -> list[str]:
        """Every kind equally often, the remainder drawn at random, shuffled."""
        rounds, rest = divmod(count, len(kinds))
        drawn = list(kinds) * rounds + self.rng.sample(kinds, rest)
        self.rng.shuffle(drawn)
        return drawn

    def inject(self, kind: str, number: int, total: int) -> bool:
        """Inject one fault; False when its target still has one."""
        detail = getattr(self, "_" + kind.replace("-", "_"))()
        if detail is None:
            return False
        self.counts[kind] += 1
        self.last_fault_s = self.now_s()
        self.timeline.append((self.last_fault_s, kind, detail))
        print(
            f"[{self.last_fault_s:7.1f} s] fault {number}/{total} {kind}: {detail}",
            flush=True,
        )
        return True

    def _later(self, delay: float, target: str, action: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(
            self.pending, (time.monotonic() + delay, self._order, target, action)
        )

    def run_due(self, now: float | None = None) -> None:
        """Run the recoveries due by ``now``; all of them when None."""
        while self.pending and (now is None or self.pending[0][0] <= now):
            _, _, target, action = heapq.heappop(self.pending)
            action()
            self.busy.discard(target)
            self.down.discard(target)

    def _free(self, prefix: str, count: int) -> int | None:
        """A free target index, drawn at random (one draw whatever is busy)."""
        first = self.rng.randrange(count)
        for step in range(count):
            i = (first + step) % count
            if f"{prefix}-{i}" not in self.busy:
                return i
        return None

    def _down_s(self) -> float:
        return self.rng.uniform(*PROCESS_DOWN_S)

    # The process faults.

    def _spooler_kill(self) -> str | None:
        i = self._free("spooler", len(self.rig.spoolers))
        if i is None:
            return None
        daemon, target, down = self.rig.spoolers[i], f"spooler-{i}", self._down_s()
        self.busy.add(target)
        self.down.add(target)
        daemon.kill()
        self._later(down, target, daemon.start)
        return f"{daemon.name} pid {daemon.pid} killed, back in {down:.1f} s"

    def _collector_kill(self) -> str | None:
        if "collector" in self.busy:
            return None
        daemon, down = self.rig.collector, self._down_s()
        self.busy.add("collector")
        self.down.add("collector")
        daemon.kill()
        self._later(down, "collector", daemon.start)
        return f"pid {daemon.pid} killed, back in {down:.1f} s"

    def _broker_kill_keep(self) -> str | None:
        return self._broker_fault("kill", keep_state=True)

    def _broker_kill_wipe(self) -> str | None:
        return self._broker_fault("kill", keep_state=False)

    def _broker_term(self) -> str | None:
        return self._broker_fault("term", keep_state=True)

    def _broker_fault(self, how: str, *, keep_state: bool) -> str | None:
        if "broker" in self.busy:
            return None
        broker, down = self.rig.broker, self._down_s()
        pid = broker.pid
        self.busy.add("broker")
        if how == "kill":
            broker.kill()
        else:
            broker.stop()
        if not keep_state:
            broker.delete_state()
        self._later(down, "broker", broker.start)
        state = "state kept" if keep_state else "state deleted"
        return (
            f"pid {pid} {'killed' if how == 'kill' else 'stopped'}, {state}, "
            f"back in {down:.1f} s"
        )

    # The link faults: one edge's proxy each.

    def _link(self) -> tuple[int, Proxy] | None:
        i = self._free("link", len(self.rig.proxies))
        if i is None:
            return None
        self.busy.add(f"link-{i}")
        return i, self.rig.proxies[i]

    def _link_cut(self) -> str | None:
        link = self._link()
        if link is None:
            return None
        (i, proxy), length = link, self.rng.uniform(*CUT_S)
        proxy.cut()
        self._later(length, f"link-{i}", proxy.restore)
        return f"{self.rig.edge_id(i)} reset, refused for {length:.1f} s"

    def _link_blackhole(self) -> str | None:
        link = self._link()
        if link is None:
            return None
        # The 2nd, 5th, 8th ... blackhole is long, so every run with two or
        # more has one that the keepalive must notice.
        long = self.counts["link-blackhole"] % LONG_BLACKHOLE_EVERY == 1
        i, proxy = link
        length = self.rng.uniform(*(LONG_BLACKHOLE_S if long else BLACKHOLE_S))
        proxy.blackhole()
        self._later(length, f"link-{i}", proxy.restore)
        return f"{self.rig.edge_id(i)} silent for {length:.1f} s"

    def _link_delay(self) -> str | None:
        link = self._link()
        if link is None:
            return None
        (i, proxy), lag = link, self.rng.uniform(*DELAY_S)
        length = self.rng.uniform(*DELAY_FOR_S)
        proxy.delay(lag)
        self._later(length, f"link-{i}", proxy.restore)
        return f"{self.rig.edge_id(i)} delayed {lag:.2f} s for {length:.1f} s"

    def _link_flap(self) -> str | None:
        link = self._link()
        if link is None:
            return None
        (i, proxy), length = link, self.rng.uniform(*FLAP_FOR_S)
        period = self.rng.uniform(*FLAP_PERIOD_S)
        down = period * self.rng.uniform(*FLAP_DOWN_SHARE)
        cuts = proxy.flap(period, down, self.rng.randrange(1 << 30), duration_s=length)
        self._later(length, f"link-{i}", proxy.restore)
        return (
            f"{self.rig.edge_id(i)} flapping for {length:.1f} s "
            f"({len(cuts)} cuts of ~{down:.1f} s)"
        )

    # Daemons that died on their own.

    def revive(self) -> None:
        """Start again, and note, any daemon or broker that died on its own."""
        found = [
            (n, d)
            for n, d in self.rig.daemons().items()
            if n not in self.down and not d.running
        ]
        for name, daemon in found:
            self._note_death(name, daemon.returncode, daemon.log_tail(5))
            daemon.start()
        broker = self.rig.broker
        if "broker" not in self.busy and not broker.running:
            self._note_death("broker", broker.returncode, broker.log_tail(5))
            broker.start()

    def _note_death(self, name: str, code: int | None, tail: str) -> None:
        line = f"[{self.now_s():7.1f} s] {name} exited on its own with {code}"
        print(line + "\n" + tail, flush=True)
        self.unexpected.append(line)
        if len(self.unexpected) > MAX_UNEXPECTED_RESTARTS:
            raise ChaosError(f"{len(self.unexpected)} daemons died on their own")

    def restore_all(self) -> None:
        """End every fault: recoveries run, every link passes, all daemons run."""
        self.run_due(None)
        for proxy in self.rig.proxies:
            proxy.restore()
        self.revive()


# -- producing -----------------------------------------------------------------


class Production(threading.Thread):
    """Accepts records at a steady pace through the API and spool files."""

    def __init__(self, rig: Rig, args: argparse.Namespace, began: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.rig = rig
        self.total = args.records
        self.rate = args.records / planned_s(args)
        self.rng = random.Random(args.seed * 7919 + 1)
        self.began = began
        self.ledger = Ledger()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.produced = 0

    def run(self) -> None:
        producers = [Producer(str(path)) for path in self.rig.edge_configs]
        try:
            self._produce(producers)
        except Exception as exc:  # noqa: BLE001 - the main thread reports it
            self.error = exc
        finally:
            for producer in producers:
                producer.close()

    def _produce(self, producers: list[Producer]) -> None:
        sources, weights = zip(*SOURCES.items(), strict=True)
        for _ in range(self.total):
            if self.produced >= self.total or self.stopping.is_set():
                return
            edge = self.rng.randrange(len(producers))
            source = self.rng.choices(sources, weights)[0]
            count = min(self.rng.randint(1, MAX_PER_STEP), self.total - self.produced)
            entries = self._entries(edge, source, count)
            if source == "api":
                self._send(producers[edge], entries)
            else:
                self._write_files(edge, source, entries)
            self.produced += count
            self._pace()

    def _entries(self, edge: int, source: str, count: int) -> list[tuple[str, Entry]]:
        made = []
        written = time.monotonic() - self.began
        for n in range(self.produced, self.produced + count):
            rid = f"r{n:07d}"
            payload = {
                "rid": rid,
                "src": source,
                "n": n,
                "v": round(self.rng.uniform(-40, 60), 3),
            }
            made.append((rid, Entry(edge, source, written, payload)))
        return made

    def _send(self, producer: Producer, entries: list[tuple[str, Entry]]) -> None:
        payloads = [entry.payload for _, entry in entries]
        for _ in range(SEND_ATTEMPTS):
            try:
                ids = producer.send_many(STREAM, payloads)
                break
            except (OutboxBusy, OutboxError) as exc:
                print(f"producer: send_many refused ({exc}); retrying", flush=True)
                time.sleep(SEND_RETRY_S)
        else:
            self.ledger.refused.update(rid for rid, _ in entries)
            return
        for (rid, entry), record_id in zip(entries, ids, strict=True):
            entry.record_id = (record_id.edge_id, record_id.epoch, record_id.seq)
            self.ledger.entries[rid] = entry

    def _write_files(
        self, edge: int, source: str, entries: list[tuple[str, Entry]]
    ) -> None:
        spool = self.rig.spool_dir(edge)
        if source == "jsonl":
            groups = [entries]
        else:
            groups = [[item] for item in entries]
        for group in groups:
            name = f"{group[0][0]}.{source}"
            text = "".join(json.dumps(e.payload) + "\n" for _, e in group)
            # Only after the rename is the file the spooler's to take.
            for rid, entry in group:
                self.ledger.entries[rid] = entry
            write_spool_file(spool, name, text)
            self.ledger.files += 1

    def _pace(self) -> None:
        due = self.began + self.produced / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            self.stopping.wait(delay)


def write_spool_file(spool: Path, name: str, text: str) -> None:
    """The producer protocol: a hidden .tmp name, fsync, rename."""
    tmp = spool / f".{name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, spool / name)


# -- reading what is on disk ---------------------------------------------------


def read_only(path: Path, sql: str) -> list[tuple]:
    """Rows of a query on a SQLite file, opened read-only; [] if not there yet."""
    if not path.exists():
        return []
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def leftover_files(spool: Path) -> dict[str, list[Path]]:
    """Files still in a spool dir: waiting (or claimed), and quarantined."""
    found: dict[str, list[Path]] = {"waiting": [], "quarantined": []}
    if not spool.exists():
        return found
    for path in sorted(spool.rglob("*")):
        if not path.is_file() or path.name.endswith((".reason", ".tmp")):
            continue
        kind = "quarantined" if ".failed" in path.parts else "waiting"
        found[kind].append(path)
    return found


def rids_in(paths: list[Path]) -> set[str]:
    rids = set()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                rids.add(json.loads(line)["rid"])
    return rids


def collector_counts(log_text: str) -> dict[str, int]:
    """What the collector's own log says it received and committed."""
    committed = [(int(a), int(b)) for a, b in COMMITTED_LINE.findall(log_text)]
    totals = TOTALS_LINE.findall(log_text)
    return {
        "committed": sum(a for a, _ in committed),
        "new": sum(b for _, b in committed),
        "received": sum(int(n) for n in RECEIVED_LINE.findall(log_text)),
        "clean_stops": len(totals),
        "last_totals": int(totals[-1][1]) if totals else -1,
    }


# -- draining and the audit ------------------------------------------------------


@dataclass
class Audit:
    accepted: set[str]
    api: int
    spool: int
    refused: int
    stored_rows: int
    stored_by_rid: dict[str, list[tuple]]
    id_duplicates: int
    waiting_files: int
    quarantined_files: int
    outbox_waiting: int
    core_dead_letters: int
    mismatched: list[str]

    @property
    def missing(self) -> list[str]:
        return sorted(self.accepted - set(self.stored_by_rid))

    @property
    def duplicated(self) -> int:
        by_rid = sum(len(ids) - 1 for ids in self.stored_by_rid.values())
        return by_rid + self.id_duplicates

    @property
    def unexpected(self) -> list[str]:
        return sorted(set(self.stored_by_rid) - self.accepted)


def take_audit(rig: Rig, ledger: Ledger) -> Audit:
    leftovers = {"waiting": [], "quarantined": []}
    for i in range(len(rig.edge_dirs)):
        for kind, paths in leftover_files(rig.spool_dir(i)).items():
            leftovers[kind] += paths
    not_taken = rids_in(leftovers["waiting"] + leftovers["quarantined"])
    accepted = set(ledger.entries) - not_taken
    rows = read_only(rig.db, "SELECT edge_id, epoch, seq, payload FROM records")
    by_rid: dict[str, list[tuple]] = collections.defaultdict(list)
    ids = collections.Counter()
    for edge_id, epoch, seq, payload in rows:
        ids[(edge_id, epoch, seq)] += 1
        by_rid[_rid_of(payload)].append((edge_id, epoch, seq))
    api_ids = ledger.api_ids()
    mismatched = [
        f"{rid} stored as {':'.join(map(str, i))}"
        for rid, found in by_rid.items()
        for i in found
        if i in api_ids and api_ids[i] != rid
    ]
    letters = read_only(rig.db, "SELECT COUNT(*) FROM dead_letters")
    return Audit(
        accepted=accepted,
        api=len(api_ids),
        spool=sum(1 for rid in accepted if ledger.entries[rid].source != "api"),
        refused=len(ledger.refused),
        stored_rows=len(rows),
        stored_by_rid=dict(by_rid),
        id_duplicates=sum(n - 1 for n in ids.values()),
        waiting_files=len(leftovers["waiting"]),
        quarantined_files=len(leftovers["quarantined"]),
        outbox_waiting=sum(rig.outbox_waiting(i) for i in range(len(rig.edge_dirs))),
        core_dead_letters=letters[0][0] if letters else 0,
        mismatched=mismatched,
    )


def _rid_of(payload: str) -> str:
    try:
        return str(json.loads(payload)["rid"])
    except (ValueError, KeyError, TypeError):
        return f"<no rid: {payload[:40]}>"


def drain(rig: Rig, chaos: Chaos, ledger: Ledger, timeout: float) -> float | None:
    """Wait until every accepted record is stored and every outbox is empty.

    Returns the seconds it took, or None when ``timeout`` passed first.
    """
    started = time.monotonic()
    deadline = started + timeout
    next_progress = started + PROGRESS_EVERY_S
    for _ in range(int(timeout / 1.0) + 2):
        chaos.revive()
        if _drained(rig, ledger):
            return time.monotonic() - started
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_progress:
            _print_progress(rig, ledger, now - started)
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(min(1.0, max(0.0, deadline - now)))
    return None


def _drained(rig: Rig, ledger: Ledger) -> bool:
    """Cheap checks first; the full audit only when they all pass."""
    edges = range(len(rig.edge_dirs))
    if any(rig.outbox_waiting(i) for i in edges):
        return False
    if any(leftover_files(rig.spool_dir(i))["waiting"] for i in edges):
        return False
    stored = read_only(rig.db, "SELECT COUNT(*) FROM records")
    if not stored or stored[0][0] < len(ledger.entries) - len(
        ledger.refused
    ) - _quarantined_records(rig):
        return False
    return not take_audit(rig, ledger).missing


def _quarantined_records(rig: Rig) -> int:
    paths = [
        p
        for i in range(len(rig.edge_dirs))
        for p in leftover_files(rig.spool_dir(i))["quarantined"]
    ]
    return len(rids_in(paths))


def _print_progress(rig: Rig, ledger: Ledger, waited: float) -> None:
    stored = read_only(rig.db, "SELECT COUNT(*) FROM records")
    waiting = [rig.outbox_waiting(i) for i in range(len(rig.edge_dirs))]
    print(
        f"draining for {waited:.0f} s: {stored[0][0] if stored else 0} of "
        f"{len(ledger.entries)} records stored; outboxes hold {waiting}",
        flush=True,
    )


# -- the report ----------------------------------------------------------------


@dataclass
class Outcome:
    """Everything the report prints."""

    args: argparse.Namespace
    audit: Audit
    chaos: Chaos
    ledger: Ledger
    drained_s: float | None
    counts: dict[str, int]
    problems: list[str]
    scratch: Path
    wall_s: float

    @property
    def ok(self) -> bool:
        audit = self.audit
        return self.drained_s is not None and not (
            audit.missing
            or audit.duplicated
            or audit.unexpected
            or audit.mismatched
            or self.chaos.unexpected
            or self.problems
        )


def table_rows(out: Outcome) -> list[tuple[str, object]]:
    audit, counts, faults = out.audit, out.counts, out.chaos.counts
    drain = (
        f"did not drain in {out.args.drain_timeout:.0f} s"
        if out.drained_s is None
        else f"{out.drained_s:.1f} s  (from when every fault had ended)"
    )
    accepted = (
        f"{len(audit.accepted)}  (api {audit.api}, "
        f"spool {audit.spool} in {out.ledger.files} files)"
    )
    absorbed = (
        f"{counts['committed'] - counts['new']} records  (collector log: sum of "
        "N - M over its 'committed N records (M new)' lines)"
    )
    delivered = (
        f"{counts['received']}  (its 'received mid .. N items' lines on data "
        "topics, deliveries lost to its kills included)"
    )
    totals = (
        f"{counts['last_totals']} records committed in its last run  "
        f"({counts['clean_stops']} clean stop(s); killed runs print no totals)"
    )
    left = f"{audit.waiting_files} waiting, {audit.quarantined_files} quarantined"
    rows = [
        ("records accepted", accepted),
        ("records stored", audit.stored_rows),
        ("missing", len(audit.missing)),
        ("duplicated", f"{audit.duplicated}  (by id, and by payload rid)"),
    ]
    if audit.unexpected or audit.mismatched or audit.refused:
        rows += [
            ("stored, not accepted", len(audit.unexpected)),
            ("api id with another rid", len(audit.mismatched)),
            ("send_many refused", audit.refused),
        ]
    rows += [
        ("spool files left", left),
        ("outboxes still hold", audit.outbox_waiting),
        ("core dead letters", audit.core_dead_letters),
        ("faults injected", sum(faults.values())),
        *[(f"  {kind}", faults[kind]) for kind in KINDS if faults[kind]],
        ("time to drain after last fault", drain),
        ("duplicate deliveries absorbed", absorbed),
        ("records delivered to collector", delivered),
        ("collector totals at stop", totals),
        ("daemons that died on their own", len(out.chaos.unexpected)),
        ("wall time", f"{out.wall_s:.0f} s"),
        ("seed", out.args.seed),
    ]
    return rows


def report(out: Outcome) -> int:
    print()
    for label, value in table_rows(out):
        print(f"{label:<32}{value}")
    _print_details(out.audit, out.chaos, out.ledger, out.problems, out.scratch)
    print()
    if out.ok:
        print("OK: every accepted record stored exactly once")
    else:
        print(f"FAILED (seed {out.args.seed})")
    print(
        f"logs: {out.scratch} (core-collector.log, mosquitto.log, faults.log, "
        f"{EDGE_PREFIX}N/{EDGE_PREFIX}N.log)"
    )
    return 0 if out.ok else 1


def _print_details(
    audit: Audit, chaos: Chaos, ledger: Ledger, problems: list[str], scratch: Path
) -> None:
    for line in problems + chaos.unexpected:
        print(f"problem: {line}")
    if audit.missing:
        path = scratch / "missing.txt"
        path.write_text(
            "".join(_describe(r, ledger, chaos) + "\n" for r in audit.missing)
        )
        print(f"\nmissing records (all {len(audit.missing)} in {path}):")
        for rid in audit.missing[:MISSING_SHOWN]:
            print("  " + _describe(rid, ledger, chaos))
    duplicates = {r: ids for r, ids in audit.stored_by_rid.items() if len(ids) > 1}
    for rid, ids in list(duplicates.items())[:MISSING_SHOWN]:
        print(f"  duplicate {rid}: " + ", ".join(":".join(map(str, i)) for i in ids))
    for line in (audit.mismatched + audit.unexpected)[:MISSING_SHOWN]:
        print(f"  unexpected: {line}")


def _describe(rid: str, ledger: Ledger, chaos: Chaos) -> str:
    entry = ledger.entries[rid]
    where = ":".join(map(str, entry.record_id)) if entry.record_id else "spool file"
    before = [f for f in chaos.timeline if f[0] <= entry.written_s][-1:]
    after = [f for f in chaos.timeline if f[0] > entry.written_s][:1]
    near = "; ".join(
        f"{'before' if f in before else 'after'} {f[0]:.1f} s {f[1]} ({f[2]})"
        for f in before + after
    )
    return (
        f"{rid} edge {EDGE_PREFIX}{entry.edge + 1} via {entry.source} "
        f"({where}) written at {entry.written_s:.1f} s; faults {near}"
    )


# -- the run -------------------------------------------------------------------


def run_faults(args, chaos: Chaos, production: Production) -> None:
    """Inject every planned fault on schedule; return when the last one has
    run its length and production is done too."""
    rng = chaos.rng
    plan = chaos.plan(args.kinds, args.faults)
    limit_s = planned_s(args) * FAULT_JITTER[1] * 2 + 300
    deadline = time.monotonic() + limit_s
    next_fault = time.monotonic() + args.fault_every * rng.uniform(*FAULT_JITTER)
    injected = 0
    for _ in range(int(limit_s / TICK_S) + 1):
        now = time.monotonic()
        chaos.run_due(now)
        chaos.revive()
        due = injected < len(plan) and now >= next_fault
        if due and chaos.inject(plan[injected], injected + 1, len(plan)):
            injected += 1
            next_fault = now + args.fault_every * rng.uniform(*FAULT_JITTER)
        done = injected >= len(plan) and not chaos.pending
        if done and not production.is_alive():
            return
        if now >= deadline:
            break
        time.sleep(TICK_S)
    production.stopping.set()
    raise ChaosError(
        f"faults and production not done within {limit_s:.0f} s: "
        f"{injected} faults, {production.produced} records"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="spoolmq-chaos-"))
    scratch = scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"spoolmq chaos: seed {args.seed} (repeat with --seed {args.seed})")
    print(
        f"{args.records} records from {args.edges} edges, {args.faults} faults "
        f"every ~{args.fault_every} s, window {args.window}, MQTT {args.protocol}"
    )
    print(f"scratch folder: {scratch}", flush=True)
    signal.signal(signal.SIGTERM, _exit_on_term)

    began = time.monotonic()
    rig = Rig(args, scratch)
    chaos = Chaos(rig, random.Random(args.seed), began)
    production = Production(rig, args, began)
    problems: list[str] = []
    try:
        rig.start()
        production.start()
        run_faults(args, chaos, production)
        production.join(READY_TIMEOUT_S)
        if production.error:
            raise ChaosError(f"the producer failed: {production.error!r}")

        # Every fault has ended on its own; restore_all only makes sure.
        # From here the clock of the drain runs.
        chaos.restore_all()
        print(
            f"[{chaos.now_s():7.1f} s] all faults over, {production.produced} "
            f"records produced; draining",
            flush=True,
        )
        drained_s = drain(rig, chaos, production.ledger, args.drain_timeout)
        time.sleep(LATE_DUPLICATES_S)
    except (ChaosError, BrokerError, DaemonError, ProxyError) as exc:
        # A tool that failed is reported as such, and the audit still runs.
        problems.append(f"{type(exc).__name__}: {exc}")
        print(f"chaos: {exc}", flush=True)
        drained_s = None
    finally:
        # Every process this run started is stopped here, whatever failed.
        production.stopping.set()
        problems += _attempt("join the producer", lambda: _join(production))
        problems += rig.stop()
        problems += _attempt(
            "write faults.log", lambda: _write_timeline(scratch, chaos)
        )
        problems += _attempt("close the broker", rig.close)
    audit = take_audit(rig, production.ledger)
    counts = collector_counts(rig.collector.log_text() if rig.collector else "")
    wall_s = time.monotonic() - began
    return report(
        Outcome(
            args,
            audit,
            chaos,
            production.ledger,
            drained_s,
            counts,
            problems,
            scratch,
            wall_s,
        )
    )


def _join(production: Production) -> None:
    if production.ident is not None:
        production.join(READY_TIMEOUT_S)


def _write_timeline(scratch: Path, chaos: Chaos) -> None:
    lines = [f"{t:8.1f} s  {kind:<18} {detail}\n" for t, kind, detail in chaos.timeline]
    (scratch / "faults.log").write_text("".join(lines))


def _exit_on_term(signum, frame) -> None:
    # The finally clauses stop every process this run started.
    print("chaos: SIGTERM; stopping every process of this run", flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())

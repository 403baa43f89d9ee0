"""What every bench scenario shares: records, sites, brokers, processes, /proc.

A *site* is where a side of the path runs: on this host's loopback, or
inside a network namespace that scripts/lib/bench_netem.py made. Brokers,
clients and daemons are started through a site, so one scenario runs on
loopback or over the emulated link unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.broker import PRODUCTION_CONFIG, derive_config, free_port

RECORD_BYTES = 200
STOP_TIMEOUT_S = 60.0  # a broker holding a million messages saves them on exit
KILL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
POLL_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")
BROKER_USER = "mosquitto"


class BenchError(Exception):
    """A measurement could not be made; the message says which and why."""


# --- Records ------------------------------------------------------------------


def make_records(count: int, seed: int) -> list[str]:
    """``count`` compact JSON records of exactly RECORD_BYTES bytes each.

    Seeded, so every system measured gets the same bytes; ``rid`` is unique.
    """
    rng = random.Random(seed)
    records = []
    for rid in range(count):
        value = {
            "rid": rid,
            "sensor": f"s-{rng.randrange(1000):03d}",
            "t": round(1_780_000_000 + rid * 0.25, 2),
            "v": [round(rng.uniform(-50, 50), 3) for _ in range(4)],
            "pad": "",
        }
        text = json.dumps(value, separators=(",", ":"))
        value["pad"] = "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz")
            for _ in range(RECORD_BYTES - len(text))
        )
        text = json.dumps(value, separators=(",", ":"))
        assert len(text) == RECORD_BYTES, text
        records.append(text)
    return records


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- Where processes run --------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where a process runs (``prefix`` before its argv) and the address its
    brokers listen on and are reached at."""

    name: str
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [*self.prefix, *map(str, argv)]


LOOPBACK = Site("loopback")


# --- /proc ----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What a process used so far, from /proc/<pid>/{stat,status,io}."""

    cpu_s: float = 0.0
    write_bytes: int = 0
    peak_rss_kb: int = 0

    def __sub__(self, before: Usage) -> Usage:
        return Usage(
            self.cpu_s - before.cpu_s,
            self.write_bytes - before.write_bytes,
            max(self.peak_rss_kb, before.peak_rss_kb),
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu_s + other.cpu_s,
            self.write_bytes + other.write_bytes,
            max(self.peak_rss_kb, other.peak_rss_kb),
        )


def usage(pid: int) -> Usage:
    """utime+stime, write_bytes and VmHWM of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}: {exc}") from None
    # The command name may hold spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK
    write_bytes = int(_field(io, "write_bytes:"))
    hwm = int(_field(status, "VmHWM:").split()[0])
    return Usage(cpu_s, write_bytes, hwm)


def _field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name):
            return line[len(name) :].strip()
    raise BenchError(f"no {name} in /proc")


# --- Processes ------------------------------------------------------------------


class Proc:
    """One child process, stopped by its PID; its output goes to ``log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        stdin: Path | int | None = None,
        stdout: Path | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ):
        """``stdin`` and ``stdout`` are files, or ``subprocess.PIPE``."""
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            err = files.enter_context(open(log, "ab"))
            inp = (
                stdin
                if isinstance(stdin, int)
                else files.enter_context(open(stdin or os.devnull, "rb"))
            )
            out = (
                stdout
                if isinstance(stdout, int)
                else files.enter_context(open(stdout or log, "ab"))
            )
            self.popen = subprocess.Popen(
                list(argv),
                stdin=inp,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        self.pid = self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{self.name} (pid {self.pid}) still running after {timeout:.0f} s; "
                f"log {self.log}"
            ) from None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL once ``timeout`` passed; never raises."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=KILL_TIMEOUT_S)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(
        self, text: str, timeout: float = READY_TIMEOUT_S, path: Path | None = None
    ) -> None:
        """Wait until ``text`` shows in the log (or in ``path``)."""
        source = path or self.log
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            if source.exists() and text in source.read_text(errors="replace"):
                return
            if not self.running:
                raise BenchError(
                    f"{self.name} exited with {self.popen.returncode}"
                    f" before logging {text!r}; log {source}"
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise BenchError(
            f"{self.name} did not log {text!r} within {timeout:.0f} s; log {source}"
        )


@dataclass
class Procs:
    """Every process a run started, stopped in reverse order at the end."""

    started: list[Proc] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


# --- Mosquitto ------------------------------------------------------------------


def find_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BenchError(
            f"{name} not found; install it: sudo apt-get install -y "
            f"{'mosquitto' if name == 'mosquitto' else 'mosquitto-clients'}"
        )
    return found


class MosquittoBroker:
    """A Mosquitto on ``site``: the project's config, overrides, extra text.

    Like tests/harness/broker.py, but it can run inside a network namespace
    and listen on that namespace's address, and it takes a bridge section.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        procs: Procs,
        *,
        site: Site = LOOPBACK,
        settings: Mapping[str, object] | None = None,
        extra: str = "",
    ) -> None:
        self.name = name
        self.site = site
        self.port = free_port()
        self.settings = dict(settings or {})
        self.extra = extra
        self.workdir = workdir
        self.procs = procs
        self.proc: Proc | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        _give_to_broker(workdir)

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} not started")
        return self.proc.pid

    def start(self) -> None:
        settings = {"listener": f"{self.port} {self.site.host}", **self.settings}
        if os.geteuid() == 0 and _broker_user() is None:
            settings.setdefault("user", "root")
        config = derive_config(
            PRODUCTION_CONFIG.read_text(),
            port=self.port,
            workdir=self.workdir,
            settings=settings,
        )
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(config + self.extra)
        marker = self.log_text().count(" running")
        self.proc = self.procs.add(
            Proc(
                self.name,
                self.site.argv([find_tool("mosquitto"), "-c", conf]),
                self.workdir / "mosquitto.stderr",
            )
        )
        self._wait_running(marker)

    def _wait_running(self, before: int) -> None:
        # "mosquitto version X running" is logged once the listeners are open.
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _ in range(int(READY_TIMEOUT_S / 0.05) + 2):
            if self.log_text().count(" running") > before:
                return
            if not self.proc.running:
                raise BenchError(f"{self.name} exited at start; see {self.workdir}")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise BenchError(
            f"{self.name} not running within {READY_TIMEOUT_S:.0f} s; "
            f"see {self.workdir}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_text(self) -> str:
        return (
            self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        )

    def wait_for_log(self, text: str, timeout: float = READY_TIMEOUT_S) -> None:
        self.proc.wait_for_log(text, timeout, path=self.log_file)


def _broker_user() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def broker_cannot_reach(path: Path) -> Path | None:
    """The first folder above ``path`` that Mosquitto's own user cannot enter.

    Started as root, Mosquitto drops to that user before it opens its log and
    state, so a broker folder below such a folder makes it exit at start.
    """
    user = _broker_user()
    if os.geteuid() != 0 or user is None:
        return None
    uid, gid = user
    for folder in reversed(path.resolve().parents):
        st = folder.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return folder
    return None


def _give_to_broker(path: Path) -> None:
    # Started as root, Mosquitto drops to its own user before it writes.
    user = _broker_user()
    if os.geteuid() == 0 and user is not None:
        os.chown(path, *user)


def measure_into(
    cell, measure, *args, errors: tuple[type[BaseException], ...] = ()
) -> bool:
    """``measure(*args)`` into ``cell`` (``.results``, ``.error``), ending its
    progress line.

    A BenchError or one of ``errors`` is the run's failure, told in one line;
    anything else is reported with its traceback. True when the run counted.
    """
    try:
        result = measure(*args)
    except (BenchError, *errors) as exc:
        cell.error = " ".join(str(exc).split())
        print(f" failed: {cell.error}", flush=True)
        return False
    except Exception as exc:  # noqa: BLE001 - reported, then the next one
        cell.error = f"{type(exc).__name__}: {exc}"
        print(" failed:", flush=True)
        traceback.print_exc()
        return False
    cell.results.append(result)
    print(f" {result.rate:,.0f} records/s", flush=True)
    return True


def wait_bounded(predicate, timeout: float, what: str, interval: float = POLL_S):
    """Poll ``predicate`` until truthy; BenchError naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise BenchError(f"{what}: not done within {timeout:.0f} s")

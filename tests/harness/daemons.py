"""The project's daemons as subprocesses, their configs, and audits of the store.

A fault test starts ``edge-spooler run`` and ``core-collector run`` as real
processes (``python -m edge`` / ``python -m core`` of this checkout), kills
or stops them by PID, and reads the collector's SQLite datastore read-only to
check that every record arrived once. Configs default to fast reconnects so a
test spends its time on the fault, not on backoff.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.harness import REPO_ROOT

log = logging.getLogger("tests.harness.daemons")

STOP_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
SQLITE_TIMEOUT_S = 5.0

# What a test config says unless the test overrides it. The keepalive is the
# smallest the config accepts, so a dead link is noticed within seconds.
TEST_BROKER = {
    "host": "127.0.0.1",
    "keepalive": 5,
    "reconnect_min": 0.2,
    "reconnect_max": 2,
}
TEST_PUBLISH = {"resend_initial": 3.0, "resend_max": 20.0}

T = TypeVar("T")
PathArg = str | os.PathLike


class DaemonError(Exception):
    """A daemon could not be started or did not stop in time."""


class Daemon:
    """One daemon process; its output, across restarts, goes to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: PathArg,
        env: Mapping[str, str] | None = None,
        *,
        cwd: PathArg | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The PID of the last process started, running or not."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """The last process's exit status (negative: killed by that signal)."""
        return self._process.poll() if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process; readiness is the test's to wait for."""
        if self.running:
            raise DaemonError(f"{self.name} already running as pid {self.pid}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self._environment(),
            )
        log.info("%s started: pid %d", self.name, self.pid)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit on its own; return its exit status."""
        if self._process is None:
            raise DaemonError(f"{self.name} was never started")
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"{self.name} pid {self.pid} still running after {timeout} s\n"
                f"{self.log_tail()}"
            ) from None

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL the process, as a crash or a power loss would end it."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGKILL)
        self.wait(timeout)
        log.info("%s killed: pid %d", self.name, self.pid)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, as an operator would; kill and raise if it hangs."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(
                f"{self.name} pid {self.pid} ignored SIGTERM for {timeout} s; "
                f"killed\n{self.log_tail()}"
            ) from None
        log.info("%s stopped: pid %d, exit %d", self.name, self.pid, self.returncode)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (or with hard=True kill) if running, then start again."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_text(self) -> str:
        """Everything the process printed so far, across restarts."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exit {self.returncode}"
        return f"<Daemon {self.name} pid {self.pid} {state}>"

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        # The checkout's packages, wherever the daemon's working directory
        # is; unbuffered, so log_text() shows a line as soon as it is written.
        paths = [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env


class DaemonSet:
    """Makes daemons and kills, at close, every one of them still running."""

    def __init__(self) -> None:
        self.made: list[Daemon] = []

    def __call__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: PathArg,
        env: Mapping[str, str] | None = None,
        *,
        cwd: PathArg | None = None,
    ) -> Daemon:
        return self.add(Daemon(name, argv, log_path, env, cwd=cwd))

    def add(self, daemon: Daemon) -> Daemon:
        self.made.append(daemon)
        return daemon

    def spooler(self, config_path: PathArg, workdir: PathArg, **kw: Any) -> Daemon:
        """A tracked ``spooler(...)``."""
        return self.add(spooler(config_path, workdir, **kw))

    def collector(self, config_path: PathArg, workdir: PathArg, **kw: Any) -> Daemon:
        """A tracked ``collector(...)``."""
        return self.add(collector(config_path, workdir, **kw))

    def close(self) -> None:
        # Killed rather than stopped: a test that needed a clean stop did
        # one, and teardown must not wait on a daemon that hangs.
        for daemon in self.made:
            daemon.kill()


def spooler(
    config_path: PathArg,
    workdir: PathArg,
    *,
    name: str = "edge-spooler",
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """``edge-spooler run -c CONFIG`` in ``workdir``, logging to NAME.log there."""
    argv = [sys.executable, "-m", "edge", "run", "-c", str(config_path)]
    return Daemon(name, argv, Path(workdir) / f"{name}.log", env, cwd=workdir)


def collector(
    config_path: PathArg,
    workdir: PathArg,
    *,
    name: str = "core-collector",
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """``core-collector run -c CONFIG`` in ``workdir``, logging to NAME.log there."""
    argv = [sys.executable, "-m", "core", "run", "-c", str(config_path)]
    return Daemon(name, argv, Path(workdir) / f"{name}.log", env, cwd=workdir)


def write_edge_config(
    path: PathArg,
    *,
    edge_id: str,
    port: int,
    outbox: PathArg,
    spools: Sequence[tuple[PathArg, str]],
    protocol: str = "5",
    **overrides: Any,
) -> Path:
    """Write an edge.yaml for a test; see ``merge`` for what overrides do."""
    config = {
        "edge_id": edge_id,
        "broker": {**TEST_BROKER, "port": port, "protocol": str(protocol)},
        "outbox": {"path": outbox},
        "spool": [{"dir": d, "stream": stream} for d, stream in spools],
        "publish": dict(TEST_PUBLISH),
    }
    return _write_yaml(path, merge(config, overrides))


def write_core_config(
    path: PathArg,
    *,
    port: int,
    db_url: str,
    client_id: str = "core-test",
    protocol: str = "5",
    **overrides: Any,
) -> Path:
    """Write a core.yaml for a test; see ``merge`` for what overrides do."""
    config = {
        "broker": {**TEST_BROKER, "port": port, "protocol": str(protocol)},
        "datastore": {"url": db_url},
        "client_id": client_id,
    }
    return _write_yaml(path, merge(config, overrides))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, nested mappings key by key.

    A mapping merges into a mapping; any other value replaces; None removes
    the key, so a test can write a config without, say, ``edge_id``.
    """
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _write_yaml(path: PathArg, config: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    # safe_dump writes only YAML's own types; paths become strings.
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    message: str = "",
) -> T:
    """Poll until ``predicate()`` is truthy and return that value.

    Raises AssertionError with ``message`` when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    raise AssertionError(message or f"condition not met within {timeout} s")


def stored_ids(sqlite_path: PathArg) -> collections.Counter:
    """How often each (edge_id, epoch, seq) is in the core's ``records``.

    Empty while the datastore or its table does not exist yet.
    """
    rows = _query(sqlite_path, "SELECT edge_id, epoch, seq FROM records")
    return collections.Counter((edge_id, epoch, seq) for edge_id, epoch, seq in rows)


def stored_payloads(sqlite_path: PathArg, edge_id: str) -> list[Any]:
    """The parsed payloads of one edge's stored records, by epoch and seq."""
    rows = _query(
        sqlite_path,
        "SELECT payload FROM records WHERE edge_id = ? ORDER BY epoch, seq",
        (edge_id,),
    )
    return [json.loads(payload) for (payload,) in rows]


def _query(
    sqlite_path: PathArg, sql: str, parameters: Sequence[Any] = ()
) -> list[tuple]:
    path = Path(sqlite_path)
    if not path.exists():
        return []

    # Read-only, so an audit never changes what it audits. sqlite3's own
    # context manager ends a transaction but does not close the connection.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT_S)
    with contextlib.closing(connection) as db:
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
        ).fetchone()
        if not exists:
            return []
        return db.execute(sql, parameters).fetchall()



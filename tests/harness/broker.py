"""A real Mosquitto for tests and demos, configured like production.

The config is derived from the project's own ``mosquitto/mosquitto.conf``, so
tests run against the limits and persistence settings that production gets.
Only what ties that file to a host (listeners, paths, users, auth) is
replaced: the test broker listens on a free loopback port, allows anonymous
clients and keeps its state and log in a private temporary directory.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.harness import REPO_ROOT

log = logging.getLogger("tests.harness.broker")

PRODUCTION_CONFIG = REPO_ROOT / "mosquitto" / "mosquitto.conf"

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 20

# The user Mosquitto drops to when started as root (its built-in default).
BROKER_USER = "mosquitto"

# Settings of the production file that name its host's ports, paths, users or
# certificates. The derived config drops them; the harness writes its own
# listener, persistence_location and log_dest, and a caller may add back any
# of them (an ACL test sets password_file, acl_file and allow_anonymous false).
# use_username_as_clientid is dropped because it disconnects every client
# without a username, and most tests connect anonymously.
HOST_SETTINGS = frozenset(
    {
        "acl_file",
        "allow_anonymous",
        "cafile",
        "capath",
        "certfile",
        "ciphers",
        "crlfile",
        "keyfile",
        "listener",
        "log_dest",
        "password_file",
        "persistence_location",
        "pid_file",
        "require_certificate",
        "tls_version",
        "use_identity_as_username",
        "use_username_as_clientid",
        "user",
    }
)

SettingValue = str | int | bool | Path | Sequence[str] | None

STATE_FILE = "mosquitto.db"


class BrokerError(Exception):
    """The test broker could not be started, stopped or configured."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_config(text: str) -> list[tuple[str, str]]:
    """Return the (key, value) settings of a mosquitto.conf, comments dropped."""
    settings = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, *value = stripped.split(None, 1)
        settings.append((key, value[0] if value else ""))
    return settings


def derive_config(
    production_text: str,
    *,
    port: int,
    workdir: Path,
    settings: Mapping[str, SettingValue] | None = None,
) -> str:
    """Return a test config: production settings, local listener, overrides.

    A value of None in ``settings`` removes that setting; a list writes the
    key once per item (for keys such as log_type).
    """
    lines = [
        (key, value)
        for key, value in parse_config(production_text)
        if key not in HOST_SETTINGS
    ]
    harness = {
        "listener": f"{port} 127.0.0.1",
        "allow_anonymous": True,
        "persistence_location": f"{workdir}/",
        "log_dest": f"file {workdir / 'mosquitto.log'}",
    }
    for key, value in {**harness, **(settings or {})}.items():
        lines = [(k, v) for k, v in lines if k != key]
        lines.extend((key, item) for item in _format_values(value))

    # The listener goes first: in mosquitto.conf, listener-scoped settings
    # bind to the listener above them.
    lines.sort(key=lambda pair: pair[0] != "listener")
    return "".join(f"{key} {value}\n" for key, value in lines)


def _format_values(value: SettingValue) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (str, int, Path)):
        return [str(value)]
    return [str(item) for item in value]


class Broker:
    """One Mosquitto process with its own port, state file and log.

    ``settings`` override the derived config; they are read at every
    ``start()``, so a test may change them between restarts. The port stays
    the same across restarts.
    """

    def __init__(
        self,
        settings: Mapping[str, SettingValue] | None = None,
        *,
        port: int | None = None,
        production_config: Path = PRODUCTION_CONFIG,
    ) -> None:
        self.settings: dict[str, SettingValue] = dict(settings or {})
        self.port = port or free_port()
        self.production_config = production_config
        self.executable = _find_mosquitto()
        self.workdir = Path(tempfile.mkdtemp(prefix="spoolmq-broker-"))
        self._broker_user = _broker_user_ids()
        self._give_to_broker(self.workdir)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def state_file(self) -> Path:
        return self.workdir / STATE_FILE

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

    def write_file(self, name: str, text: str) -> Path:
        """Write a file the broker can read (a password or ACL file)."""
        path = self.workdir / name
        path.write_text(text)
        self._give_to_broker(path)
        return path

    def start(self) -> None:
        """Start Mosquitto and return once its port accepts connections."""
        if self.running:
            raise BrokerError(f"broker already running as pid {self.pid}")

        self._write_config()
        with open(self.workdir / "mosquitto.stderr", "ab") as stderr:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._wait_until_listening()
        log.info("broker started: pid %d on 127.0.0.1:%d", self.pid, self.port)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop with SIGTERM, as an operator would: Mosquitto saves its state.

        A broker that does not exit in time is killed, and BrokerError raised,
        because its state was then not saved.
        """
        if not self.running:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(
                f"broker pid {self.pid} ignored SIGTERM for {timeout} s; "
                f"killed, state not saved\n{self.log_tail()}"
            ) from None
        log.info("broker stopped: pid %d, exit %d", self.pid, self.returncode)

    def kill(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGKILL the broker: nothing since its last autosave is saved."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGKILL)
        self._process.wait(timeout=timeout)
        log.info("broker killed: pid %d", self.pid)

    def restart(self, *, keep_state: bool = True) -> None:
        """Stop if running, then start on the same port.

        With keep_state=False the state file is deleted first, as if the
        broker's disk had been lost.
        """
        self.stop()
        if not keep_state:
            self.delete_state()
        self.start()

    def delete_state(self) -> None:
        """Delete the persistence file, and any half-written one."""
        if self.running:
            raise BrokerError("cannot delete the state of a running broker")
        for name in (STATE_FILE, STATE_FILE + ".new"):
            (self.workdir / name).unlink(missing_ok=True)

    def log_text(self) -> str:
        """The broker's log so far, across restarts."""
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the log and of what the process printed."""
        stderr_file = self.workdir / "mosquitto.stderr"
        printed = (
            stderr_file.read_text(errors="replace") if stderr_file.exists() else ""
        )
        tail = (self.log_text() + printed).splitlines()[-lines:]
        return "\n".join(tail)

    def close(self) -> None:
        """Stop the broker and remove its work directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_config(self) -> None:
        settings = dict(self.settings)
        if os.geteuid() == 0 and self._broker_user is None:
            # Without its own user, root Mosquitto would fall back to
            # "nobody", who cannot write the work directory.
            settings.setdefault("user", "root")
        text = derive_config(
            self.production_config.read_text(),
            port=self.port,
            workdir=self.workdir,
            settings=settings,
        )
        self.config_file.write_text(text)

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(int(START_TIMEOUT_S / POLL_INTERVAL_S) + 1):
            if self._process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self.returncode} at start\n"
                    f"{self.log_tail()}"
                )
            if _accepts_connections(self.port):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        self.kill()
        raise BrokerError(
            f"mosquitto did not listen on port {self.port} within "
            f"{START_TIMEOUT_S} s\n{self.log_tail()}"
        )

    def _give_to_broker(self, path: Path) -> None:
        # Started as root, Mosquitto drops to its own user before it writes
        # its state and log, so that user must own the work directory.
        if os.geteuid() == 0 and self._broker_user is not None:
            os.chown(path, *self._broker_user)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _broker_user_ids() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _find_mosquitto() -> str:
    # Debian installs the broker in /usr/sbin, which is not on a normal
    # user's PATH.
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin"
    )
    if found is None:
        raise BrokerError(
            "mosquitto not found; install it: sudo apt-get install -y mosquitto"
        )
    return found

"""An emulated link for scripts/bench: two network namespaces, a slow link between.

The edge side (edge broker or spooler, producers) runs in one namespace, the
core side (core broker, subscriber or collector) in the other; the only way
between them delays packets by half the round trip each way and drops a
share of them. Two emulators make that way, behind one interface:

- ``netem``: a veth pair whose two ends each carry ``tc qdisc ... netem``;
  it needs the kernel's sch_netem.
- ``tun``: the userspace emulator of scripts/lib/linkemu.py, where the
  kernel lacks sch_netem. Each namespace holds a TUN device in place of a
  veth end, and one forwarder process moves the packets between them,
  delayed, dropped at random (seeded) and tail-dropped past its queue limit.

Either way both kernels' own TCP stacks see real delay and real loss. Every
address lives inside those namespaces, so this host's own network is not
touched, and everything made here is removed at the end, as far as it got.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import linkemu
from bench_procs import BenchError, Proc, Site

RTT_MS = 100
LOSS_PERCENT = 1.0
QUEUE_LIMIT = linkemu.DEFAULT_LIMIT
SEED = 1
SUBNET = "10.201.0"
COMMAND_TIMEOUT_S = 10.0
FORWARDER_READY_S = 10.0
FORWARDER_STOP_S = 5.0
INSTALL_HINT = "sudo apt-get install -y iproute2"
KINDS = ("auto", "netem", "tun")
LINKEMU = Path(linkemu.__file__).resolve()
DIRECTIONS = ("edge->core", "core->edge")

_tags = itertools.count()
_ran: list[Netem] = []  # every link this process brought up, for describe()


class Netem:
    """The two namespaces and the link between; use as a context manager.

    ``kind`` is "netem", "tun" or "auto" (netem when the kernel has it).
    The forwarder's log goes to ``log_dir``, or to a temporary folder that
    is removed at the end unless the forwarder failed.
    """

    def __init__(
        self,
        kind: str = "auto",
        *,
        rtt_ms: float = RTT_MS,
        loss_percent: float = LOSS_PERCENT,
        limit: int = QUEUE_LIMIT,
        seed: int = SEED,
        log_dir: Path | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r}; allowed: {', '.join(KINDS)}")
        self.requested = kind
        self.kind: str | None = None  # the one that ran, once it came up
        self.why_tun = ""
        self.rtt_ms = rtt_ms
        self.loss_percent = loss_percent
        self.limit = limit
        self.seed = seed
        self.log_dir = log_dir
        self._own_log_dir: Path | None = None
        self.forwarder: Proc | None = None
        self.forwarder_failed: str | None = None
        self.counters: dict[str, linkemu.Counters] = {}

        # Two links in one process must not share names; their addresses
        # live in their own namespaces, so those may repeat.
        serial = next(_tags)
        tag = f"{os.getpid() % 100000}" + (f"x{serial}" if serial else "")
        self.edge_ns = f"spoolmq-bench-edge-{tag}"
        self.core_ns = f"spoolmq-bench-core-{tag}"
        self.edge_if = f"smqbe{tag}"
        self.core_if = f"smqbc{tag}"
        self.made: list[str] = []
        self.edge = Site(
            "netem edge", "127.0.0.1", ("ip", "netns", "exec", self.edge_ns)
        )
        self.core = Site(
            "netem core", f"{SUBNET}.2", ("ip", "netns", "exec", self.core_ns)
        )

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # --- Making it ----------------------------------------------------------------

    def _create(self) -> None:
        kind = self._choose_kind()
        for ns in (self.edge_ns, self.core_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        if kind == "netem":
            self._create_veth_netem()
        else:
            self._create_tun()
        self.kind = kind
        _ran.append(self)

    def _choose_kind(self) -> str:
        if self.requested == "netem":
            return "netem"
        if self.requested == "tun":
            self.why_tun = "chosen by the caller"
        else:
            no_netem = netem_missing()
            if no_netem is None:
                return "netem"
            self.why_tun = no_netem
        no_tun = tun_missing()
        if no_tun is not None:
            raise BenchError(
                f"cannot emulate the link: {self.why_tun}, and the userspace "
                f"TUN emulator cannot run: {no_tun}"
            )
        return "tun"

    def _create_veth_netem(self) -> None:
        half = f"{self.rtt_ms / 2:g}ms"
        loss = f"{self.loss_percent:g}%"
        _ip(
            "-n",
            self.edge_ns,
            "link",
            "add",
            self.edge_if,
            "type",
            "veth",
            "peer",
            "name",
            self.core_if,
            "netns",
            self.core_ns,
        )
        for ns, dev, host in self._ends():
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _run(
                [
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "netem",
                    "delay",
                    half,
                    "loss",
                    loss,
                ],
                "tc",
            )

    def _create_tun(self) -> None:
        # Persistent TUN devices, configured by ip like the veth ends; they go
        # with their namespaces. No IPv6 link-local address, so no router or
        # multicast chatter crosses the link.
        for ns, dev, host in self._ends():
            _ip("-n", ns, "tuntap", "add", "dev", dev, "mode", "tun")
            _ip("-n", ns, "link", "set", dev, "addrgenmode", "none")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        self._start_forwarder()

    def _ends(self) -> list[tuple[str, str, int]]:
        return [(self.edge_ns, self.edge_if, 1), (self.core_ns, self.core_if, 2)]

    def _start_forwarder(self) -> None:
        if self.log_dir is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix="spoolmq-linkemu-"))
        folder = self.log_dir or self._own_log_dir
        argv = [
            sys.executable,
            LINKEMU,
            "--edge-netns",
            self.edge_ns,
            "--edge-dev",
            self.edge_if,
            "--core-netns",
            self.core_ns,
            "--core-dev",
            self.core_if,
            "--rtt-ms",
            f"{self.rtt_ms:g}",
            "--loss-percent",
            f"{self.loss_percent:g}",
            "--limit",
            str(self.limit),
            "--seed",
            str(self.seed),
        ]
        log = folder / f"linkemu-{self.edge_if}.log"
        try:
            self.forwarder = Proc("linkemu", argv, log)
        except OSError as exc:
            raise BenchError(f"cannot start {LINKEMU}: {exc}") from None
        try:
            self.forwarder.wait_for_log(linkemu.READY, FORWARDER_READY_S)
        except BenchError:
            lines = self.forwarder.log_text().strip().splitlines()
            self.forwarder_failed = "did not start"
            raise BenchError(
                f"the link emulator did not start: "
                f"{lines[-1] if lines else 'no output'}; log {self.forwarder.log}"
            ) from None

    # --- Removing it --------------------------------------------------------------

    def remove(self) -> None:
        """Stop the forwarder and delete the namespaces; never raises BenchError.

        Ctrl-C or SIGTERM arriving meanwhile waits until all is removed.
        """
        with _signals_held():
            # The forwarder first: its open devices keep the namespaces alive.
            self._stop_forwarder()
            # Deleting a namespace deletes the devices in it (a veth end
            # takes its peer along).
            for ns in reversed(self.made):
                try:
                    subprocess.run(
                        ["ip", "netns", "del", ns],
                        check=False,
                        capture_output=True,
                        timeout=COMMAND_TIMEOUT_S,
                    )
                except (OSError, subprocess.SubprocessError):
                    pass  # `ip netns list` shows what is left; nothing else can
            self.made.clear()

    def _stop_forwarder(self) -> None:
        proc, self.forwarder = self.forwarder, None
        if proc is None:
            return
        proc.stop(FORWARDER_STOP_S)
        self.counters = linkemu.parse_counters(proc.log_text())
        code = proc.popen.returncode
        if code != 0 and not self.forwarder_failed:
            self.forwarder_failed = f"exited with {code}"
        if self.forwarder_failed:
            self.forwarder_failed += f"; log {proc.log}"
        elif self._own_log_dir is not None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    # --- Saying what it is --------------------------------------------------------

    def describe(self) -> str:
        link = f"{self.rtt_ms:g} ms round trip, {self.loss_percent:g} % loss each way"
        if self.kind == "netem":
            return (
                f"{link}, by tc netem on both ends of a veth pair between two "
                "namespaces"
            )
        if self.kind is None:
            return f"{link}; not made"
        return (
            f"{link}, by the userspace TUN emulator ({self.why_tun}): "
            f"scripts/lib/linkemu.py forwards between a TUN device in each of two "
            f"namespaces, {self.rtt_ms / 2:g} ms delay and {self.loss_percent:g} % "
            f"seeded loss (seed {self.seed}) per direction, tail drop past "
            f"{self.limit} queued packets"
        )


def describe() -> str:
    """Which emulator made the link in this process, with what, and what it did."""
    if not _ran:
        return (
            f"{RTT_MS} ms round trip, {LOSS_PERCENT:g} % loss each way, by tc netem "
            "on a veth pair where the kernel has sch_netem, else by the userspace "
            "TUN emulator (scripts/lib/linkemu.py); no link was made"
        )
    kinds = {link.kind for link in _ran}
    text = _ran[-1].describe()
    if len(kinds) > 1:
        text += f" (earlier links in this run used {', '.join(sorted(kinds))})"
    tun = [link for link in _ran if link.kind == "tun"]
    if tun:
        text += "; packets " + "; ".join(
            _direction_totals(name, tun) for name in DIRECTIONS
        )
        failed = [link.forwarder_failed for link in tun if link.forwarder_failed]
        if failed:
            text += f"; the forwarder failed: {failed[-1]}"
    return text


def _direction_totals(name: str, links: list[Netem]) -> str:
    counted = [link.counters[name] for link in links if name in link.counters]
    total = {
        key: sum(getattr(c, key) for c in counted)
        for key in ("forwarded", "lost", "overflow")
    }
    return (
        f"{name} {total['forwarded']:,} forwarded, {total['lost']:,} lost at "
        f"random, {total['overflow']:,} over the queue limit"
    )


# --- What this machine can do ---------------------------------------------------


def unavailable() -> str | None:
    """Why the link cannot be emulated here, or None when it can.

    Tries the whole setup once, and removes it again.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc and TUN devices need CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return f"no ip; run: {INSTALL_HINT}"
    try:
        subprocess.run(
            ["ip", "-V"], check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip -V failed ({exc}); run: {INSTALL_HINT}"
    try:
        with Netem():
            pass
    except BenchError as exc:
        return str(exc)
    return None


@functools.cache
def netem_missing() -> str | None:
    """Why tc netem cannot be used here, or None; tried once per process.

    Raises BenchError when not even a namespace can be made.
    """
    if shutil.which("tc") is None:
        return f"no tc; run: {INSTALL_HINT}"
    probe = f"spoolmq-bench-probe-{os.getpid() % 100000}"
    _ip("netns", "add", probe)
    try:
        _run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem"],
            "tc",
        )
    except BenchError as exc:
        return (
            "the kernel has no sch_netem" if "lacks sch_netem" in str(exc) else str(exc)
        )
    finally:
        with _signals_held():
            subprocess.run(
                ["ip", "netns", "del", probe],
                check=False,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
            )
    return None


def tun_missing() -> str | None:
    """Why the userspace emulator cannot run here, or None."""
    if not os.path.exists(linkemu.TUN_DEVICE):
        return f"no {linkemu.TUN_DEVICE} (the kernel's tun driver; try: modprobe tun)"
    try:
        os.close(os.open(linkemu.TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"cannot open {linkemu.TUN_DEVICE}: {exc.strerror}"
    return None


# --- Helpers --------------------------------------------------------------------


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM in this thread; they arrive at the end."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _ip(*args: str) -> None:
    _run(["ip", *args], "ip")


def _run(argv: list[str], tool: str) -> None:
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"{' '.join(argv)} failed: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        hint = ""
        if "netem" in argv and "unknown" in " ".join(why).lower():
            hint = " (the kernel lacks sch_netem; try: modprobe sch_netem)"
        raise BenchError(
            f"`{' '.join(argv)}` failed: {why[-1] if why else done.returncode}{hint}"
        )

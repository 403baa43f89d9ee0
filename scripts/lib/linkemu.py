"""A slow, lossy link in user space, between TUN devices in two namespaces.

scripts/lib/bench_netem.py uses this where the kernel has no sch_netem. Each
namespace holds one TUN device (IFF_TUN | IFF_NO_PI) in place of a veth end,
with its address and route set by ``ip``. This forwarder attaches to both,
enters each namespace only to open its device, and moves IP packets across:
each direction holds every packet for half the round trip, drops a share of
them at random (seeded), and drops at the tail once its queue holds
``--limit`` packets, as netem does with its default limit of 1000. Both
kernels' own TCP stacks see the delay and the loss, so retransmissions and
congestion control are real.

    python scripts/lib/linkemu.py --edge-netns A --edge-dev tunA \\
        --core-netns B --core-dev tunB [--rtt-ms 100] [--loss-percent 1]

It runs until SIGTERM or SIGINT (or its --lifetime-s), then logs its
counters per direction and exits 0. It needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN) and /dev/net/tun. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import logging
import os
import random
import select
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

log = logging.getLogger("linkemu")

DEFAULT_RTT_MS = 100.0
DEFAULT_LOSS_PERCENT = 1.0
DEFAULT_LIMIT = 1000  # packets per direction, netem's default
DEFAULT_SEED = 1
DEFAULT_LIFETIME_S = 6 * 3600.0
READ_BATCH = 64  # packets read from one device before the other gets a turn
MAX_PACKET = 65535
WAKEUPS_PER_S = 100_000  # bounds the main loop's count beside its lifetime
READY = "forwarding between"
COUNTERS = "counters"

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
NETNS_DIR = "/run/netns"


class LinkError(Exception):
    """The link cannot be made or kept; ``exit_code`` is a sysexits code."""

    def __init__(self, message: str, exit_code: int = os.EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Settings:
    """What the link does to the packets of each direction."""

    rtt_ms: float = DEFAULT_RTT_MS
    loss_percent: float = DEFAULT_LOSS_PERCENT
    limit: int = DEFAULT_LIMIT
    seed: int = DEFAULT_SEED
    lifetime_s: float = DEFAULT_LIFETIME_S

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_ms <= 60_000:
            raise LinkError(f"rtt_ms: {self.rtt_ms:g}; allowed 0 to 60000", os.EX_USAGE)
        if not 0 <= self.loss_percent <= 100:
            raise LinkError(
                f"loss_percent: {self.loss_percent:g}; allowed 0 to 100", os.EX_USAGE
            )
        if not 1 <= self.limit <= 1_000_000:
            raise LinkError(
                f"limit: {self.limit}; allowed 1 to 1000000 packets", os.EX_USAGE
            )
        if not 0 < self.lifetime_s <= 7 * 86400:
            raise LinkError(
                f"lifetime_s: {self.lifetime_s:g}; allowed above 0 up to 604800",
                os.EX_USAGE,
            )

    @property
    def delay_s(self) -> float:
        return self.rtt_ms / 2 / 1000

    def describe(self) -> str:
        return (
            f"{self.rtt_ms / 2:g} ms delay and {self.loss_percent:g} % loss "
            f"each way (seed {self.seed}), queue limit {self.limit} packets"
        )


# --- Namespaces and devices -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise LinkError(
            f"setns into {what}: {os.strerror(code)}",
            os.EX_NOPERM if code == errno.EPERM else os.EX_OSERR,
        )


@contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the calling thread inside network namespace ``name``, then return.

    Sockets and devices opened inside stay in that namespace afterwards.
    """
    path = os.path.join(NETNS_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LinkError(
            f"no network namespace {name} ({path}: {exc.strerror})"
        ) from None
    # setns moves only the calling thread, so this thread's own is the way back.
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target, f"namespace {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home, "this process's namespace")
    finally:
        os.close(home)


def open_tun(netns: str, dev: str) -> int:
    """Attach to TUN device ``dev`` in ``netns``: a non-blocking fd of IP packets."""
    if len(dev.encode()) >= IFNAMSIZ:
        raise LinkError(f"device name {dev!r}: at most 15 bytes", os.EX_USAGE)
    with inside_netns(netns):
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise LinkError(
                f"cannot open {TUN_DEVICE}: {exc.strerror} (try: modprobe tun)",
                os.EX_NOPERM if exc.errno == errno.EPERM else os.EX_UNAVAILABLE,
            ) from None
        request = struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as exc:
            os.close(fd)
            raise LinkError(
                f"cannot attach to TUN device {dev} in {netns}: {exc.strerror}",
                os.EX_NOPERM if exc.errno == errno.EPERM else os.EX_UNAVAILABLE,
            ) from None
    os.set_blocking(fd, False)
    return fd


# --- Forwarding -------------------------------------------------------------------


@dataclass
class Counters:
    """Packets of one direction; every packet read ends in exactly one of
    forwarded, lost, overflow, write_errors or unsent."""

    received: int = 0
    forwarded: int = 0
    lost: int = 0  # dropped at random
    overflow: int = 0  # dropped at the tail: the queue held ``limit`` packets
    write_errors: int = 0
    unsent: int = 0  # still queued at the stop
    bytes: int = 0  # forwarded

    def as_text(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def parse_counters(text: str) -> dict[str, Counters]:
    """The counters per direction ("edge->core", "core->edge") in a log."""
    found = {}
    prefix = f"{COUNTERS} "
    for line in text.splitlines():
        _, marker, rest = line.partition(prefix)
        name, colon, values = rest.partition(": ")
        if not marker or not colon or "->" not in name:
            continue
        try:
            pairs = dict(item.split("=", 1) for item in values.split())
            found[name] = Counters(**{k: int(v) for k, v in pairs.items()})
        except (TypeError, ValueError):
            continue
    return found


class Direction:
    """One way across the link: a FIFO of (due time, packet).

    Every packet of a direction waits the same delay, so the FIFO is already
    sorted by due time: its head is the only timer the direction has, and
    packets leave in the order they came.
    """

    def __init__(
        self, name: str, src: int, dst: int, settings: Settings, dst_dev: str
    ) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.dst_dev = dst_dev
        self.delay_s = settings.delay_s
        self.loss = settings.loss_percent / 100
        self.limit = settings.limit
        self.rng = random.Random(f"{settings.seed}:{name}")
        self.queue: deque[tuple[float, bytes]] = deque()
        self.counters = Counters()
        self._write_error_logged = False

    def take(self) -> None:
        """Read what the source device has (up to READ_BATCH packets)."""
        for _ in range(READ_BATCH):
            try:
                packet = os.read(self.src, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError as exc:
                raise LinkError(
                    f"{self.name}: reading its TUN device failed: {exc.strerror}",
                    os.EX_IOERR,
                ) from None
            if not packet:
                raise LinkError(f"{self.name}: its TUN device closed", os.EX_IOERR)
            self.counters.received += 1
            # Loss before the limit, as netem decides.
            if self.loss and self.rng.random() < self.loss:
                self.counters.lost += 1
            elif len(self.queue) >= self.limit:
                self.counters.overflow += 1
            else:
                self.queue.append((time.monotonic() + self.delay_s, packet))

    def release(self, now: float) -> None:
        """Write every packet whose time has come, oldest first."""
        for _ in range(len(self.queue)):
            due, packet = self.queue[0]
            if due > now:
                return
            self.queue.popleft()
            try:
                os.write(self.dst, packet)
            except OSError as exc:
                # The kernel refuses a packet it cannot route or parse, or
                # any while the device is down: a lost packet, not a stop.
                self.counters.write_errors += 1
                if not self._write_error_logged:
                    self._write_error_logged = True
                    log.warning(
                        "%s: writing to %s failed (%s); counting such packets "
                        "as write errors from now on",
                        self.name,
                        self.dst_dev,
                        exc.strerror,
                    )
                continue
            self.counters.forwarded += 1
            self.counters.bytes += len(packet)

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class Forwarder:
    """Both directions, one poll loop, stopped by a signal or its lifetime."""

    def __init__(
        self, edge: tuple[int, str], core: tuple[int, str], settings: Settings
    ) -> None:
        (edge_fd, edge_dev), (core_fd, core_dev) = edge, core
        self.settings = settings
        self.directions = (
            Direction("edge->core", edge_fd, core_fd, settings, core_dev),
            Direction("core->edge", core_fd, edge_fd, settings, edge_dev),
        )
        self.by_fd = {d.src: d for d in self.directions}
        self.stop_signal: int | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def catch_signals(self) -> None:
        """From now on SIGTERM and SIGINT stop the loop; before it starts too."""
        # The wakeup fd makes a signal end the poll at once, whatever its timeout.
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def run(self) -> str:
        """Forward until stopped; return why it stopped."""
        poller = select.poll()
        for fd in (*self.by_fd, self._wake_r):
            poller.register(fd, select.POLLIN)
        started = time.monotonic()
        deadline = started + self.settings.lifetime_s
        for _ in range(int(self.settings.lifetime_s * WAKEUPS_PER_S) + 1):
            if self.stop_signal is not None:
                return signal.Signals(self.stop_signal).name
            now = time.monotonic()
            if now >= deadline:
                return f"lifetime of {self.settings.lifetime_s:g} s over"
            for direction in self.directions:
                direction.release(now)
            for fd, events in poller.poll(self._timeout_ms(now, deadline)):
                if fd == self._wake_r:
                    self._drain_wakeups()
                elif events & select.POLLIN:
                    self.by_fd[fd].take()
                else:
                    raise LinkError(
                        f"{self.by_fd[fd].name}: its TUN device failed "
                        f"(poll events {events:#x})",
                        os.EX_IOERR,
                    )
        return "wakeup cap reached"

    def _timeout_ms(self, now: float, deadline: float) -> float:
        dues = [d for d in (x.next_due() for x in self.directions) if d is not None]
        until = min([*dues, deadline]) - now
        # poll rounds up to whole milliseconds: a packet leaves at most ~1 ms late.
        return max(until, 0.0) * 1000

    def _drain_wakeups(self) -> None:
        for _ in range(64):
            try:
                if not os.read(self._wake_r, 256):
                    return
            except BlockingIOError:
                return

    def log_counters(self) -> None:
        for direction in self.directions:
            direction.counters.unsent = len(direction.queue)
            log.info(
                "%s %s: %s", COUNTERS, direction.name, direction.counters.as_text()
            )


# --- Command line -----------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 64 (EX_USAGE) with one line."""

    def error(self, message: str):
        self.exit(os.EX_USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="linkemu",
        description="Forward IP packets between two TUN devices in two network "
        "namespaces, delayed and dropped like a slow, lossy link.",
    )
    parser.add_argument("--edge-netns", required=True, help="namespace of one end")
    parser.add_argument("--edge-dev", required=True, help="TUN device in it")
    parser.add_argument("--core-netns", required=True, help="namespace of the other")
    parser.add_argument("--core-dev", required=True, help="TUN device in it")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=DEFAULT_RTT_MS,
        help=f"round trip added; half each way (default {DEFAULT_RTT_MS:g})",
    )
    parser.add_argument(
        "--loss-percent",
        type=float,
        default=DEFAULT_LOSS_PERCENT,
        help=f"share dropped at random, each way (default {DEFAULT_LOSS_PERCENT:g})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"packets queued per direction before tail drop (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the drops (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--lifetime-s",
        type=float,
        default=DEFAULT_LIFETIME_S,
        help=f"stop by itself after this long (default {DEFAULT_LIFETIME_S:g})",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Stop with the process that started this one, even when it is killed.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    try:
        settings = Settings(
            args.rtt_ms, args.loss_percent, args.limit, args.seed, args.lifetime_s
        )
        edge = open_tun(args.edge_netns, args.edge_dev)
        core = open_tun(args.core_netns, args.core_dev)
    except LinkError as exc:
        log.error("cannot start: %s", exc)
        return exc.exit_code

    forwarder = Forwarder((edge, args.edge_dev), (core, args.core_dev), settings)
    # Whoever waits for the ready line may stop this at once: catch that first.
    forwarder.catch_signals()
    log.info(
        "%s %s in %s and %s in %s: %s (pid %d)",
        READY,
        args.edge_dev,
        args.edge_netns,
        args.core_dev,
        args.core_netns,
        settings.describe(),
        os.getpid(),
    )
    started = time.monotonic()
    try:
        why = forwarder.run()
    except LinkError as exc:
        log.error("stopped: %s", exc)
        forwarder.log_counters()
        return exc.exit_code
    forwarder.log_counters()
    log.info("stopped after %.1f s (%s)", time.monotonic() - started, why)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""An emulated link for scripts/bench: two network namespaces and a veth pair.

The edge side (edge broker or spooler, producers) runs in one namespace, the
core side (core broker, subscriber or collector) in the other; the only way
between them is a veth pair whose two ends each delay packets by half the
round trip and drop a share of them (``tc qdisc ... netem``). Every address
lives inside those namespaces, so this host's own network is not touched,
and everything made here is removed at the end, as far as it got.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Self

from bench_procs import BenchError, Site

RTT_MS = 100
LOSS_PERCENT = 1.0
SUBNET = "10.201.0"
COMMAND_TIMEOUT_S = 10.0
INSTALL_HINT = "sudo apt-get install -y iproute2"


class Netem:
    """The two namespaces; use as a context manager."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
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

    def _create(self) -> None:
        half = f"{RTT_MS / 2:g}ms"
        loss = f"{LOSS_PERCENT:g}%"
        for ns in (self.edge_ns, self.core_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
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
        for ns, dev, host in (
            (self.edge_ns, self.edge_if, 1),
            (self.core_ns, self.core_if, 2),
        ):
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

    def remove(self) -> None:
        # Deleting a namespace deletes the veth end in it, and with it its peer.
        for ns in reversed(self.made):
            subprocess.run(
                ["ip", "netns", "del", ns],
                check=False,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        self.made.clear()


def describe() -> str:
    return (
        f"{RTT_MS} ms round trip, {LOSS_PERCENT:g} % loss each way "
        f"(netem on both ends of a veth pair between two namespaces)"
    )


def unavailable() -> str | None:
    """Why the link cannot be emulated here, or None when it can.

    Tries the whole setup once, and removes it again.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool}; run: {INSTALL_HINT}"
        try:
            subprocess.run(
                [tool, "-V"], check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{tool} -V failed ({exc}); run: {INSTALL_HINT}"
    try:
        with Netem():
            pass
    except BenchError as exc:
        return str(exc)
    return None


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

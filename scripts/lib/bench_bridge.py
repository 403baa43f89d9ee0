"""Mosquitto without spoolmq: its own clients on one broker, and a bridge.

Every run uses ``mosquitto_pub -q 1 -l`` fed the records through a pipe and
``mosquitto_sub -q 1 -C N`` on a persistent session (``-c -i ID``) made
beforehand with ``-E``, so nothing published before the subscriber runs is
lost. The time is taken from the start of the path (the publisher's start,
or for a backlog the moment the path opens) to the subscriber's exit after
its N-th message; its output is then checked to hold every record once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_procs import (
    LOOPBACK,
    BenchError,
    MosquittoBroker,
    Proc,
    Procs,
    Site,
    Usage,
    find_tool,
    usage,
    wait_bounded,
)

TOPIC = "bench/records"
SUB_ID = "bench-sub"
BRIDGE_ID = "bench-bridge"
SESSION_TIMEOUT_S = 20.0
MIN_RATE = 100.0  # records/s below which a run is given up as stuck

# Mosquitto's default window, and none at all; on both brokers of a bridge.
WINDOWS = {
    "default": {"max_inflight_messages": 20},
    "tuned": {"max_inflight_messages": 0},
}


@dataclass
class Result:
    records: int
    seconds: float
    edge: Usage | None = None

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def time_limit(records: int) -> float:
    return 60.0 + records / MIN_RATE


def bridge_section(core: MosquittoBroker) -> str:
    """The edge broker's bridge to ``core``: QoS 1, persistent both ways."""
    return "\n".join(
        [
            "",
            "connection bench-core",
            f"address {core.site.host}:{core.port}",
            f"topic {TOPIC} out 1",
            "cleansession false",
            f"clientid {BRIDGE_ID}",
            "bridge_protocol_version mqttv311",
            "bridge_max_packet_size 1048576",
            "try_private false",
            # Retry about every two seconds, so a backlog drain starts soon after
            # the core broker comes back. NOTE: Mosquitto 2.0.11 waits 5-8 s
            # between attempts with a single value ("restart_timeout 1"); a base
            # and a cap ("1 1") are honoured.
            "restart_timeout 1 1",
            "",
        ]
    )


def client_argv(tool: str, broker: MosquittoBroker, *args: object) -> list:
    """A Mosquitto client at QoS 1 on the bench topic of ``broker``."""
    return [
        find_tool(tool),
        "-h",
        broker.site.host,
        "-p",
        broker.port,
        "-q",
        "1",
        "-t",
        TOPIC,
        *args,
    ]


def make_session(broker: MosquittoBroker, procs: Procs, workdir: Path) -> None:
    """Create the subscriber's persistent session and subscription, then leave."""
    proc = procs.add(
        Proc(
            "mosquitto_sub -E",
            broker.site.argv(
                client_argv("mosquitto_sub", broker, "-c", "-i", SUB_ID, "-E")
            ),
            workdir / "sub-session.log",
        )
    )
    if proc.wait(SESSION_TIMEOUT_S) != 0:
        raise BenchError(
            f"mosquitto_sub -E exited {proc.popen.returncode}; log {proc.log}"
        )


def start_sub(
    broker: MosquittoBroker, procs: Procs, workdir: Path, count: int
) -> tuple[Proc, Path]:
    out = workdir / "received.jsonl"
    proc = procs.add(
        Proc(
            "mosquitto_sub",
            broker.site.argv(
                client_argv("mosquitto_sub", broker, "-c", "-i", SUB_ID, "-C", count)
            ),
            workdir / "sub.log",
            stdout=out,
        )
    )
    return proc, out


class Publisher:
    """``mosquitto_pub -q 1 -l`` fed the records through a pipe held open.

    mosquitto_pub 2.0.11 leaves at the end of its input with messages it
    read but never sent (of 100,000 lines about 34,000 arrive), so its input
    stays open until the records are known to have arrived: at the
    subscriber, or, with ``count_acks``, by the PUBACKs in its ``-d`` output
    (line-buffered through ``stdbuf``), which a backlog needs before its
    clock starts.
    """

    def __init__(self, proc: Proc, records: Path, count_acks: bool) -> None:
        self.proc = proc
        self.acked = 0
        self._feeder = threading.Thread(target=self._feed, args=(records,), daemon=True)
        self._feeder.start()
        if count_acks:
            threading.Thread(target=self._count, daemon=True).start()

    def _feed(self, records: Path) -> None:
        try:
            with open(records, "rb") as f:
                shutil.copyfileobj(f, self.proc.popen.stdin, 1 << 16)
            self.proc.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it exited early; finish() reports its exit code

    def _count(self) -> None:
        for line in self.proc.popen.stdout:
            if b" received PUBACK" in line:
                self.acked += 1

    def wait_acked(self, count: int) -> None:
        """Wait until the broker acknowledged ``count`` messages."""

        def acked() -> bool:
            if self.acked >= count:
                return True
            if not self.proc.running:
                self.finish()
                raise BenchError(
                    f"mosquitto_pub left with {self.acked} of {count} messages "
                    f"acknowledged; log {self.proc.log}"
                )
            return False

        wait_bounded(acked, time_limit(count), f"mosquitto_pub: {count} acknowledged")

    def finish(self) -> None:
        """Close its input and check that it exited cleanly."""
        self._feeder.join(SESSION_TIMEOUT_S)
        with contextlib.suppress(BrokenPipeError):
            self.proc.popen.stdin.close()
        code = self.proc.wait(SESSION_TIMEOUT_S)
        if code != 0:
            raise BenchError(f"mosquitto_pub exited {code}; log {self.proc.log}")


def publish(
    broker: MosquittoBroker,
    procs: Procs,
    workdir: Path,
    records: Path,
    site: Site | None = None,
    *,
    count_acks: bool = False,
) -> Publisher:
    """mosquitto_pub, run on ``site`` (default: the broker's) into ``broker``."""
    argv = client_argv("mosquitto_pub", broker, "-i", "bench-pub", "-l")
    if count_acks:
        argv = [find_tool("stdbuf"), "-oL", *argv, "-d"]
    proc = Proc(
        "mosquitto_pub",
        (site or broker.site).argv(argv),
        workdir / "pub.log",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if count_acks else None,
    )
    procs.add(proc)
    return Publisher(proc, records, count_acks)


def wait_sub(sub: Proc, count: int, pub: Publisher | None) -> float:
    """Wait for the subscriber's N-th message; return the time it exited."""

    def exited() -> float | None:
        if not sub.running:
            if sub.popen.returncode != 0:
                raise BenchError(
                    f"mosquitto_sub exited {sub.popen.returncode}; log {sub.log}"
                )
            return time.monotonic()
        if pub is not None and not pub.proc.running:
            pub.finish()
            raise BenchError(f"mosquitto_pub left early; log {pub.proc.log}")
        return None

    return wait_bounded(exited, time_limit(count), f"mosquitto_sub: {count} received")


def check_received(out: Path, count: int) -> None:
    rids = set()
    lines = 0
    with open(out, encoding="utf-8") as f:
        for line in f:
            lines += 1
            rids.add(json.loads(line)["rid"])
    if lines != count or len(rids) != count:
        raise BenchError(
            f"subscriber got {lines} messages, {len(rids)} distinct "
            f"records; {count} were published"
        )


# --- (a) one broker, Mosquitto's own clients -------------------------------------


def ceiling(
    workdir: Path,
    records: Path,
    count: int,
    *,
    backlog: bool,
    edge_site: Site = LOOPBACK,
    core_site: Site = LOOPBACK,
) -> Result:
    """Publisher and subscriber on one broker with the project's config.

    The publisher runs on ``edge_site``; broker and subscriber on
    ``core_site``. A backlog is published while the subscriber is away; the
    clock starts when it comes back.
    """
    procs = Procs()
    try:
        broker = MosquittoBroker("broker", workdir / "broker", procs, site=core_site)
        broker.start()
        make_session(broker, procs, workdir)
        if backlog:
            pub = publish(broker, procs, workdir, records, edge_site, count_acks=True)
            pub.wait_acked(count)
            pub.finish()
            began = time.monotonic()
            sub, out = start_sub(broker, procs, workdir, count)
        else:
            sub, out = start_sub(broker, procs, workdir, count)
            began = time.monotonic()
            pub = publish(broker, procs, workdir, records, edge_site)
        ended = wait_sub(sub, count, None if backlog else pub)
        if not backlog:
            pub.finish()
        check_received(out, count)
        return Result(count, ended - began)
    finally:
        procs.stop_all()


# --- (b) an edge broker bridged to the core broker -------------------------------


def bridge(
    workdir: Path,
    records: Path,
    count: int,
    *,
    window: str,
    backlog: bool,
    edge_site: Site = LOOPBACK,
    core_site: Site = LOOPBACK,
) -> Result:
    """mosquitto_pub into the edge broker, mosquitto_sub on the core broker.

    For a backlog the core broker is down while the records are published
    into the edge broker; the clock starts when the core broker is started.
    """
    procs = Procs()
    settings = WINDOWS[window]
    try:
        core = MosquittoBroker(
            "core-broker",
            workdir / "core-broker",
            procs,
            site=core_site,
            settings=settings,
        )
        core.start()
        make_session(core, procs, workdir)
        if backlog:
            core.stop()
        edge = MosquittoBroker(
            "edge-broker",
            workdir / "edge-broker",
            procs,
            site=edge_site,
            settings=settings,
            extra=bridge_section(core),
        )
        edge.start()
        if backlog:
            # The edge's CPU and disk count both accepting and draining.
            before = usage(edge.pid)
            pub = publish(edge, procs, workdir, records, count_acks=True)
            pub.wait_acked(count)
            pub.finish()
            began = time.monotonic()
            core.start()
            sub, out = start_sub(core, procs, workdir, count)
        else:
            core.wait_for_log(f"as {BRIDGE_ID}")
            sub, out = start_sub(core, procs, workdir, count)
            before = usage(edge.pid)
            began = time.monotonic()
            pub = publish(edge, procs, workdir, records)
        ended = wait_sub(sub, count, None if backlog else pub)
        used = usage(edge.pid) - before
        if not backlog:
            pub.finish()
        check_received(out, count)
        return Result(count, ended - began, used)
    finally:
        procs.stop_all()


def idle_bridge(workdir: Path, procs: Procs) -> MosquittoBroker:
    """A connected edge broker with its bridge up and nothing to carry."""
    settings = WINDOWS["tuned"]
    core = MosquittoBroker(
        "core-broker", workdir / "core-broker", procs, settings=settings
    )
    core.start()
    edge = MosquittoBroker(
        "edge-broker",
        workdir / "edge-broker",
        procs,
        settings=settings,
        extra=bridge_section(core),
    )
    edge.start()
    core.wait_for_log(f"as {BRIDGE_ID}")
    return edge

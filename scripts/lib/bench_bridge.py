"""Mosquitto without spoolmq: its own clients on one broker, and a bridge.

Every run uses ``mosquitto_pub -q 1 -l`` fed the records file on stdin and
``mosquitto_sub -q 1 -C N`` on a persistent session (``-c -i ID``) made
beforehand with ``-E``, so nothing published before the subscriber runs is
lost. The time is taken from the start of the path (the publisher's start,
or for a backlog the moment the path opens) to the subscriber's exit after
its N-th message; its output is then checked to hold every record once.
"""

from __future__ import annotations

import json
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
)

TOPIC = "bench/records"
SUB_ID = "bench-sub"
BRIDGE_ID = "bench-bridge"
SESSION_TIMEOUT_S = 20.0
MIN_RATE = 100.0  # records/s below which a run is given up as stuck
STALL_S = 10.0

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


def make_session(broker: MosquittoBroker, procs: Procs, workdir: Path) -> None:
    """Create the subscriber's persistent session and subscription, then leave."""
    proc = procs.add(
        Proc(
            "mosquitto_sub -E",
            broker.site.argv(
                [
                    find_tool("mosquitto_sub"),
                    "-h",
                    broker.site.host,
                    "-p",
                    broker.port,
                    "-q",
                    "1",
                    "-c",
                    "-i",
                    SUB_ID,
                    "-t",
                    TOPIC,
                    "-E",
                ]
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
                [
                    find_tool("mosquitto_sub"),
                    "-h",
                    broker.site.host,
                    "-p",
                    broker.port,
                    "-q",
                    "1",
                    "-c",
                    "-i",
                    SUB_ID,
                    "-t",
                    TOPIC,
                    "-C",
                    count,
                ]
            ),
            workdir / "sub.log",
            stdout=out,
        )
    )
    return proc, out


def publish(
    broker: MosquittoBroker,
    procs: Procs,
    workdir: Path,
    records: Path,
    site: Site | None = None,
) -> Proc:
    """mosquitto_pub, run on ``site`` (default: the broker's) into ``broker``."""
    return procs.add(
        Proc(
            "mosquitto_pub",
            (site or broker.site).argv(
                [
                    find_tool("mosquitto_pub"),
                    "-h",
                    broker.site.host,
                    "-p",
                    broker.port,
                    "-q",
                    "1",
                    "-i",
                    "bench-pub",
                    "-t",
                    TOPIC,
                    "-l",
                ]
            ),
            workdir / "pub.log",
            stdin=records,
        )
    )


def wait_pub(pub: Proc, count: int) -> None:
    if pub.wait(time_limit(count)) != 0:
        raise BenchError(f"mosquitto_pub exited {pub.popen.returncode}; log {pub.log}")


def wait_sub(sub: Proc, out: Path, count: int, pub: Proc | None) -> float:
    """Wait for the subscriber's N-th message; return the time it exited.

    TODO: mosquitto_pub 2.0.11 with -l and -q 1 exits at the end of its input
    with part of what it read never sent (100,000 lines: about 34,000
    arrive), so the Mosquitto rows fail at full size. Once the publisher is
    gone and nothing more arrives for STALL_S, the run fails saying so.
    Ends when the publisher's stdin is held open until the subscriber has
    every record.
    """
    deadline = time.monotonic() + time_limit(count)
    seen, since = -1, time.monotonic()
    for _ in range(int(time_limit(count) / 0.02) + 2):
        if not sub.running:
            if sub.popen.returncode != 0:
                raise BenchError(
                    f"mosquitto_sub exited {sub.popen.returncode}; log {sub.log}"
                )
            return time.monotonic()
        now = time.monotonic()
        if now >= deadline:
            break
        if pub is not None and not pub.running and now - since >= 1.0:
            lines = _count_lines(out)
            if lines == seen and now - since >= STALL_S:
                raise BenchError(
                    f"mosquitto_pub -l exited at the end of its input with "
                    f"messages unsent: {lines} of {count} arrived (a fault "
                    f"of mosquitto_pub 2.0.11; not measured)"
                )
            if lines != seen:
                seen, since = lines, now
        time.sleep(0.02)
    raise BenchError(
        f"mosquitto_sub: {count} messages not received within "
        f"{time_limit(count):.0f} s; log {sub.log}"
    )


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


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
            pub = publish(broker, procs, workdir, records, edge_site)
            wait_pub(pub, count)
            began = time.monotonic()
            sub, out = start_sub(broker, procs, workdir, count)
        else:
            sub, out = start_sub(broker, procs, workdir, count)
            began = time.monotonic()
            pub = publish(broker, procs, workdir, records, edge_site)
        ended = wait_sub(sub, out, count, pub)
        if not backlog:
            wait_pub(pub, count)
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
            pub = publish(edge, procs, workdir, records)
            wait_pub(pub, count)
            began = time.monotonic()
            core.start()
            sub, out = start_sub(core, procs, workdir, count)
        else:
            core.wait_for_log(f"as {BRIDGE_ID}")
            sub, out = start_sub(core, procs, workdir, count)
            before = usage(edge.pid)
            began = time.monotonic()
            pub = publish(edge, procs, workdir, records)
        ended = wait_sub(sub, out, count, pub)
        used = usage(edge.pid) - before
        if not backlog:
            wait_pub(pub, count)
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

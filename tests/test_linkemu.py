"""The userspace link emulator: real namespaces, a real forwarder, real TCP.

scripts/lib/linkemu.py behind bench_netem.Netem(kind="tun"), as scripts/bench
uses it on a kernel without sch_netem. Sockets are opened inside the two
namespaces from this process, so what crosses the link is measured on both
ends: the round trip, the loss each way, the queue limit, and a TCP transfer
that the kernel's own stack has to retransmit through.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

sys.path.append(str(REPO_ROOT / "scripts" / "lib"))

import bench_netem
import linkemu
from bench_procs import BenchError

pytestmark = pytest.mark.slow

EDGE_IP = f"{bench_netem.SUBNET}.1"
CORE_IP = f"{bench_netem.SUBNET}.2"
PROBES = 20
DATAGRAMS = 600
BURST = 20
TCP_BYTES = 3 * 1024 * 1024
TCP_TIMEOUT_S = 60.0  # BBR takes ~1 s here; a loss-bound CUBIC far longer
QUIET_S = 0.4  # no datagram for this long: the rest were lost
# struct tcp_info up to tcpi_total_retrans: 8 one-byte fields, then 24 u32.
TCP_INFO = struct.Struct("8B24I")
TCPI_RTT_US = 8 + 15
TCPI_TOTAL_RETRANS = 8 + 23


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces and TUN devices need CAP_NET_ADMIN"
    if subprocess.run(["ip", "-V"], capture_output=True, check=False).returncode:
        return "needs ip from iproute2"
    return bench_netem.tun_missing()


if reason := _why_skip():
    pytestmark = [pytestmark, pytest.mark.skip(reason=reason)]


# --- Helpers --------------------------------------------------------------------


def udp_socket(netns: str, ip: str = "") -> socket.socket:
    with linkemu.inside_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((ip, 0))
    return sock


def receive(sock: socket.socket, timeout: float) -> bytes | None:
    ready, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(2048) if ready else None


def send_numbered(
    sender: socket.socket, receiver: socket.socket, count: int, burst: int
) -> list[int]:
    """Send ``count`` numbered datagrams in bursts; the numbers that arrived."""
    got: list[int] = []
    to = receiver.getsockname()
    for start in range(0, count, burst):
        for n in range(start, min(start + burst, count)):
            sender.sendto(n.to_bytes(4, "big") + b"x" * 60, to)
        _drain_into(got, receiver, 0.005)
    for _ in range(int(10 / QUIET_S)):
        if len(got) == count or not _drain_into(got, receiver, QUIET_S):
            break
    return got


def _drain_into(got: list[int], sock: socket.socket, wait: float) -> int:
    """Read what arrives until ``wait`` passes without a datagram."""
    before = len(got)
    for _ in range(DATAGRAMS * 2):
        data = receive(sock, wait)
        if data is None:
            break
        got.append(int.from_bytes(data[:4], "big"))
    return len(got) - before


def leftovers() -> list[str]:
    """Namespaces and forwarders of this test process still there."""
    # Netem names them after the pid, so another process's links do not count.
    ours = re.compile(rf"spoolmq-bench-(edge|core)-{os.getpid() % 100000}(x\d+)?")
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    found = [f"netns {name}" for name in names if ours.fullmatch(name)]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"linkemu" in cmdline:
            found.append(f"forwarder pid {stat.parent.name}")
    return found


def device_in_root_netns(dev: str) -> bool:
    shown = subprocess.run(
        ["ip", "link", "show", "dev", dev], capture_output=True, check=False
    )
    return shown.returncode == 0


# --- Fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    assert leftovers() == []
    yield
    assert leftovers() == [], "the link emulator left these behind"


@pytest.fixture(scope="module")
def link(tmp_path_factory) -> Iterator[bench_netem.Netem]:
    """The bench's own link: 100 ms round trip, 1 % loss each way."""
    with bench_netem.Netem("tun", log_dir=tmp_path_factory.mktemp("linkemu")) as made:
        yield made


# --- The link -------------------------------------------------------------------


def test_a_round_trip_across_the_link_takes_about_100_ms(link):
    server = udp_socket(link.core_ns, CORE_IP)
    client = udp_socket(link.edge_ns, EDGE_IP)
    rtts = []
    with server, client:
        for n in range(PROBES):
            started = time.monotonic()
            client.sendto(n.to_bytes(4, "big"), server.getsockname())
            data = receive(server, 1.0)
            if data is None:
                continue  # lost on the way there
            server.sendto(data, client.getsockname())
            if receive(client, 1.0) is not None:
                rtts.append((time.monotonic() - started) * 1000)
    rtts.sort()
    assert len(rtts) >= PROBES - 5, f"only {len(rtts)} of {PROBES} came back"
    median = rtts[len(rtts) // 2]
    print(
        f"UDP round trip over {len(rtts)} probes: median {median:.1f} ms, "
        f"min {rtts[0]:.1f}, max {rtts[-1]:.1f}"
    )
    assert 90 <= median <= 200
    assert rtts[0] >= 95, "a packet crossed faster than the delay"


def test_a_few_megabytes_over_tcp_arrive_intact_through_real_retransmissions(link):
    payload = random.Random(5).randbytes(TCP_BYTES)
    with linkemu.inside_netns(link.core_ns):
        listener = socket.create_server((CORE_IP, 0))
    with linkemu.inside_netns(link.edge_ns):
        client = socket.socket()
    received = hashlib.sha256()
    counted = []

    def serve() -> None:
        listener.settimeout(TCP_TIMEOUT_S)
        conn, _ = listener.accept()
        conn.settimeout(TCP_TIMEOUT_S)
        with conn:
            total = 0
            for _ in range(TCP_BYTES):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                received.update(chunk)
                total += len(chunk)
            counted.append(total)

    server = threading.Thread(target=serve, daemon=True)
    with listener, client:
        server.start()
        client.settimeout(TCP_TIMEOUT_S)
        started = time.monotonic()
        client.connect(listener.getsockname())
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        server.join(TCP_TIMEOUT_S)
        took = time.monotonic() - started
        info = TCP_INFO.unpack(
            client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
        )
    assert not server.is_alive(), "the transfer did not finish"
    assert counted == [TCP_BYTES]
    assert received.digest() == hashlib.sha256(payload).digest()
    rtt_ms = info[TCPI_RTT_US] / 1000
    retransmitted = info[TCPI_TOTAL_RETRANS]
    print(
        f"TCP: {TCP_BYTES / took / 1e6:.2f} MB/s; the sender's smoothed RTT "
        f"{rtt_ms:.1f} ms, {retransmitted} segments retransmitted"
    )
    assert 90 <= rtt_ms <= 300
    assert retransmitted > 0, "1 % loss and not one retransmission"


def test_a_tenth_lost_each_way_is_a_tenth_give_or_take_and_order_is_kept(tmp_path):
    # 10 % on 600 datagrams: a 0 % or 1 % link cannot pass the band, nor a
    # 20 % one; the seed makes the drops the same on every run.
    with bench_netem.Netem("tun", loss_percent=10, seed=7, log_dir=tmp_path) as lossy:
        edge = udp_socket(lossy.edge_ns, EDGE_IP)
        core = udp_socket(lossy.core_ns, CORE_IP)
        with edge, core:
            there = send_numbered(edge, core, DATAGRAMS, BURST)
            back = send_numbered(core, edge, DATAGRAMS, BURST)
    lost = {"edge->core": DATAGRAMS - len(there), "core->edge": DATAGRAMS - len(back)}
    print(f"lost of {DATAGRAMS} each way: {lost}")
    for name, count in lost.items():
        assert 30 <= count <= 100, f"{name}: {count} of {DATAGRAMS} lost"
        assert lossy.counters[name].lost == count, "counted drops and losses differ"
    assert there == sorted(there) and back == sorted(back), "packets reordered"


def test_a_burst_past_the_queue_limit_is_dropped_at_the_tail_and_counted(tmp_path):
    limit = 50
    with bench_netem.Netem("tun", loss_percent=0, limit=limit, log_dir=tmp_path) as q:
        edge = udp_socket(q.edge_ns, EDGE_IP)
        core = udp_socket(q.core_ns, CORE_IP)
        with edge, core:
            # The whole burst leaves within a few ms, well inside the 50 ms
            # that each packet waits in the queue.
            got = send_numbered(edge, core, 4 * limit, 4 * limit)
    counters = q.counters["edge->core"]
    assert counters.received == 4 * limit
    assert counters.overflow + counters.forwarded == 4 * limit
    assert counters.overflow >= 2 * limit
    assert got == list(range(counters.forwarded)), "not the first ones kept"


# --- Making and removing it -----------------------------------------------------


def test_leaving_the_link_removes_its_namespaces_devices_and_forwarder():
    with bench_netem.Netem("tun") as made:
        pid = made.forwarder.pid
        log_dir = made.forwarder.log.parent
        names = (made.edge_ns, made.core_ns)
        devices = (made.edge_if, made.core_if)
        described = made.describe()
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert not any(name in listed for name in names)
    assert not any(device_in_root_netns(dev) for dev in devices)
    assert not Path(f"/proc/{pid}").exists()
    assert not log_dir.exists(), "the forwarder's temporary log was kept"
    assert made.forwarder_failed is None
    assert set(made.counters) == {"edge->core", "core->edge"}, "no counters at exit"
    assert "userspace TUN emulator" in described
    assert "50 ms delay and 1 % seeded loss" in described
    assert "userspace TUN emulator" in bench_netem.describe()


def test_a_forwarder_that_cannot_start_leaves_nothing_and_says_why(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(bench_netem, "LINKEMU", tmp_path / "no-such-linkemu.py")
    made = bench_netem.Netem("tun", log_dir=tmp_path)
    with pytest.raises(BenchError, match="link emulator did not start"):
        made.__enter__()
    assert made.made == []
    assert made.forwarder is None


def test_ctrl_c_while_the_link_is_made_leaves_nothing(monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_netem.Netem, "_start_forwarder", interrupted)
    made = bench_netem.Netem("tun")
    with pytest.raises(KeyboardInterrupt), made:
        pass
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert made.edge_ns not in listed and made.core_ns not in listed


def test_an_unknown_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: auto, netem, tun"):
        bench_netem.Netem("veth")

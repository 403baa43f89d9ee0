"""The fault proxy breaks a loopback link in each way it promises, on demand."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from tests.harness.proxy import Proxy, ProxyError, flap_schedule

IO_TIMEOUT_S = 2.0
# How long a test listens to call a link silent.
SILENCE_S = 0.5
POLL_S = 0.05
MAX_ECHO_CONNECTIONS = 1000


class EchoServer:
    """Echoes every byte back on 127.0.0.1, one thread per connection."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.bytes_received = 0
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(IO_TIMEOUT_S)
        self._listener.close()
        alive = [t for t in self._threads if t.is_alive()]
        assert not alive, f"echo threads still running: {alive}"

    def _accept_loop(self) -> None:
        while not self._stopping.is_set() and self.connections < MAX_ECHO_CONNECTIONS:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._echo, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _echo(self, sock: socket.socket) -> None:
        sock.settimeout(POLL_S)
        with sock:
            while not self._stopping.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.bytes_received += len(data)
                try:
                    sock.sendall(data)
                except OSError:
                    return


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[Proxy]:
    with Proxy(echo.port) as started:
        yield started


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes, or fewer if the peer closed."""
    received = b""
    deadline = time.monotonic() + IO_TIMEOUT_S
    while len(received) < size and time.monotonic() < deadline:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return receive(sock, len(data))


def is_refused(port: int) -> bool:
    """Whether a new connection is refused, reset or closed before an echo."""
    try:
        with connect(port) as sock:
            return round_trip(sock, b"hello") == b""
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
        return True


def is_silent(sock: socket.socket) -> bool:
    """Whether ``sock`` gets no byte, no EOF and no error for a while."""
    sock.settimeout(SILENCE_S)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    return False


def test_pass_forwards_bytes_both_ways_and_counts_them(proxy, echo):
    with connect(proxy.port) as sock:
        assert round_trip(sock, b"hello proxy") == b"hello proxy"

    stats = proxy.stats()
    assert stats.mode == "pass"
    assert stats.accepted == 1
    assert stats.bytes_up == stats.bytes_down == len(b"hello proxy")
    assert echo.bytes_received == len(b"hello proxy")


def test_a_close_passes_through_after_the_bytes_sent_before_it(proxy):
    with connect(proxy.port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)

        assert receive(sock, 100) == b"last words"
        assert sock.recv(1) == b""


def test_a_target_that_is_down_gives_the_client_a_reset():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with Proxy(port) as proxy:
        assert is_refused(proxy.port)
        assert proxy.stats().refused == 1


def test_cut_resets_an_open_connection_promptly(proxy):
    with connect(proxy.port) as sock:
        assert round_trip(sock, b"before") == b"before"
        started = time.monotonic()
        proxy.cut()

        try:
            received = sock.recv(1)
        except ConnectionResetError:
            received = b""
        assert received == b""
        assert time.monotonic() - started < 1.0
    assert proxy.mode == "cut"
    assert proxy.stats().resets == 2


def test_cut_refuses_new_connections_until_restore(proxy):
    proxy.cut()
    assert is_refused(proxy.port)
    assert proxy.stats().refused == 1

    proxy.restore()
    with connect(proxy.port) as sock:
        assert round_trip(sock, b"after") == b"after"


def test_blackhole_makes_recv_time_out_without_error_or_eof(proxy, echo):
    with connect(proxy.port) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxy.blackhole()

        sock.sendall(b"into the void")
        assert is_silent(sock)
    assert echo.bytes_received == len(b"before")


def test_blackhole_accepts_new_connections_but_forwards_nothing(proxy, echo):
    proxy.blackhole()

    with connect(proxy.port) as sock:
        sock.sendall(b"anyone?")
        assert is_silent(sock)
    assert proxy.stats().accepted == 1
    assert echo.connections == 0


def test_restore_resets_blackholed_connections_and_lets_new_ones_through(proxy):
    with connect(proxy.port) as stale:
        proxy.blackhole()
        proxy.restore()

        with pytest.raises(ConnectionResetError):
            stale.recv(1)

    with connect(proxy.port) as sock:
        assert round_trip(sock, b"alive again") == b"alive again"


def test_delay_adds_at_least_the_delay_each_way(proxy):
    proxy.delay(0.2)

    with connect(proxy.port) as sock:
        started = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5
    assert proxy.mode == "delay"


def test_delay_keeps_the_order_of_chunks(proxy):
    proxy.delay(0.05)
    chunks = [f"chunk-{i:03d};".encode() for i in range(50)]

    with connect(proxy.port) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.002)
        received = receive(sock, sum(len(c) for c in chunks))
    assert received == b"".join(chunks)


def test_flap_alternates_cut_and_pass_and_then_passes(proxy):
    schedule = proxy.flap(0.4, 0.15, seed=7, duration_s=2.0)
    seen = set()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        seen.add("down" if is_refused(proxy.port) else "up")
        time.sleep(POLL_S)

    assert seen == {"up", "down"}
    assert proxy.stats().cuts == len(schedule) >= 3
    assert proxy.mode == "pass"
    assert not is_refused(proxy.port)


def test_the_same_seed_gives_the_same_flap_schedule():
    first = flap_schedule(1.0, 0.3, seed=42, duration_s=30)
    again = flap_schedule(1.0, 0.3, seed=42, duration_s=30)
    other = flap_schedule(1.0, 0.3, seed=43, duration_s=30)

    assert first == again != other
    assert all(a < b for a, b in first)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(first, first[1:], strict=False))


def test_a_mode_change_ends_a_flap(proxy):
    proxy.flap(0.2, 0.1, seed=1, duration_s=30)
    proxy.restore()
    cuts = proxy.stats().cuts

    time.sleep(0.5)
    assert proxy.stats().cuts == cuts
    assert proxy.mode == "pass"


def test_close_stops_the_proxy_and_its_listener(echo):
    proxy = Proxy(echo.port).start()
    port = proxy.port
    with connect(port) as sock:
        assert round_trip(sock, b"x") == b"x"
        proxy.close()

        with pytest.raises(ConnectionResetError):
            sock.recv(1)

    with pytest.raises(ConnectionRefusedError):
        connect(port).close()
    with pytest.raises(ProxyError):
        proxy.cut()


@pytest.mark.integration
@pytest.mark.slow
def test_paho_behind_a_blackholed_proxy_notices_the_dead_link_in_two_keepalives(
    broker,
):
    connected, disconnected = threading.Event(), threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="behind-proxy",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = lambda *args: connected.set()
    client.on_disconnect = lambda *args: disconnected.set()

    with Proxy(broker.port) as proxy:
        client.connect("127.0.0.1", proxy.port, keepalive=5, clean_start=True)
        client.loop_start()
        try:
            assert connected.wait(IO_TIMEOUT_S)
            started = time.monotonic()
            proxy.blackhole()

            assert disconnected.wait(15), "paho did not notice the dead link"
            noticed_after = time.monotonic() - started
        finally:
            proxy.restore()
            client.disconnect()
            client.loop_stop()
    assert noticed_after <= 15

"""A fake MQTT 5 broker on 127.0.0.1 that answers PUBLISH as a test says.

This is a mock, not a broker: it exists because Mosquitto cannot be made to
send most PUBACK and DISCONNECT reason codes (0x97, 0x99, 0x90, 0x89, 0x80
...). It accepts CONNECT, answers CONNACK and SUBACK, and answers each QoS 1
PUBLISH with a PUBACK whose reason code ``answer(topic, payload)`` chooses,
or with a server DISCONNECT when that returns ``Disconnect(code)``. It keeps
no session, routes nothing and checks little: only what the spooler sends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

POLL_S = 0.2
JOIN_TIMEOUT_S = 5.0
MAX_LIFE_S = 600.0  # every loop ends by then, whatever the test does


@dataclass(frozen=True)
class Disconnect:
    """Answer a PUBLISH by disconnecting the client with this reason code."""

    code: int


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    answer: int | Disconnect


Answer = Callable[[str, bytes], "int | Disconnect"]


class FakeBroker:
    """Listens on a free loopback port from ``start()`` until ``close()``."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda topic, payload: 0)
        self.published: list[Published] = []
        self.connects: list[float] = []  # monotonic time of each CONNECT
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.settimeout(POLL_S)
        self.port = self._server.getsockname()[1]
        self._deadline = time.monotonic() + MAX_LIFE_S

    def start(self) -> FakeBroker:
        self._server.listen(8)
        self._spawn(self._accept_loop)
        return self

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT_S)
        self._server.close()

    def __enter__(self) -> FakeBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def on(self, topic_part: str) -> list[Published]:
        """What was published on topics containing ``topic_part``."""
        with self._lock:
            return [p for p in self.published if topic_part in p.topic]

    # --- the server ------------------------------------------------------

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while self._running():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(POLL_S)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while self._running():
                packet = self._read_packet(conn)
                if packet is None or not self._handle(conn, *packet):
                    return

    def _handle(self, conn: socket.socket, first: int, body: bytes) -> bool:
        """Answer one packet; False ends the connection."""
        kind = first >> 4
        if kind == 1:  # CONNECT
            with self._lock:
                self.connects.append(time.monotonic())
            conn.sendall(b"\x20\x03\x00\x00\x00")
        elif kind == 8:  # SUBSCRIBE: grant QoS 1 to each filter
            conn.sendall(_packet(0x90, body[:2] + b"\x00" + b"\x01" * _filters(body)))
        elif kind == 3:
            return self._on_publish(conn, first, body)
        elif kind == 12:  # PINGREQ
            conn.sendall(b"\xd0\x00")
        elif kind == 14:  # DISCONNECT
            return False
        return True

    def _on_publish(self, conn: socket.socket, first: int, body: bytes) -> bool:
        qos = (first >> 1) & 3
        n = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + n].decode()
        at = 2 + n
        packet_id = body[at : at + 2] if qos else b""
        at += 2 if qos else 0
        props_len, used = _varint(body, at)
        payload = body[at + used + props_len :]
        answer = self.answer(topic, payload)
        with self._lock:
            self.published.append(Published(topic, payload, answer))
        if isinstance(answer, Disconnect):
            conn.sendall(_packet(0xE0, bytes([answer.code, 0])))
            return False
        if qos:
            conn.sendall(_packet(0x40, packet_id + bytes([answer, 0])))
        return True

    def _read_packet(self, conn: socket.socket) -> tuple[int, bytes] | None:
        head = self._read(conn, 1)
        if head is None:
            return None
        length, shift = 0, 0
        for _ in range(4):
            byte = self._read(conn, 1)
            if byte is None:
                return None
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = self._read(conn, length) if length else b""
        return None if body is None else (head[0], body)

    def _read(self, conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n and self._running():
            try:
                chunk = conn.recv(n - len(data))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data if len(data) == n else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    for used in range(1, 5):
        byte = data[at + used - 1]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, used
    raise ValueError("malformed variable byte integer")


def _filters(body: bytes) -> int:
    """How many topic filters a SUBSCRIBE body holds."""
    props_len, used = _varint(body, 2)
    at, count = 2 + used + props_len, 0
    while at < len(body):
        n = int.from_bytes(body[at : at + 2], "big")
        at += 2 + n + 1
        count += 1
    return count


def _packet(first: int, body: bytes) -> bytes:
    length, out = len(body), bytearray()
    for _ in range(4):  # MQTT lengths take at most four bytes
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([first]) + bytes(out) + body

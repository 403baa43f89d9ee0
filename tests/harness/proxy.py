"""A TCP proxy on loopback that breaks the link in the ways real links break.

A test puts the proxy between a client and a server on 127.0.0.1 and switches
its mode at any time from the test thread:

- ``pass`` forwards bytes both ways (the default, and what ``restore()`` gives);
- ``cut()`` resets every connection and each new one, as a link that dropped
  out with the peer's stack still up;
- ``blackhole()`` keeps connections open and drops every byte both ways: no
  RST, no FIN, only silence, as a link that failed without anyone being told;
- ``delay(seconds)`` adds a one-way delay to every chunk, order kept;
- ``flap(period_s, down_s, seed)`` alternates cut and pass on a seeded
  schedule until its duration ends or another mode is chosen.

All sockets belong to one event-loop thread. A mode switch is a command to
that thread and returns once the thread applied it, so after ``cut()``
returns every connection has been reset.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tests.harness.proxy")

HOST = "127.0.0.1"

CHUNK_BYTES = 65536
# Per direction: a side that has this much queued for its peer is not read
# until the peer takes some, so a slow or delayed peer cannot fill memory.
MAX_QUEUED_BYTES = 4 * 1024 * 1024
MAX_ACCEPTS_PER_WAKEUP = 64
LISTEN_BACKLOG = 64
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = 5.0
MAX_WAIT_S = 0.1
# The event loop ends on its own after this, so a forgotten proxy cannot
# outlive a test run.
MAX_LIFETIME_S = 3600.0
DEFAULT_FLAP_DURATION_S = 60.0
# Each flap phase lasts its nominal length times a factor in this range.
FLAP_JITTER = (0.5, 1.5)

# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
RESET_LINGER = struct.pack("ii", 1, 0)


class ProxyError(Exception):
    """The proxy could not start, apply a mode or stop in time."""


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started; bytes are those forwarded."""

    mode: str
    accepted: int
    refused: int
    resets: int
    cuts: int
    bytes_up: int
    bytes_down: int
    open_connections: int


def flap_schedule(
    period_s: float, down_s: float, seed: int, duration_s: float
) -> list[tuple[float, float]]:
    """The (start, end) offsets of the cuts of one flap, link up first.

    Each cycle is an up phase of about ``period_s - down_s`` and a down phase
    of about ``down_s``, both jittered by the seeded generator, so one seed
    always gives the same schedule.
    """
    if not 0 < down_s < period_s:
        raise ValueError(f"need 0 < down_s < period_s, got {down_s}, {period_s}")
    rng = random.Random(seed)
    low, high = FLAP_JITTER
    max_cycles = int(duration_s / (period_s * low)) + 1
    cuts = []
    now = 0.0
    for _ in range(max_cycles):
        start = now + (period_s - down_s) * rng.uniform(low, high)
        end = start + down_s * rng.uniform(low, high)
        if start >= duration_s:
            break
        cuts.append((start, min(end, duration_s)))
        now = end
    return cuts


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
    except OSError:
        pass  # already dead: close() below is all that is left to do
    sock.close()


class _Side:
    """One socket of a proxied connection and the bytes queued for it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # (due time, bytes) in arrival order; the head is sent first.
        self.outgoing: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.eof = False
        self.shut = False
        self.closed = False
        self.blocked = False

    def drop_queue(self) -> None:
        self.outgoing.clear()
        self.queued = 0


class _Link:
    """A client connection and, unless blackholed at accept, its upstream."""

    def __init__(self, client: _Side, upstream: _Side | None, silent: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.silent = silent

    @property
    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.upstream) if s and not s.closed]

    def peer(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client


class Proxy:
    """A proxy from a free loopback port (or ``port``) to ``target_port``.

    ``start()`` or ``with Proxy(port) as proxy:`` starts it; ``close()``
    resets every connection, stops the thread and closes the listener.
    """

    def __init__(self, target_port: int, *, port: int = 0) -> None:
        self.target_port = target_port
        self._requested_port = port
        self.port: int | None = None
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._commands: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._links: list[_Link] = []
        self._mode = "pass"
        self._delay_s = 0.0
        self._refusing = False
        self._blackholing = False
        self._flap_cuts: collections.deque[tuple[float, float]] = collections.deque()
        self._flap_until = 0.0
        self._counts = collections.Counter()
        self._stopping = False

    # -- the test thread's side ------------------------------------------------

    def start(self) -> Proxy:
        if self._thread is not None:
            raise ProxyError("proxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self._requested_port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        # The loop thread sleeps in select(); a byte on this pair wakes it
        # for a command.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"proxy-{self.port}", daemon=True
        )
        self._thread.start()
        log.info("proxy started: 127.0.0.1:%d -> :%d", self.port, self.target_port)
        return self

    @property
    def mode(self) -> str:
        return self._mode

    def stats(self) -> ProxyStats:
        """The counters, with every byte the proxy sent before this call."""
        if self._thread is None or not self._thread.is_alive():
            return self._snapshot()
        return self._command("stats")

    def cut(self) -> None:
        """Reset every open connection and each new one until restore()."""
        self._command("cut")

    def blackhole(self) -> None:
        """Drop every byte both ways, silently, until restore()."""
        self._command("blackhole")

    def delay(self, seconds: float) -> None:
        """Forward each chunk ``seconds`` after it arrived, in order."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, not {seconds}")
        self._command("delay", seconds)

    def flap(
        self,
        period_s: float,
        down_s: float,
        seed: int,
        *,
        duration_s: float = DEFAULT_FLAP_DURATION_S,
    ) -> list[tuple[float, float]]:
        """Alternate pass and cut for ``duration_s``; return the cut windows."""
        schedule = flap_schedule(period_s, down_s, seed, duration_s)
        self._command("flap", (schedule, duration_s))
        return schedule

    def restore(self) -> None:
        """Back to pass; blackholed connections are reset, as a peer would."""
        self._command("restore")

    def close(self) -> None:
        """Reset every connection, stop the loop thread and the listener."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(JOIN_TIMEOUT_S)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise ProxyError(f"proxy thread did not stop in {JOIN_TIMEOUT_S} s")
        self._wake_w.close()
        log.info("proxy closed: 127.0.0.1:%s, %s", self.port, self.stats())

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _command(self, name: str, argument: object = None) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise ProxyError(f"proxy not running; cannot {name}")
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._commands.put((name, argument, reply))
        self._wake()
        try:
            return reply.get(timeout=COMMAND_TIMEOUT_S)
        except queue.Empty:
            raise ProxyError(
                f"proxy did not apply {name} in {COMMAND_TIMEOUT_S} s"
            ) from None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # a wakeup is already pending, which is all we need
        except BrokenPipeError:
            pass  # the loop thread already ended; close() still joins it

    # -- the loop thread's side ------------------------------------------------

    def _run(self) -> None:
        expires = time.monotonic() + MAX_LIFETIME_S
        try:
            while not self._stopping and time.monotonic() < expires:
                self._apply_commands()
                self._advance_flap(time.monotonic())
                for key, events in self._selector.select(self._wait_time()):
                    self._handle(key, events)
                self._flush_all()
        except Exception:
            log.exception("proxy loop failed on port %s", self.port)
        finally:
            self._shut_down()

    def _apply_commands(self) -> None:
        for _ in range(self._commands.qsize()):
            name, argument, reply = self._commands.get_nowait()
            if name == "stats":
                reply.put(self._snapshot())
                continue
            # Any mode chosen by the test ends a flap in progress.
            self._flap_cuts.clear()
            getattr(self, f"_do_{name}")(argument)
            log.info("proxy on port %d: mode %s", self.port, self._mode)
            reply.put(None)

    def _snapshot(self) -> ProxyStats:
        counts = self._counts
        return ProxyStats(
            mode=self._mode,
            accepted=counts["accepted"],
            refused=counts["refused"],
            resets=counts["resets"],
            cuts=counts["cuts"],
            bytes_up=counts["bytes_up"],
            bytes_down=counts["bytes_down"],
            open_connections=len(self._links),
        )

    def _do_cut(self, _argument: object, mode: str = "cut") -> None:
        self._mode = mode
        self._refusing = True
        self._blackholing = False
        self._counts["cuts"] += 1
        for link in list(self._links):
            self._reset_link(link)

    def _do_blackhole(self, _argument: object) -> None:
        self._mode = "blackhole"
        self._refusing = False
        self._blackholing = True
        for link in self._links:
            link.silent = True
            for side in link.sides:
                side.drop_queue()

    def _do_restore(self, _argument: object, mode: str = "pass") -> None:
        self._mode = mode
        self._refusing = False
        self._blackholing = False
        self._delay_s = 0.0
        for link in [link for link in self._links if link.silent]:
            self._reset_link(link)

    def _do_delay(self, seconds: float) -> None:
        self._do_restore(None, mode="delay" if seconds else "pass")
        self._delay_s = seconds

    def _do_flap(self, argument: tuple[list[tuple[float, float]], float]) -> None:
        schedule, duration_s = argument
        self._do_restore(None, mode="flap")
        started = time.monotonic()
        self._flap_cuts.extend((started + a, started + b) for a, b in schedule)
        self._flap_until = started + duration_s

    def _advance_flap(self, now: float) -> None:
        if self._mode != "flap":
            return
        if now >= self._flap_until:
            self._do_restore(None)
            log.info("proxy on port %d: flap ended, mode pass", self.port)
            return
        if self._flap_cuts and self._refusing and now >= self._flap_cuts[0][1]:
            self._flap_cuts.popleft()
            self._refusing = False
        elif self._flap_cuts and not self._refusing and now >= self._flap_cuts[0][0]:
            self._do_cut(None, mode="flap")

    def _wait_time(self) -> float:
        due = [
            side.outgoing[0][0]
            for link in self._links
            for side in link.sides
            if side.outgoing
        ]
        due += [edge for cut in list(self._flap_cuts)[:1] for edge in cut]
        if self._mode == "flap":
            due.append(self._flap_until)
        now = time.monotonic()
        soonest = min((d - now for d in due if d > now), default=MAX_WAIT_S)
        return max(0.0, min(soonest, MAX_WAIT_S))

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "wake":
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        elif key.data == "accept":
            self._accept()
        else:
            link, side = key.data
            if side.closed:
                return  # closed earlier in this same round of events
            if events & selectors.EVENT_WRITE:
                side.blocked = False
            if events & selectors.EVENT_READ:
                self._read(link, side)

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            self._counts["accepted"] += 1
            if self._refusing:
                self._counts["refused"] += 1
                reset(sock)
                continue
            self._open_link(sock)

    def _open_link(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = None
        if not self._blackholing:
            try:
                upstream = socket.create_connection(
                    (HOST, self.target_port), timeout=CONNECT_TIMEOUT_S
                )
            except OSError as exc:
                # The target is down: the client sees what a refused
                # connection through a real network would look like.
                log.info("proxy on port %d: target refused: %s", self.port, exc)
                self._counts["refused"] += 1
                reset(sock)
                return
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
        sock.setblocking(False)
        client_side = _Side(sock)
        upstream_side = _Side(upstream) if upstream else None
        link = _Link(client_side, upstream_side, silent=self._blackholing)
        self._links.append(link)
        for side in link.sides:
            self._selector.register(side.sock, selectors.EVENT_READ, (link, side))

    def _read(self, link: _Link, side: _Side) -> None:
        try:
            data = side.sock.recv(CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self._lose_side(link, side)
            return
        if not data:
            side.eof = True
            if link.silent:
                # A FIN across a silent link never reaches the other end.
                self._close_side(side)
                self._forget_if_done(link)
            return
        peer = link.peer(side)
        if link.silent or peer is None:
            return
        peer.outgoing.append((time.monotonic() + self._delay_s, data))
        peer.queued += len(data)

    def _lose_side(self, link: _Link, side: _Side) -> None:
        # One end reset or failed. Through a live link the other end learns
        # it as an RST; through a silent one it learns nothing.
        if link.silent:
            self._close_side(side)
            self._forget_if_done(link)
        else:
            self._reset_link(link)

    def _flush_all(self) -> None:
        now = time.monotonic()
        for link in list(self._links):
            for side in link.sides:
                if not link.silent and not side.blocked:
                    self._flush(link, side, now)
            if link in self._links:
                self._update_interest(link)

    def _flush(self, link: _Link, side: _Side, now: float) -> None:
        while side.outgoing and side.outgoing[0][0] <= now:
            due, data = side.outgoing[0]
            try:
                sent = side.sock.send(data)
            except BlockingIOError:
                side.blocked = True
                return
            except OSError:
                self._reset_link(link)
                return
            direction = "bytes_up" if side is link.upstream else "bytes_down"
            self._counts[direction] += sent
            side.queued -= sent
            if sent < len(data):
                side.outgoing[0] = (due, data[sent:])
                side.blocked = True
                return
            side.outgoing.popleft()
        peer = link.peer(side)
        if not side.outgoing and peer is not None and peer.eof and not side.shut:
            self._shut_write(link, side)

    def _shut_write(self, link: _Link, side: _Side) -> None:
        # Pass the peer's FIN on once everything it sent before it is out.
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset_link(link)
            return
        side.shut = True
        if all(s.eof and s.shut for s in link.sides) and len(link.sides) == 2:
            for each in link.sides:
                self._close_side(each)
            self._forget_if_done(link)

    def _update_interest(self, link: _Link) -> None:
        for side in link.sides:
            peer = link.peer(side)
            events = 0
            backed_up = peer is not None and peer.queued >= MAX_QUEUED_BYTES
            if not side.eof and (link.silent or not backed_up):
                events |= selectors.EVENT_READ
            if side.blocked:
                events |= selectors.EVENT_WRITE
            self._set_interest(link, side, events)

    def _set_interest(self, link: _Link, side: _Side, events: int) -> None:
        registered = self._selector.get_map().get(side.sock.fileno())
        if registered is None:
            if events:
                self._selector.register(side.sock, events, (link, side))
        elif events == 0:
            self._selector.unregister(side.sock)
        elif registered.events != events:
            self._selector.modify(side.sock, events, (link, side))

    def _close_side(self, side: _Side, *, rst: bool = False) -> None:
        if side.closed:
            return
        if side.sock.fileno() in self._selector.get_map():
            self._selector.unregister(side.sock)
        side.closed = True
        side.drop_queue()
        if rst:
            self._counts["resets"] += 1
            reset(side.sock)
        else:
            side.sock.close()

    def _reset_link(self, link: _Link) -> None:
        for side in link.sides:
            self._close_side(side, rst=True)
        self._forget_if_done(link)

    def _forget_if_done(self, link: _Link) -> None:
        if not link.sides and link in self._links:
            self._links.remove(link)

    def _shut_down(self) -> None:
        for link in list(self._links):
            self._reset_link(link)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._mode = "closed"

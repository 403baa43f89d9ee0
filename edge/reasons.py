"""What the edge does with each MQTT 5 reason code the broker sends it.

Two tables: one for the PUBACK of a record batch, one for a DISCONNECT the
server sends. Each code maps to one action:

- ``ok``: the broker took the message; the records wait for their receipt.
- ``unrouted`` (0x10 only): the broker took the message but no subscription
  matched, so it went nowhere. The records stay unconfirmed, as for ``ok``,
  until a receipt covers them: their resend timers or the core-session signal
  bring them once a collector subscribes. Logged once per spell.
- ``wait``: the broker could not take it now. The records stay unconfirmed
  and are sent again when a pause with exponential backoff ends.
- ``dead_letter``: no resend can succeed (the broker refuses the message for
  what it is). The records of that message go to the edge's dead letters and
  are reported to the core as skipped.
- ``split``: the message is larger than the broker takes. The spooler's
  message size limit drops below that message's size and its records are
  sent again in smaller messages; a single record too large is dead-lettered.
- ``config``: the broker refused us for who we are (ACL, authentication).
  An operator must act: the records stay, an error says what to check, and
  publishing pauses long. Data is never dead-lettered for a configuration
  problem.

Unknown codes: below 0x80 a code means success (MQTT 5, section 2.4), so it
is ``ok``; from 0x80 up it is ``wait``, never ``dead_letter``: a code the edge
does not know must not cost data. A DISCONNECT that paho makes up for a local
error (a lost link, a keepalive timeout, a protocol error) carries 0x80, 0x82
or 0x8D, all ``ok`` there: an ordinary reconnect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum

from edge.window import Chunk

log = logging.getLogger("edge.reasons")

# Pauses of publishing after a refusal: (first, cap) in seconds, doubling per
# refusal in a row. A configuration problem waits long: retrying soon cannot
# help until an operator acts, and each retry is one more refusal logged.
WAIT_PAUSE_S = (1.0, 60.0)
CONFIG_PAUSE_S = (30.0, 600.0)


class Action(StrEnum):
    OK = "ok"
    UNROUTED = "unrouted"
    WAIT = "wait"
    DEAD_LETTER = "dead_letter"
    SPLIT = "split"
    CONFIG = "config"


@dataclass(frozen=True)
class Reason:
    code: int
    name: str
    action: Action


def _table(*rows: tuple[int, str, Action]) -> dict[int, Reason]:
    return {code: Reason(code, name, action) for code, name, action in rows}


# 0x86, 0x89, 0x8C and 0x95 are not PUBACK codes in MQTT 5: paho 2.2 treats
# a PUBACK carrying one as a protocol error and drops the link, so the batch
# goes again from paho's queue after the reconnect. They are here for a
# client that passes them on.
PUBACK = _table(
    (0x00, "Success", Action.OK),
    (0x10, "No matching subscribers", Action.UNROUTED),
    (0x80, "Unspecified error", Action.WAIT),
    (0x83, "Implementation specific error", Action.WAIT),
    (0x86, "Bad user name or password", Action.CONFIG),
    (0x87, "Not authorized", Action.CONFIG),
    (0x89, "Server busy", Action.WAIT),
    (0x8C, "Bad authentication method", Action.CONFIG),
    (0x90, "Topic name invalid", Action.DEAD_LETTER),
    (0x91, "Packet identifier in use", Action.WAIT),
    # Mosquitto 2.0.11 sends it for a message over message_size_limit.
    # TODO: paho 2.2 drops the link instead and resends the same message
    # after each reconnect; ends when paho passes this PUBACK on.
    (0x95, "Packet too large", Action.SPLIT),
    (0x97, "Quota exceeded", Action.WAIT),
    (0x99, "Payload format invalid", Action.DEAD_LETTER),
)

DISCONNECT = _table(
    (0x00, "Normal disconnection", Action.OK),
    (0x04, "Disconnect with will message", Action.OK),
    (0x80, "Unspecified error", Action.OK),
    (0x81, "Malformed packet", Action.OK),
    (0x82, "Protocol error", Action.OK),
    (0x83, "Implementation specific error", Action.OK),
    (0x86, "Bad user name or password", Action.CONFIG),
    (0x87, "Not authorized", Action.CONFIG),
    (0x89, "Server busy", Action.WAIT),
    (0x8B, "Server shutting down", Action.OK),
    (0x8C, "Bad authentication method", Action.CONFIG),
    (0x8D, "Keep alive timeout", Action.OK),
    (0x8E, "Session taken over", Action.CONFIG),
    (0x95, "Packet too large", Action.SPLIT),
    (0x97, "Quota exceeded", Action.WAIT),
    (0x9F, "Connection rate exceeded", Action.WAIT),
)


def code_of(reason_code) -> int:
    """The number of a paho ReasonCode, MQTTErrorCode or plain int."""
    return int(getattr(reason_code, "value", reason_code))


def lookup(table: dict[int, Reason], reason_code) -> Reason:
    """The row for a code; unknown codes as the module docstring says."""
    code = code_of(reason_code)
    if code in table:
        return table[code]
    return Reason(code, str(reason_code), Action.OK if code < 0x80 else Action.WAIT)


def puback_reason(reason_code) -> Reason:
    return lookup(PUBACK, reason_code)


def disconnect_reason(reason_code) -> Reason:
    return lookup(DISCONNECT, reason_code)


def unconfirmed_pieces(chunk: Chunk) -> list[Chunk]:
    """One chunk per segment, of the chunk's records still unconfirmed."""
    out = []
    for seg, offsets in chunk.pieces:
        left = [o for o in offsets if o in seg.unconfirmed]
        if left:
            out.append(replace(chunk, pieces=[(seg, left)]))
    return out


def again(chunk: Chunk, now: float) -> Chunk | None:
    """The chunk as a resend of what is still unconfirmed, or None."""
    pieces = [p for c in unconfirmed_pieces(chunk) for p in c.pieces]
    if not pieces:
        return None
    since = now if chunk.since is None else chunk.since
    # attempt > 0: a resend, which the window does not count unconfirmed again.
    return replace(chunk, pieces=pieces, attempt=chunk.attempt + 1, since=since)


class Pause:
    """Exponential pauses of publishing; reset by the next accepted message."""

    def __init__(self) -> None:
        self.until = 0.0
        self.refusals = 0

    def start(self, action: Action, now: float) -> float:
        """Pause for the action's next delay; returns it. Once per spell."""
        if now < self.until:
            return self.until - now  # several in-flight refusals: one step
        first, cap = CONFIG_PAUSE_S if action is Action.CONFIG else WAIT_PAUSE_S
        delay = min(cap, first * 2**self.refusals)
        self.refusals += 1
        self.until = now + delay
        return delay

    def left(self, now: float) -> float:
        return max(0.0, self.until - now)

    def end(self) -> None:
        """A new connection: try once at once (an operator may have fixed it)."""
        self.until = 0.0

    def reset(self) -> None:
        self.until = 0.0
        self.refusals = 0


class Acks:
    """Record batches awaiting their PUBACK, and what their reason codes did.

    Holds ``mid -> (chunk, payload size)`` for data messages in send order,
    the chunks to send again when a pause ends, the pause itself, and the
    message size learned from a "Packet too large".
    """

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.sent: dict[int, tuple[Chunk, int]] = {}
        self.retries: list[Chunk] = []
        self.pause = Pause()
        self.max_message: float = float("inf")
        self._spell: set[tuple[Action, str]] = set()  # what was logged

    def track(self, mid: int, chunk: Chunk, size: int) -> None:
        self.sent.pop(mid, None)  # keep send order for a reused packet id
        self.sent[mid] = (chunk, size)

    def take(self, mid: int) -> tuple[Chunk, int] | None:
        return self.sent.pop(mid, None)

    def retry(self, chunk: Chunk, now: float) -> None:
        resend = again(chunk, now)
        if resend is not None:
            self.retries.append(resend)

    def take_retries(self) -> list[Chunk]:
        out, self.retries = self.retries, []
        return out

    def retry_all_sent(self, now: float) -> None:
        """The client dropped its queue: every tracked batch goes again."""
        for chunk, _ in self.sent.values():
            self.retry(chunk, now)
        self.sent.clear()

    def shrink(self, size: int) -> int:
        """Keep messages below `size` from now on; returns the new limit."""
        self.max_message = min(self.max_message, max(1, size - 1))
        return int(self.max_message)

    def oldest_size(self) -> int | None:
        """The size of the oldest batch awaiting its PUBACK."""
        return next((size for _, size in self.sent.values()), None)

    def accepted(self, reason: Reason, topic: str) -> None:
        """A PUBACK ok or unrouted: the pause and the spell end or go on."""
        self.pause.reset()
        if reason.action is Action.OK:
            self._spell.clear()
        elif self._once(Action.UNROUTED, topic):
            log.warning(
                "broker accepted a batch on %s but no subscription matched "
                "(%s): no collector session exists; the records stay "
                "unconfirmed until a receipt covers them",
                topic,
                reason.name,
            )

    def refused(self, reason: Reason, topic: str, records: int, now: float) -> None:
        """A PUBACK refused a batch: pause, and log once per spell."""
        delay = self.pause.start(reason.action, now)
        if not self._once(reason.action, topic):
            return
        if reason.action is Action.CONFIG:
            log.error(
                "broker refused %d records on %s: 0x%02X %s; check that the "
                "ACL lets user %s write %s (and its password); records kept, "
                "publishing paused %.0f s",
                records,
                topic,
                reason.code,
                reason.name,
                self.edge_id,
                topic,
                delay,
            )
        elif reason.action is Action.WAIT:
            log.warning(
                "broker refused %d records on %s for now: 0x%02X %s; "
                "publishing paused %.1f s",
                records,
                topic,
                reason.code,
                reason.name,
                delay,
            )

    def disconnected(self, reason: Reason, address: str, now: float) -> None:
        """A server DISCONNECT: a longer pause for wait and config."""
        if reason.action not in (Action.WAIT, Action.CONFIG):
            return
        delay = self.pause.start(reason.action, now)
        level = logging.ERROR if reason.action is Action.CONFIG else logging.WARNING
        log.log(
            level,
            "broker %s disconnected us: 0x%02X %s; reconnecting in %.0f s at the "
            "earliest%s",
            address,
            reason.code,
            reason.name,
            delay,
            "; check the broker's ACL and credentials for user " + self.edge_id
            if reason.action is Action.CONFIG
            else "",
        )

    def _once(self, action: Action, topic: str) -> bool:
        key = (action, topic)
        if key in self._spell:
            return False
        self._spell.add(key)
        return True

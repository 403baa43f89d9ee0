"""The collector: one thread that receives, commits, confirms and acks.

No paho thread runs here: `run()` drives `client.loop()` itself, so the
callbacks, the commits, the receipts and the PUBACKs happen in one order on
one thread.

A message is acked only after the transaction holding its records committed,
and only on the connection it arrived on: packet ids restart with each
connection, so an ack sent on a later one would acknowledge an unrelated
message. What stays unacked the broker redelivers, and the unique key makes
the redelivery harmless.
"""

from __future__ import annotations

import enum
import logging
import secrets
import select
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from common.envelope import encode_json, encode_receipt, format_time
from common.errors import LinkError, SpoolmqError
from common.exits import Exit
from common.link import Backoff, connack_refused, make_client, prepare_connect
from common.topics import Topics
from core.config import CoreConfig, DatastoreConfig
from core.datastore import Confirmed, Datastore, DeadLetter, Item, Record
from core.errors import DatastoreError
from core.messages import decode_message
from core.subscriptions import Plan, Subscriptions, wanted_topics

log = logging.getLogger("core.collector")

LOOP_MAX_S = 0.2  # how long one network wait may delay a stop request
DOWN_SLEEP_S = 0.1
SHUTDOWN_TIMEOUT_S = 5.0
RECEIPT_MAX_SEQS = 10000  # keeps a receipt far below message_size_limit
DEAD_LETTERS_LOGGED = 10  # per batch; the rest are counted in one line


class Link(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@dataclass(slots=True)
class Received:
    """One message waiting for its commit, tagged with its connection."""

    mid: int
    qos: int
    generation: int
    items: list[Item]


@dataclass
class Pending:
    """The batch being gathered: messages in the order received."""

    messages: list[Received] = field(default_factory=list)
    records: int = 0
    since: float = 0.0

    def add(self, message: Received, now: float) -> None:
        if not self.messages:
            self.since = now
        self.messages.append(message)
        self.records += len(message.items)

    def deadline(self, cfg: DatastoreConfig) -> float | None:
        """When this batch is due for commit (now when it is full)."""
        if not self.messages:
            return None
        full = len(self.messages) >= cfg.batch_messages
        if full or self.records >= cfg.batch_records:
            return 0.0
        return self.since + cfg.linger_ms / 1000

    def clear(self) -> None:
        self.messages = []
        self.records = 0


class Collector:
    """Subscribes with a persistent session and stores what it receives."""

    def __init__(self, cfg: CoreConfig, store: Datastore):
        self.cfg = cfg
        self.store = store
        self.topics = Topics(cfg.topic_prefix)
        wanted = wanted_topics(self.topics, cfg.share_group)
        self.subscriptions = Subscriptions(store, cfg.client_id, wanted)
        self.client = make_client(cfg.broker, cfg.client_id, manual_ack=True)
        # Under "paho", which the CLI's logging setup shows only with -vv.
        self.client.enable_logger(logging.getLogger("paho.collector"))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        prepare_connect(
            self.client, cfg.broker, receive_maximum=cfg.datastore.batch_messages
        )

        self.link = Link.DOWN
        self.generation = 0  # counts accepted CONNACKs; tags received messages
        self.connecting_since = 0.0
        self.next_attempt = 0.0
        self.link_backoff = Backoff(cfg.broker)
        self.store_backoff = Backoff(cfg.broker)
        self.store_retry_at = 0.0
        self.pending = Pending()
        self.subscribe_mid: int | None = None
        self.announce_session = False
        self.closing = False
        self.stop_requested = False
        self.fatal: SpoolmqError | None = None
        self.totals = {"messages": 0, "records": 0, "dead_letters": 0, "acked": 0}

    def request_stop(self) -> None:
        """Ask `run()` to commit, ack and disconnect; safe in a signal handler."""
        self.stop_requested = True

    def run(self) -> None:
        """Collect until `request_stop()`; raise SpoolmqError on a fatal refusal."""
        log.info(
            "collector %s starting: broker %s (MQTT %s), datastore %s",
            self.cfg.client_id,
            self.cfg.broker.address,
            self.cfg.broker.protocol,
            self.store.url,
        )
        while not self.stop_requested:
            self._step()
        self._shutdown()

    def _step(self) -> None:
        if self.fatal:
            raise self.fatal
        now = time.monotonic()
        waited = now - self.connecting_since
        if self.link is Link.DOWN and now >= self.next_attempt:
            self._connect()
        elif self.link is Link.CONNECTING and waited > self.cfg.broker.connect_timeout:
            self._retry_later(f"no CONNACK from {self.cfg.broker.address}")
        if self.link is Link.DOWN:
            time.sleep(min(DOWN_SLEEP_S, self._wait()))
        else:
            self.client.loop(timeout=self._wait())
        due = self._flush_at()
        if due is not None and (time.monotonic() >= due or self._idle_commit()):
            self._flush()

    # TODO: one thread decodes, inserts and commits, so a backlog drain is
    # bound by this process's CPU (0.67 s per 100,000 records: 1.86x a tuned
    # Mosquitto bridge on 2 cores, against a 2x target; a commit thread lost
    # to the interpreter lock). Ends when decoding and committing run in
    # separate processes.
    def _idle_commit(self) -> bool:
        """True when nothing more is waiting to be read: commit now.

        Waiting for linger_ms only pays while messages keep arriving; once
        the input has gone quiet, waiting adds latency and, since the edges
        hold back what their window does not allow, takes throughput away.
        Under load messages pile up in the socket during each commit, so
        batches still grow by themselves (group commit).
        """
        if not self.cfg.datastore.commit_when_idle:
            return False
        sock = self.client.socket()
        if sock is None or self.store_retry_at > time.monotonic():
            return False
        pending = getattr(sock, "pending", None)  # TLS holds decrypted bytes
        if pending is not None and pending():
            return False
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable

    def _wait(self) -> float:
        """Seconds until something is due, at most LOOP_MAX_S."""
        now = time.monotonic()
        due = [now + LOOP_MAX_S]
        flush_at = self._flush_at()
        if flush_at is not None:
            due.append(flush_at)
        if self.link is Link.DOWN:
            due.append(self.next_attempt)
        return max(0.0, min(due) - now)

    def _flush_at(self) -> float | None:
        deadline = self.pending.deadline(self.cfg.datastore)
        return None if deadline is None else max(deadline, self.store_retry_at)

    # -- the connection --------------------------------------------------

    def _connect(self) -> None:
        offline = {"online": False, "ts": format_time(time.time())}
        status_topic = self.topics.core_status(self.cfg.client_id)
        self.client.will_set(status_topic, encode_json(offline), qos=1, retain=True)
        try:
            rc = self.client.reconnect()
        except OSError as exc:
            self._retry_later(f"cannot reach broker {self.cfg.broker.address}: {exc}")
            return
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._retry_later(f"cannot connect: {mqtt.error_string(rc)}")
            return
        self.link = Link.CONNECTING
        self.connecting_since = time.monotonic()

    def _retry_later(self, reason: str) -> None:
        self.link = Link.DOWN
        delay = self.link_backoff.next_delay()
        self.next_attempt = time.monotonic() + delay
        log.info("%s; retrying in %.1f s", reason, delay)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refusal = connack_refused(reason_code)
            if refusal.exit_code == Exit.NOPERM:
                self.fatal = refusal
                return
            self._retry_later(str(refusal))
            return
        self.link = Link.UP
        self.generation += 1
        self.link_backoff.reset()
        self._cap_inflight(properties)
        self._log_connected(flags.session_present)
        self._publish_status(online=True)
        # A reconnect within one run means the link or the broker failed. A
        # broker SIGKILLed and restarted from its last autosave still holds
        # our session but forgot what it acked since, so that counts as a
        # loss too: edges resend what is unconfirmed (at most W each).
        # TODO: a collector that was away while the broker died and came back
        # from a snapshot finds its session and announces nothing; the edges'
        # resend timers recover those records. Ends when the broker's restart
        # can be told from a clean one (e.g. a retained broker-start marker).
        self.announce_session = not flags.session_present or self.generation > 1
        self._apply(self.subscriptions.plan(flags.session_present))
        if self.announce_session and self.subscribe_mid is None:
            self._announce_session()

    def _cap_inflight(self, properties) -> None:
        # paho ignores the Receive Maximum a MQTT 5 CONNACK announces, and its
        # setter refuses any change once connect_async() ran. The attribute
        # is set directly, in on_connect, before paho resends its queue (which
        # it does ignoring the cap: eclipse-paho/paho.mqtt.python#492).
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if receive_maximum:
            self.client._max_inflight_messages = receive_maximum

    def _log_connected(self, session_present: bool) -> None:
        address = self.cfg.broker.address
        if session_present:
            log.info(
                "connected to %s as %s; the broker kept our session",
                address,
                self.cfg.client_id,
            )
        elif not self.subscriptions.granted():
            log.info("connected to %s as %s; new session", address, self.cfg.client_id)
        else:
            log.warning(
                "connected to %s but the broker has no session for %s: what it "
                "queued for us is gone; subscribing again and announcing a new "
                "core session so that edges resend",
                address,
                self.cfg.client_id,
            )

    def _apply(self, plan: Plan) -> None:
        if plan.unsubscribe:
            log.info("unsubscribing from %s", ", ".join(plan.unsubscribe))
            self.client.unsubscribe(plan.unsubscribe)
        self.subscribe_mid = None
        if not plan.subscribe:
            return
        log.info("subscribing to %s", ", ".join(plan.subscribe))
        rc, mid = self.client.subscribe([(topic, 1) for topic in plan.subscribe])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("subscribe not sent: %s", mqtt.error_string(rc))
        self.subscribe_mid = mid

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self.subscribe_mid:
            return
        for topic, code in zip(self.subscriptions.wanted, reason_codes, strict=False):
            if code.is_failure or code.value < 1:
                self.fatal = LinkError(
                    f"broker granted no QoS 1 subscription to {topic} ({code}); "
                    f"check the broker's ACL for {self.cfg.client_id}",
                    exit_code=Exit.NOPERM,
                )
                return
        try:
            self.subscriptions.save_granted()
        except DatastoreError as exc:
            log.warning("%s; will subscribe again on the next connect", exc)
        log.info("subscribed to %d topics", len(reason_codes))
        if self.announce_session:
            self._announce_session()

    def _announce_session(self) -> None:
        # Only after the SUBACK: an edge that resends on the new session id
        # must find our subscription in place, or its resend is dropped.
        self.announce_session = False
        session = secrets.token_hex(16)
        body = {
            "session": session,
            "collector": self.cfg.client_id,
            "ts": format_time(time.time()),
        }
        topic = self.topics.core_session()
        if self._publish(topic, encode_json(body), retain=True):
            log.info("announced core session %s on %s", session, topic)

    def _publish_status(self, *, online: bool) -> mqtt.MQTTMessageInfo | None:
        body = {"online": online, "ts": format_time(time.time())}
        topic = self.topics.core_status(self.cfg.client_id)
        return self._publish(topic, encode_json(body), retain=True)

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish at QoS 1; None (and a warning) when paho refused it."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("not published on %s: %s", topic, mqtt.error_string(info.rc))
            return None
        return info

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.closing or self.link is Link.DOWN:
            self.link = Link.DOWN
            return
        why = reason_code if flags.is_disconnect_packet_from_server else "closed"
        unacked = len(self.pending.messages)
        self._retry_later(
            f"lost the broker {self.cfg.broker.address} ({why}); "
            f"{unacked} uncommitted messages will be redelivered"
        )

    # -- the messages ----------------------------------------------------

    def _on_message(self, client, userdata, message) -> None:
        items = decode_message(
            message.topic, message.payload, self.topics, self.store.refusal
        )
        received = Received(message.mid, message.qos, self.generation, items)
        self.pending.add(received, time.monotonic())
        log.debug(
            "received mid %d on %s: %d items", message.mid, message.topic, len(items)
        )

    def _flush(self) -> None:
        """Commit the pending batch, then send receipts, then ack in order."""
        messages = self.pending.messages
        items = [item for message in messages for item in message.items]
        try:
            confirmed = self.store.store(items)
        except DatastoreError as exc:
            delay = self.store_backoff.next_delay()
            self.store_retry_at = time.monotonic() + delay
            log.error(
                "%s; %d messages stay unacked; retrying in %.1f s",
                exc,
                len(messages),
                delay,
            )
            return
        self.store_backoff.reset()
        self.store_retry_at = 0.0
        self.pending.clear()
        self._count(messages, items)
        self._send_receipts(confirmed)
        self._ack(messages)

    def _count(self, messages: list[Received], items: list[Item]) -> None:
        letters = [item for item in items if isinstance(item, DeadLetter)]
        records = [item for item in items if isinstance(item, Record)]
        self.totals["messages"] += len(messages)
        self.totals["records"] += len(records)
        self.totals["dead_letters"] += len(letters)
        for letter in letters[:DEAD_LETTERS_LOGGED]:
            log.warning(
                "dead-lettered from %s (edge %s, epoch %s, seq %s): %s",
                letter.topic,
                letter.edge_id,
                letter.epoch,
                letter.seq,
                letter.reason,
            )
        if len(letters) > DEAD_LETTERS_LOGGED:
            log.warning(
                "%d more dead letters in this batch; see the dead_letters table",
                len(letters) - DEAD_LETTERS_LOGGED,
            )

    def _send_receipts(self, confirmed: Confirmed) -> None:
        if self.link is not Link.UP:
            # Unacked, these messages come again on the next connection (or
            # the edges resend on a new core session); receipts follow then.
            log.debug("offline: %d edges' receipts wait", len(confirmed))
            return
        for edge_id, epochs in sorted(confirmed.items()):
            for part in receipt_parts(epochs):
                body = encode_receipt(self.cfg.client_id, part)
                self._publish(self.topics.receipt(edge_id), body)

    def _ack(self, messages: list[Received]) -> None:
        if self.link is not Link.UP:
            return
        stale = 0
        for message in messages:
            if message.qos == 0:
                continue
            if message.generation != self.generation:
                stale += 1
                continue
            self.client.ack(message.mid, message.qos)
            self.totals["acked"] += 1
        if stale:
            log.info(
                "%d committed messages came on an earlier connection: left "
                "unacked, the broker redelivers them",
                stale,
            )

    # -- stopping --------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("stopping: committing %d pending messages", len(self.pending.messages))
        if self.pending.messages:
            self._flush()
        self.closing = True
        if self.link is Link.UP:
            info = self._publish_status(online=False)
            self._drain(lambda: info is None or info.is_published())
            self.client.disconnect()
            self._drain(lambda: self.link is Link.DOWN)
        log.info(
            "stopped: %(messages)d messages, %(records)d records, "
            "%(dead_letters)d dead letters committed, %(acked)d acked",
            self.totals,
        )

    def _drain(self, done) -> None:
        """Run the network loop until `done()` or SHUTDOWN_TIMEOUT_S."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while not done() and time.monotonic() < deadline:
            if self.client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                self.link = Link.DOWN
                return


def receipt_parts(epochs: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """Split one edge's confirmed ids into receipts of RECEIPT_MAX_SEQS at most."""
    parts: list[dict[str, list[int]]] = [{}]
    size = 0
    for epoch, seqs in epochs.items():
        for start in range(0, len(seqs), RECEIPT_MAX_SEQS):
            chunk = seqs[start : start + RECEIPT_MAX_SEQS]
            if size + len(chunk) > RECEIPT_MAX_SEQS:
                parts.append({})
                size = 0
            parts[-1].setdefault(epoch, []).extend(chunk)
            size += len(chunk)
    return [part for part in parts if part]

"""The edge-spooler daemon: intake, publishing and receipts in one loop.

One thread does everything, in this order, each time round:

1. connect when disconnected and the backoff delay has passed;
2. let paho read and write the socket (receipts arrive here);
3. take new spool files into the outbox;
4. load segments from the outbox while the window has room;
5. publish new batches and due resends;
6. delete the segments that receipts fully confirmed;
7. write the state file when it changed.

No step blocks for long, so intake goes on while the broker is down.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from common import __version__
from common.envelope import (
    decode_json,
    decode_receipt,
    encode_batch,
    encode_json,
    encode_skipped,
    format_time,
)
from common.errors import EnvelopeError
from common.exits import Exit
from common.link import Backoff, make_client, prepare_connect
from common.topics import Topics
from edge.config import EdgeConfig
from edge.errors import OutboxBusy, OutboxError, SpoolError
from edge.outbox import Outbox, SkippedRow
from edge.salvage import is_damage, mark_damaged
from edge.reasons import (
    Acks,
    Action,
    disconnect_reason,
    puback_reason,
    unconfirmed_pieces,
)
from edge.spool import SpoolIntake
from edge.state import write_state
from edge.window import Chunk, Window

log = logging.getLogger("edge.spooler")

STATE_EVERY_S = 2.0
BUSY_POLL_S = 0.05  # longest wait for the broker while records are moving
IDLE_POLL_S = 0.25  # ... and while none are
SWEEP_EVERY_S = 30.0  # how often expired records are looked for
UPTIME_SAVE_S = 30.0  # how often the outbox clock is saved while records wait
INTAKE_RETRY_S = 2.0
# Messages published and not yet PUBACKed, at most, when the broker names no
# Receive Maximum (3.1.1 never does). Keeps paho's own queue small.
DEFAULT_INFLIGHT = 100


class Spooler:
    """The daemon; `run()` returns when SIGTERM or SIGINT asks it to stop."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix)
        self._lock = take_daemon_lock(cfg.outbox.path + ".lock")
        self.outbox = Outbox(cfg.outbox.path, cfg.edge_id)
        self.outbox.priorities = cfg.priorities()
        self.outbox.keeps_clock = True
        self.ttls = cfg.ttls()
        self.next_sweep = 0.0
        self.next_uptime_save = time.monotonic() + UPTIME_SAVE_S
        caps = (cfg.publish.max_records_per_s, cfg.publish.max_bytes_per_s)
        self.bucket = TokenBucket(*caps) if any(caps) else None
        self.intake = SpoolIntake(self.outbox, cfg.spool, cfg.outbox, cfg.intake,
                                  cfg.limits(), cfg.max_record_bytes)
        self.intake_blocked: str | None = None
        pub = cfg.publish
        self.window = Window(pub.window, pub.batch_records, pub.batch_bytes,
                             pub.linger_ms / 1000, pub.resend_initial,
                             pub.resend_max)
        self.client = self._make_client()
        self.skipped = SkippedReports(self.outbox, pub.resend_initial,
                                      pub.resend_max)
        self.backoff = Backoff(cfg.broker)
        self.stopping = False
        self.connected = False
        self.max_message = cfg.broker.max_message_bytes
        self.inflight_cap = DEFAULT_INFLIGHT
        self.unacked: set[int] = set()
        self.acks = Acks(cfg.edge_id)  # data batches by mid; reason codes
        self.next_connect = 0.0
        self.next_scan = 0.0
        self.data_version = -1
        self._maybe_more = True
        self._dropped_seen = 0
        self.expired_total = 0
        self.core_session: str | None = None
        self.core_status: dict[str, bool] = {}
        self.last_receipt: float | None = None
        self.connected_since: float | None = None
        self.published_total = 0
        self._state_written = 0.0
        self._state_last: dict | None = None

    # --- MQTT client ---------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = make_client(self.cfg.broker, self.cfg.edge_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        # paho's own in-flight cap is not applied when it resends after a
        # reconnect, and cannot change while connected; so paho gets no cap
        # and the spooler keeps at most `inflight_cap` messages unacked itself.
        client.max_inflight_messages_set(0)
        client.will_set(self.topics.status(self.cfg.edge_id),
                        self._status_body(False), qos=1, retain=True)
        prepare_connect(client, self.cfg.broker)
        return client

    def _status_body(self, online: bool) -> bytes:
        return encode_json({"online": online, "ts": format_time(time.time()),
                            "epoch": self.outbox.epoch, "version": __version__})

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            # The daemon never exits on broker trouble: log and keep trying.
            delay = self.backoff.next_delay()
            log.error("broker %s refused the connection: %s; retrying in %.1f s",
                      self.cfg.broker.address, reason_code, delay)
            self.next_connect = time.monotonic() + delay
            return
        self.connected = True
        self.connected_since = time.time()
        self.backoff.reset()
        self._apply_connack_limits(properties)
        self.max_message = int(min(self.max_message, self.acks.max_message))
        self.acks.pause.end()
        self.skipped.all_due()
        log.info("connected to %s (session present: %s); %d records unconfirmed",
                 self.cfg.broker.address, flags.session_present,
                 self.window.unconfirmed)
        receipt = self.topics.receipt(self.cfg.edge_id)
        client.subscribe([(receipt, 1), (self.topics.core_session(), 1),
                          (self.topics.core_status(), 1)])
        client.publish(self.topics.status(self.cfg.edge_id),
                       self._status_body(True), qos=1, retain=True)

    def _apply_connack_limits(self, properties) -> None:
        # paho ignores the CONNACK's Receive Maximum and Maximum Packet Size,
        # so read them and cap ourselves (see the design's Known traps).
        self.inflight_cap = DEFAULT_INFLIGHT
        self.max_message = self.cfg.broker.max_message_bytes
        if properties is not None:
            # MQTT 5 without the property means 65535.
            self.inflight_cap = getattr(properties, "ReceiveMaximum", 65535)
            packet_max = getattr(properties, "MaximumPacketSize", None)
            if packet_max:
                self.max_message = min(self.max_message, packet_max - 512)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.unacked.discard(mid)
        sent = self.acks.take(mid)
        if sent is not None:
            self._on_batch_ack(*sent, reason_code)
        elif reason_code.is_failure:
            log.warning("broker refused message %d: %s", mid, reason_code)

    def _on_batch_ack(self, chunk: Chunk, size: int, reason_code) -> None:
        """Act on a record batch's PUBACK as the table in edge.reasons says."""
        reason = puback_reason(reason_code)
        topic = self.topics.data(self.cfg.edge_id, chunk.stream)
        now = time.monotonic()
        if reason.action in (Action.OK, Action.UNROUTED):
            self.acks.accepted(reason, topic)
        elif reason.action is Action.DEAD_LETTER:
            for piece in unconfirmed_pieces(chunk):
                self._dead_letter(piece, f"broker refused it: {reason.name}")
        elif reason.action is Action.SPLIT:
            self.max_message = self.acks.shrink(size)
            self.acks.retry(chunk, now)
        else:  # wait, config: the records stay and go again after a pause
            self.acks.refused(reason, topic, len(chunk), now)
            self.acks.retry(chunk, now)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._on_server_reason(reason_code)
        if self.connected and not self.stopping:
            log.warning("disconnected from %s: %s; %d records unconfirmed",
                        self.cfg.broker.address, reason_code,
                        self.window.unconfirmed)
        self.connected = False
        self.connected_since = None
        if not self.stopping:
            self._schedule_reconnect()

    def _on_server_reason(self, reason_code) -> None:
        """Act on a DISCONNECT's reason as the table in edge.reasons says."""
        reason = disconnect_reason(reason_code)
        self.acks.disconnected(reason, self.cfg.broker.address, time.monotonic())
        if reason.action is not Action.SPLIT:
            return
        # The oldest batch not yet acked is the one the broker choked on (it
        # acks in order); paho would send it again as is after the reconnect.
        size = self.acks.oldest_size()
        if size is not None:
            self.max_message = self.acks.shrink(size)
        for msg in self.client.drop_out_messages():
            self.unacked.discard(msg.mid)
        self.acks.retry_all_sent(time.monotonic())
        log.warning("broker %s found a message too large; messages now stay "
                    "under %d bytes", self.cfg.broker.address, self.max_message)

    def _schedule_reconnect(self) -> None:
        delay = max(self.backoff.next_delay(), self.acks.pause.left(time.monotonic()))
        self.next_connect = time.monotonic() + delay
        log.info("reconnecting to %s in %.1f s", self.cfg.broker.address, delay)

    def _on_message(self, client, userdata, msg):
        try:
            if msg.topic == self.topics.receipt(self.cfg.edge_id):
                self._on_receipt(msg.payload)
            elif msg.topic == self.topics.core_session():
                self._on_core_session(msg.payload, msg.retain)
            else:
                self._on_core_status(msg.topic, msg.payload)
        except EnvelopeError as exc:
            log.warning("ignored a malformed message on %s: %s", msg.topic, exc)

    def _on_receipt(self, payload: bytes) -> None:
        self.last_receipt = time.time()
        for epoch, ranges in decode_receipt(payload).items():
            for first, last in ranges:
                _, uncovered = self.window.confirm(epoch, first, last)
                for lo, hi in uncovered:
                    self._confirm_on_disk(epoch, lo, hi)

    def _confirm_on_disk(self, epoch: str, first: int, last: int) -> None:
        """A receipt for records not in memory: delete rows it fully covers."""
        if self.skipped.rows and self.outbox.confirm_skipped(epoch, first, last):
            self.skipped.reload()
        rows = self.outbox.segments_overlapping(epoch, first, last)
        covered = [i for i, f, n in rows if f >= first and f + n - 1 <= last
                   and i not in self.window.segments]
        # TODO: a receipt covering part of a segment not in memory is dropped
        # (those records are sent again and confirmed again); ends when the
        # outbox keeps per-record confirmation marks.
        self.window.done.extend(covered)

    def _on_core_session(self, payload: bytes, retained: bool = True) -> None:
        body = decode_json(payload)
        session = body.get("session") if isinstance(body, dict) else None
        if not session or session == self.core_session:
            return
        # A live (not retained) announcement is a collector starting on a
        # fresh broker session now: what we published before it subscribed
        # went nowhere, even when this is the first session we hear of.
        if self.core_session is not None or not retained:
            n = self.window.resend_all(time.monotonic())
            log.warning("the core started a new broker session (%s): messages "
                        "may have been lost on the way; resending %d records",
                        session, n)
        self.core_session = session

    def _on_core_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            self.core_status.pop(topic, None)
            return
        body = decode_json(payload)
        if isinstance(body, dict):
            self.core_status[topic] = bool(body.get("online"))

    @property
    def core_away(self) -> bool:
        """True when every collector known to us said (or willed) it is gone."""
        return bool(self.core_status) and not any(self.core_status.values())

    # --- the loop ------------------------------------------------------

    def run(self) -> None:
        self._install_signals()
        try:
            self.intake.prepare()
        except OutboxBusy as exc:
            log.warning("intake paused at start: %s", exc)
            self.intake_blocked = str(exc)
        log.info("edge %s started: outbox %s (epoch %s), %d spool dirs, broker "
                 "%s, window %d", self.cfg.edge_id, self.cfg.outbox.path,
                 self.outbox.epoch, len(self.cfg.spool),
                 self.cfg.broker.address, self.cfg.publish.window)
        while not self.stopping:
            try:
                self.step()
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise
                mark_damaged(self.outbox.path, exc)
                raise SpoolError(
                    f"outbox {self.outbox.path} found damaged: {exc}; the next "
                    "start salvages what is readable", exit_code=Exit.IOERR
                ) from None
        self._shutdown()

    def step(self) -> None:
        now = time.monotonic()
        if not self.connected and now >= self.next_connect:
            self._connect()
        self._network(self._pace(now))
        if now >= self.next_scan:
            self._scan(now)
        if self.connected:
            # Loading only while connected keeps at most one batch loaded and
            # unpublished, so higher-priority streams go first after an outage.
            self._load()
            self._publish(time.monotonic())
        self._keep_time(now)
        self._forget_confirmed()
        self._write_state()

    def _pace(self, now: float) -> float:
        """How long the network loop may wait for the broker this step.

        Idle, it waits longer: a record a producer commits is then seen up
        to IDLE_POLL_S later, and an idle edge costs a fraction of a percent
        of a core. Receipts and other messages wake it at once either way.
        """
        # TODO: an idle edge sees a record a producer committed up to
        # IDLE_POLL_S late. Ends when producers wake the daemon themselves
        # (a datagram or a watch on the outbox) instead of being polled for.
        busy = self.window.segments or self.unacked or self._maybe_more
        if busy:
            return BUSY_POLL_S
        return max(0.0, min(IDLE_POLL_S, self.next_scan - now))

    def _keep_time(self, now: float) -> None:
        """Save the outbox clock now and then; drop expired records."""
        try:
            if now >= self.next_uptime_save:
                self.next_uptime_save = now + UPTIME_SAVE_S
                if self.outbox.totals()[0]:  # an idle, empty edge writes nothing
                    self.outbox.save_uptime()
            if self.ttls and now >= self.next_sweep:
                # Often enough that a record outlives its TTL by a quarter.
                shortest = min(self.ttls.values())
                self.next_sweep = now + max(1.0, min(SWEEP_EVERY_S, shortest / 4))
                expired = self.outbox.expire(self.ttls, set(self.window.segments))
                if expired:
                    log.warning("dropped %d records whose TTL passed", expired)
                    self.expired_total += expired
                    self.skipped.reload()
        except SpoolError as exc:
            log.warning("outbox upkeep failed: %s", exc)

    def _scan(self, now: float) -> None:
        try:
            taken = self.intake.scan()
        except OutboxBusy as exc:
            # Full outbox or full disk: files wait in the spool, and intake
            # tries again by itself; logged once per spell, not per scan.
            if self.intake_blocked is None:
                log.warning("intake paused: %s", exc)
            self.intake_blocked = str(exc)
            self.next_scan = now + INTAKE_RETRY_S
            return
        if self.intake_blocked is not None:
            log.info("intake resumed")
            self.intake_blocked = None
        self._maybe_more = self._maybe_more or taken > 0
        # A full batch means more is waiting: scan again at once.
        busy = taken >= self.cfg.intake.batch_files
        self.next_scan = now + (0 if busy else self.cfg.intake.scan_interval)

    def _forget_confirmed(self) -> None:
        """Delete fully confirmed segments; on a full disk, keep trying."""
        done = self.window.take_done()
        try:
            self.outbox.delete_segments(done)
        except SpoolError as exc:
            # They stay out of the window, so they are not sent again.
            self.window.done.extend(done)
            log.warning("cannot delete %d confirmed segments yet: %s", len(done), exc)

    def _connect(self) -> None:
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:
            delay = self.backoff.next_delay()
            self.next_connect = time.monotonic() + delay
            log.info("broker %s unreachable (%s); retrying in %.1f s",
                     self.cfg.broker.address, exc, delay)
            return
        # The CONNACK arrives through the loop; on_connect then takes over.
        self.next_connect = time.monotonic() + self.cfg.broker.connect_timeout

    def _network(self, timeout: float) -> None:
        if self.client.socket() is None:
            time.sleep(timeout)
            return
        rc = self.client.loop(timeout=timeout)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            if self.connected:
                self._on_disconnect(self.client, None, None, rc, None)

    def _load(self) -> None:
        """Bring segments into memory while the window has room.

        The query runs only when something may be new: another process (a
        producer's `send`) committed, our own intake did, or the last load
        stopped at the limit.
        """
        version = self.outbox.data_version()
        if version != self.data_version or self.outbox.dropped != self._dropped_seen:
            # Something was committed; another process may have dropped
            # records (a full outbox), whose skipped notices are ours to send.
            self.data_version = version
            self._dropped_seen = self.outbox.dropped
            self._maybe_more = True
            self.skipped.reload()
        wants = self.window.wants()
        if wants <= 0 or not self._maybe_more:
            return
        rows = self.outbox.segments_by_priority(self.window.last_ids, wants)
        self._maybe_more = sum(r.count for r in rows) >= wants
        if rows:
            self.window.add(rows, time.monotonic())

    def _publish(self, now: float) -> None:
        if len(self.unacked) >= self.inflight_cap or now < self.acks.pause.until:
            return
        for chunk in self.acks.take_retries():
            self._send(chunk, now)
        self._report_skipped(now)
        if self.bucket is not None and not self.bucket.ready(now):
            return
        for chunk in self.window.due_resends(now, paused=self.core_away):
            self._send(chunk, now)
        while self.connected and len(self.unacked) < self.inflight_cap:
            if self.bucket is not None and not self.bucket.ready(now):
                break
            chunk = self.window.next_chunk(now)
            if chunk is None:
                break
            self._send(chunk, now)

    def _send(self, chunk: Chunk, now: float) -> None:
        """Publish a chunk, split so each message fits the broker's limit."""
        records = chunk.records()
        payload = encode_batch(self.cfg.edge_id, chunk.epoch, chunk.stream,
                               records, self.cfg.publish.codec)
        if len(payload) > self.max_message and len(records) > 1:
            for half in _halves(chunk):
                self._send(half, now)
            return
        if len(payload) > self.max_message:
            self._dead_letter(chunk, f"{len(payload)} bytes, over the broker's "
                              f"limit of {self.max_message}")
            return
        topic = self.topics.data(self.cfg.edge_id, chunk.stream)
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,
                           MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho at all: leave it for the next round.
            log.warning("publish refused by the client: %s", mqtt.error_string(info.rc))
            return
        self.unacked.add(info.mid)
        self.acks.track(info.mid, chunk, len(payload))
        if self.bucket is not None:
            self.bucket.spend(len(records), len(payload))
        self.window.mark_published(chunk, now)
        self.published_total += len(records)

    def _dead_letter(self, chunk: Chunk, reason: str) -> None:
        """Move a record no broker will carry to the edge's dead letters."""
        seg, offsets = chunk.pieces[0]
        records = [seg.records[o] for o in offsets]
        self.outbox.dead_letter(chunk.epoch, chunk.stream, records, reason)
        log.error("dead-lettered record %s:%s:%d: %s", self.cfg.edge_id,
                  chunk.epoch, records[0].seq, reason)
        # Counted unconfirmed only if it was published before (attempt > 0).
        self.window.drop_offsets(seg, offsets)
        self.skipped.reload()

    def _report_skipped(self, now: float) -> None:
        """Tell the core which ids were given up on, until it confirms."""
        for row, attempt in self.skipped.due(now):
            body = encode_skipped(row.epoch, row.stream,
                                  [(row.first_seq, row.last_seq)], row.reason)
            info = self.client.publish(self.topics.skipped(self.cfg.edge_id), body,
                                       qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.unacked.add(info.mid)
            self.skipped.sent(row.id, now, attempt)

    # --- state and shutdown ----------------------------------------------

    def state(self) -> dict:
        since = self.window.oldest_unconfirmed_since()
        age = None if since is None else max(0.0, time.monotonic() - since)
        return {
            "pid": os.getpid(),
            "edge_id": self.cfg.edge_id,
            "epoch": self.outbox.epoch,
            "broker": self.cfg.broker.address,
            "connected": self.connected,
            "connected_since": self.connected_since,
            "unconfirmed": self.window.unconfirmed,
            "oldest_unconfirmed_age_s": None if age is None else round(age, 1),
            "last_receipt_at": self.last_receipt,
            "published_total": self.published_total,
            "confirmed_total": self.window.confirmed_total,
            "resent_total": self.window.resent_total,
            "accepted_from_spool": self.intake.accepted,
            "quarantined": self.intake.quarantined,
            "core_away": self.core_away,
            "intake_blocked": self.intake_blocked,
            "dropped": self.outbox.dropped,
            "expired": self.expired_total,
        }

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._state_written < STATE_EVERY_S:
            return
        state = self.state()
        if state == self._state_last and not force:
            return
        state["updated_at"] = time.time()
        try:
            write_state(self.cfg.outbox.status_path, state)
        except OSError as exc:
            log.debug("state file not written: %s", exc)
            return
        state.pop("updated_at")
        self._state_last = state
        self._state_written = now

    def _install_signals(self) -> None:
        def ask_stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, ask_stop)
        signal.signal(signal.SIGINT, ask_stop)

    def _shutdown(self) -> None:
        log.info("stopping: %d records unconfirmed stay in the outbox",
                 self.window.unconfirmed)
        try:
            self.outbox.save_uptime()
        except SpoolError as exc:
            log.warning("outbox clock not saved: %s", exc)
        self._forget_confirmed()
        if self.connected:
            self.client.publish(self.topics.status(self.cfg.edge_id),
                                self._status_body(False), qos=1, retain=True)
            for _ in range(20):
                self.client.loop(timeout=0.05)
            self.client.disconnect()
        state = self.state()
        state.update(connected=False, pid=None, stopped_at=time.time())
        try:
            write_state(self.cfg.outbox.status_path, state)
        except OSError as exc:
            log.warning("state file not written: %s", exc)
        self.outbox.close()


def _halves(chunk: Chunk) -> list[Chunk]:
    flat = [(seg, o) for seg, offsets in chunk.pieces for o in offsets]
    mid = len(flat) // 2
    out = []
    for part in (flat[:mid], flat[mid:]):
        pieces: list = []
        for seg, o in part:
            if pieces and pieces[-1][0] is seg:
                pieces[-1][1].append(o)
            else:
                pieces.append((seg, [o]))
        out.append(Chunk(chunk.epoch, chunk.stream, pieces, chunk.attempt,
                         chunk.since))
    return out




class SkippedReports:
    """Skipped notices waiting for a receipt, each with a resend timer."""

    def __init__(self, outbox: Outbox, initial: float, cap: float):
        self.outbox = outbox
        self.initial = initial
        self.cap = cap
        self.rows: dict[int, SkippedRow] = {}
        self._timers: dict[int, tuple[float, int]] = {}  # id -> (due, attempt)
        self.reload()

    def reload(self) -> None:
        self.rows = {r.id: r for r in self.outbox.skipped_pending()}
        self._timers = {i: self._timers.get(i, (0.0, 0)) for i in self.rows}

    def all_due(self) -> None:
        self._timers = {i: (0.0, attempt) for i, (_, attempt) in self._timers.items()}

    def due(self, now: float) -> list[tuple[SkippedRow, int]]:
        return [(self.rows[i], attempt) for i, (at, attempt) in self._timers.items()
                if at <= now]

    def sent(self, row_id: int, now: float, attempt: int) -> None:
        delay = min(self.cap, self.initial * 2**attempt)
        self._timers[row_id] = (now + delay, attempt + 1)


def take_daemon_lock(path: str):
    """Hold an exclusive lock for the daemon's life: one daemon per outbox.

    Two daemons would each take the other's claimed spool files again and
    fight over one MQTT client id. The lock goes with the process, even on
    SIGKILL, so a crash never leaves it behind.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise OutboxError(f"cannot create lock file {path}: {exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "?"
        handle.close()
        raise OutboxBusy(f"another edge-spooler (pid {other}) runs on this outbox; "
                         "stop it first") from None
    try:
        # Unbuffered, so a full disk fails here once, not again at exit.
        os.ftruncate(handle.fileno(), 0)
        os.pwrite(handle.fileno(), f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        log.warning("lock file %s holds no pid (%s); the lock holds", path, exc)
    return handle


class TokenBucket:
    """Publishing caps in records/s and bytes/s (0: none), one second deep.

    A chunk may overdraw the bucket; publishing then waits until it refills,
    so the average rate holds whatever the batch size.
    """

    def __init__(self, records_per_s: float, bytes_per_s: float):
        self.rates = (records_per_s, bytes_per_s)
        self.levels = [records_per_s, bytes_per_s]
        self.at = time.monotonic()

    def ready(self, now: float) -> bool:
        elapsed, self.at = now - self.at, now
        for i, rate in enumerate(self.rates):
            if rate:
                self.levels[i] = min(rate, self.levels[i] + elapsed * rate)
        return all(level > 0 for rate, level in zip(self.rates, self.levels) if rate)

    def spend(self, records: int, bytes_: int) -> None:
        self.levels[0] -= records
        self.levels[1] -= bytes_

"""A small blocking MQTT 3.1.1 client for tests that poke a broker directly.

Every call waits for the broker's answer (CONNACK, SUBACK, PUBACK) within a
timeout, so a test reads as a sequence of steps and never hangs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt

WAIT_TIMEOUT_S = 5.0


class ProbeError(Exception):
    """The broker refused or did not answer within the timeout."""


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class ProbeClient:
    """One paho client with a persistent session unless clean=True."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        clean: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._connected = threading.Event()
        self._connect_result: tuple[bool, mqtt.ReasonCode] | None = None
        self._subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self._received: list[Received] = []
        self._changed = threading.Condition()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def connect(self, timeout: float = WAIT_TIMEOUT_S) -> bool:
        """Connect and return whether the broker kept a session for us."""
        self._client.connect("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.disconnect()
            raise ProbeError(f"no CONNACK from port {self.port} in {timeout} s")
        session_present, reason = self._connect_result
        if reason.is_failure:
            self.disconnect()
            raise ProbeError(f"connection refused: {reason}")
        return session_present

    def subscribe(
        self, topic: str, qos: int = 1, timeout: float = WAIT_TIMEOUT_S
    ) -> list[mqtt.ReasonCode]:
        """Subscribe and return the SUBACK's reason codes."""
        rc, mid = self._client.subscribe(topic, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ProbeError(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
        with self._changed:
            if not self._changed.wait_for(lambda: mid in self._subacks, timeout):
                raise ProbeError(f"no SUBACK for {topic} in {timeout} s")
            return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = WAIT_TIMEOUT_S,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ProbeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ProbeError(f"no PUBACK for {topic} in {timeout} s")

    @property
    def session_present(self) -> bool:
        """Whether the broker's CONNACK said it kept a session for us."""
        if self._connect_result is None:
            raise ProbeError("not connected yet")
        return self._connect_result[0]

    def wait_for_messages(
        self, count: int, timeout: float = WAIT_TIMEOUT_S
    ) -> list[Received]:
        """Wait until ``count`` messages arrived; return all received so far."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._received) >= count, timeout)
            return list(self._received)

    def wait_for_payload(
        self, payload: bytes, timeout: float = WAIT_TIMEOUT_S
    ) -> list[Received]:
        """Wait for a message carrying ``payload``; return those before it."""

        def arrived() -> bool:
            return any(message.payload == payload for message in self._received)

        with self._changed:
            if not self._changed.wait_for(arrived, timeout):
                raise ProbeError(f"{payload!r} did not arrive in {timeout} s")
            payloads = [message.payload for message in self._received]
            return self._received[: payloads.index(payload)]

    def disconnect(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> ProbeClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self._connect_result = (flags.session_present, reason)
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        with self._changed:
            self._subacks[mid] = reasons
            self._changed.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self._received.append(
                Received(message.topic, message.payload, message.qos, message.retain)
            )
            self._changed.notify_all()

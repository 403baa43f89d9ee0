"""MQTT link settings and the paho client both sides build from them.

The traps this module exists for (see the design's "Known traps"): paho
defaults to a clean session on 3.1.1 and a clean start on the first MQTT 5
connect, so both are passed explicitly; MQTT 5 also needs a session expiry, or
the session ends with the connection.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import RetryCallState, wait_exponential_jitter

from common.config import check_positive
from common.errors import ConfigError, LinkError

log = logging.getLogger("common.link")

# A CONNACK reason that no retry will fix: bad credentials or not authorised.
AUTH_REFUSED = {4, 5, 134, 135}


MIN_MESSAGE_BYTES = 4096


@dataclass(frozen=True)
class TLSConfig:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def validate(self, path: str) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{path}.{name}", f"file {value} does not exist")
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"{path}.cert", "cert and key go together")


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = 30
    username: str | None = None
    password_file: str | None = None
    tls: TLSConfig | None = None
    # MQTT 5: how long the broker keeps our session after we disconnect.
    session_expiry: int = 7 * 86400
    # The broker's message_size_limit. With 3.1.1 Mosquitto acks and drops a
    # larger message, so the edge must know the limit to split its batches.
    max_message_bytes: int = 1048576
    connect_timeout: float = 10.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0

    def validate(self, path: str) -> None:
        where = f"{path}." if path else ""
        if not self.host or self.host != self.host.strip():
            raise ConfigError(
                f"{where}host", f"must be a host name or address, not {self.host!r}"
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{where}port", f"must be 1-65535, not {self.port}")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"{where}keepalive", "must be 5-65535 seconds")
        for name in ("session_expiry", "max_message_bytes", "connect_timeout"):
            check_positive(path, name, getattr(self, name))
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            # Below this not even a batch's own fields and one record fit.
            raise ConfigError(
                f"{where}max_message_bytes", f"must be at least {MIN_MESSAGE_BYTES}"
            )
        check_positive(path, "reconnect_min", self.reconnect_min)
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError(f"{where}reconnect_max", "must be >= reconnect_min")
        if self.password_file and not Path(self.password_file).is_file():
            raise ConfigError(
                f"{where}password_file", f"file {self.password_file} does not exist"
            )

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def make_client(
    cfg: BrokerConfig,
    client_id: str,
    *,
    manual_ack: bool = False,
    clean: bool = False,
) -> mqtt.Client:
    """A paho client with a persistent session (unless `clean`), credentials
    and TLS set."""
    if cfg.v5:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
            manual_ack=manual_ack,
        )
    if cfg.username:
        client.username_pw_set(cfg.username, _read_password(cfg))
    if cfg.tls:
        client.tls_set(
            ca_certs=cfg.tls.ca,
            certfile=cfg.tls.cert,
            keyfile=cfg.tls.key,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.connect_timeout = cfg.connect_timeout
    return client


def _read_password(cfg: BrokerConfig) -> str | None:
    if not cfg.password_file:
        return None
    try:
        return Path(cfg.password_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("broker.password_file", f"cannot read: {exc}") from None


def connect_properties(cfg: BrokerConfig, receive_maximum: int | None = None):
    """CONNECT properties for MQTT 5 (None for 3.1.1)."""
    if not cfg.v5:
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


def prepare_connect(
    client: mqtt.Client, cfg: BrokerConfig, receive_maximum: int | None = None
) -> None:
    """Store the connect parameters; `reconnect()` then uses them each time."""
    kwargs = {}
    if cfg.v5:
        kwargs = {
            "clean_start": False,
            "properties": connect_properties(cfg, receive_maximum),
        }
    client.connect_async(cfg.host, cfg.port, cfg.keepalive, **kwargs)


class Backoff:
    """Exponential reconnect delays with jitter, from tenacity's wait strategy."""

    def __init__(self, cfg: BrokerConfig):
        self._wait = wait_exponential_jitter(
            initial=cfg.reconnect_min, max=cfg.reconnect_max, jitter=cfg.reconnect_min
        )
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        state = RetryCallState(None, None, (), {})
        state.attempt_number = self.attempt
        return self._wait(state)

    def reset(self) -> None:
        self.attempt = 0


def connack_refused(reason_code) -> LinkError:
    """The error for a CONNACK that refused us; auth refusals exit 77."""
    value = getattr(reason_code, "value", reason_code)
    text = str(reason_code)
    if value in AUTH_REFUSED:
        from common.exits import Exit

        return LinkError(
            f"broker refused the connection: {text}; check username and password",
            exit_code=Exit.NOPERM,
        )
    return LinkError(f"broker refused the connection: {text}")


def probe(cfg: BrokerConfig, client_id: str, timeout: float = 10.0) -> str:
    """Connect once with the configured credentials, then disconnect.

    Uses a clean session under its own client id, so the daemon's session is
    left alone (unless the broker forces client id = username: then the
    daemon is disconnected for a moment and reconnects). Returns a line
    describing the broker; raises LinkError (69, or 77 when refused).
    """
    # Clean, and for MQTT 5 no session expiry: the probe leaves no session.
    client = make_client(cfg, f"{client_id}-check-{os.getpid()}", clean=True)
    outcome: dict = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        outcome["reason"] = reason_code
        outcome["properties"] = properties

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, cfg.keepalive)
    except (OSError, ValueError) as exc:
        raise LinkError(
            f"broker {cfg.address} unreachable: {exc}; check "
            "broker.host, broker.port and the network"
        ) from None
    deadline = time.monotonic() + timeout
    while "reason" not in outcome and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    reason = outcome.get("reason")
    if reason is None:
        client.disconnect()
        raise LinkError(
            f"broker {cfg.address} accepted TCP but sent no CONNACK "
            f"within {timeout:.0f} s; check TLS and the port"
        )
    if reason.is_failure:
        raise connack_refused(reason)
    client.disconnect()
    client.loop(timeout=0.1)
    props = outcome.get("properties")
    limits = ""
    if props is not None and hasattr(props, "ReceiveMaximum"):
        limits = f", Receive Maximum {props.ReceiveMaximum}"
    return f"broker {cfg.address} accepted MQTT {cfg.protocol}{limits}"

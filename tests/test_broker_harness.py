"""The test broker is the production config on loopback, and faults are real."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness.broker import (
    PRODUCTION_CONFIG,
    Broker,
    BrokerError,
    derive_config,
    parse_config,
)
from tests.harness.client import ProbeClient

pytestmark = pytest.mark.integration

TOPIC = "spoolmq/edge-a/data/readings"

# High enough that no autosave happens during a test: whatever is saved was
# saved by a clean exit.
NO_AUTOSAVE = 3600


def settings_of(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in parse_config(text):
        found.setdefault(key, []).append(value)
    return found


def subscribe_persistently(port: int, client_id: str = "collector") -> None:
    with ProbeClient(port, client_id) as subscriber:
        subscriber.subscribe(TOPIC, qos=1)


def publish_once(port: int, payload: str, topic: str = TOPIC) -> None:
    with ProbeClient(port, "publisher", clean=True) as publisher:
        publisher.publish(topic, payload, qos=1)


def received_on_reconnect(
    port: int, client_id: str = "collector"
) -> tuple[bool, list[str]]:
    """Reconnect a session; return whether it was kept and what it held.

    A marker published after the reconnect arrives behind every queued
    message, so what came before it is everything the session held. The
    subscription is renewed in case the session was lost.
    """
    with ProbeClient(port, client_id) as subscriber:
        subscriber.subscribe(TOPIC, qos=1)
        publish_once(port, "marker")
        queued = subscriber.wait_for_payload(b"marker")
        return subscriber.session_present, [m.payload.decode() for m in queued]


def test_the_derived_config_keeps_production_limits_and_replaces_host_settings(
    tmp_path,
):
    production = settings_of(PRODUCTION_CONFIG.read_text())
    derived = settings_of(
        derive_config(PRODUCTION_CONFIG.read_text(), port=12345, workdir=tmp_path)
    )

    assert derived["listener"] == ["12345 127.0.0.1"]
    assert derived["allow_anonymous"] == ["true"]
    assert derived["persistence_location"] == [f"{tmp_path}/"]
    assert derived["log_dest"] == [f"file {tmp_path / 'mosquitto.log'}"]
    for host_only in ("password_file", "acl_file", "pid_file"):
        assert host_only not in derived
    for kept in ("max_queued_messages", "autosave_interval", "message_size_limit"):
        assert derived[kept] == production[kept]


def test_an_override_replaces_a_setting_and_none_removes_it(tmp_path):
    derived = settings_of(
        derive_config(
            PRODUCTION_CONFIG.read_text(),
            port=1,
            workdir=tmp_path,
            settings={
                "max_queued_messages": 5,
                "persistence": False,
                "max_keepalive": None,
            },
        )
    )

    assert derived["max_queued_messages"] == ["5"]
    assert derived["persistence"] == ["false"]
    assert "max_keepalive" not in derived


def test_a_broker_from_the_derived_config_starts_and_delivers(broker):
    with ProbeClient(broker.port, "reader", clean=True) as reader:
        reader.subscribe(TOPIC)
        publish_once(broker.port, "hello")
        received = reader.wait_for_messages(1)

    assert [message.payload for message in received] == [b"hello"]
    assert "running" in broker.log_text()


def test_an_overridden_queue_limit_reaches_the_broker(broker_factory):
    broker = broker_factory(max_queued_messages=3)
    subscribe_persistently(broker.port)
    for number in range(6):
        publish_once(broker.port, f"m{number}")

    _, queued = received_on_reconnect(broker.port)

    # The broker sends the first messages as in-flight ones; beyond those,
    # only three are queued and the rest are dropped without a word.
    assert queued == ["m0", "m1", "m2"]


def test_a_queued_message_to_a_persistent_session_survives_a_clean_stop(
    broker_factory,
):
    broker = broker_factory(autosave_interval=NO_AUTOSAVE)
    subscribe_persistently(broker.port)
    publish_once(broker.port, "kept")
    port = broker.port

    broker.stop()
    broker.restart(keep_state=True)
    session_present, queued = received_on_reconnect(broker.port)

    assert broker.port == port
    assert session_present
    assert queued == ["kept"]


def test_a_restart_without_the_state_file_forgets_sessions_and_queues(
    broker_factory,
):
    broker = broker_factory(autosave_interval=NO_AUTOSAVE)
    subscribe_persistently(broker.port)
    publish_once(broker.port, "forgotten")

    broker.restart(keep_state=False)
    session_present, queued = received_on_reconnect(broker.port)

    assert not session_present
    assert queued == []


def test_kill_is_a_sigkill_that_loses_what_came_after_the_last_save(
    broker_factory,
):
    broker = broker_factory(autosave_interval=NO_AUTOSAVE)
    subscribe_persistently(broker.port)
    broker.restart(keep_state=True)  # the clean exit saves the session
    saved = broker.state_file.read_bytes()
    publish_once(broker.port, "after the save")
    killed_pid = broker.pid

    broker.kill()

    assert broker.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)
    assert broker.state_file.read_bytes() == saved
    broker.restart(keep_state=True)
    session_present, queued = received_on_reconnect(broker.port)
    assert session_present
    assert queued == []


def test_a_broker_that_cannot_start_raises_with_its_log():
    broker = Broker({"no_such_option": "1"})
    try:
        with pytest.raises(BrokerError, match="no_such_option"):
            broker.start()
        assert not broker.running
    finally:
        broker.close()

"""The shipped ACL template lets each edge reach only its own topics."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import REPO_ROOT
from tests.harness.broker import Broker
from tests.harness.client import ProbeClient, ProbeError

ACL_TEMPLATE = REPO_ROOT / "mosquitto" / "acl.example"
PASSWORDS = {"edge-a": "secret-a", "edge-b": "secret-b", "core-01": "secret-core"}

pytestmark = pytest.mark.integration


def password_file_text(tmp_path) -> str:
    path = tmp_path / "passwd"
    path.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=10,
        )
    return path.read_text()


@pytest.fixture
def secured_broker(broker_factory, tmp_path) -> Broker:
    """A broker with production auth: passwords, the ACL, username = client id."""
    broker = broker_factory(start=False)
    broker.settings.update(
        allow_anonymous=False,
        password_file=broker.write_file("passwd", password_file_text(tmp_path)),
        acl_file=broker.write_file("acl", ACL_TEMPLATE.read_text()),
        use_username_as_clientid=True,
    )
    broker.start()
    return broker


def login(broker: Broker, user: str, *, client_id: str | None = None) -> ProbeClient:
    client = ProbeClient(
        broker.port,
        client_id or user,
        username=user,
        password=PASSWORDS[user],
    )
    client.connect()
    return client


def test_an_anonymous_client_is_refused(secured_broker):
    with pytest.raises(ProbeError, match="refused"):
        ProbeClient(secured_broker.port, "anonymous", clean=True).connect()


def test_a_collector_receives_an_edges_own_data_but_not_data_in_anothers_name(
    secured_broker,
):
    collector = login(secured_broker, "core-01")
    edge = login(secured_broker, "edge-a")
    try:
        collector.subscribe("spoolmq/+/data/#")
        edge.publish("spoolmq/edge-b/data/readings", "forged")
        edge.publish("spoolmq/edge-a/data/readings", "own")

        before = collector.wait_for_payload(b"own")
    finally:
        edge.disconnect()
        collector.disconnect()

    assert before == []


def test_an_edge_reads_its_own_receipts_and_the_core_topics_only(secured_broker):
    collector = login(secured_broker, "core-01")
    edge_a = login(secured_broker, "edge-a")
    edge_b = login(secured_broker, "edge-b")
    try:
        edge_a.subscribe("spoolmq/edge-a/receipt")
        edge_a.subscribe("spoolmq/_core/#")
        edge_b.subscribe("spoolmq/edge-a/receipt")
        edge_b.subscribe("spoolmq/_core/#")
        collector.publish("spoolmq/edge-a/receipt", "receipt for a")
        collector.publish("spoolmq/_core/session", "core session", retain=True)

        seen_by_a = edge_a.wait_for_payload(b"core session")
        seen_by_b = edge_b.wait_for_payload(b"core session")
    finally:
        for client in (edge_a, edge_b, collector):
            client.disconnect()

    assert [message.payload for message in seen_by_a] == [b"receipt for a"]
    assert seen_by_b == []


def test_an_edge_cannot_write_receipts_or_core_topics(secured_broker):
    collector = login(secured_broker, "core-01")
    edge_a = login(secured_broker, "edge-a")
    edge_b = login(secured_broker, "edge-b")
    try:
        edge_a.subscribe("spoolmq/edge-a/receipt")
        edge_a.subscribe("spoolmq/_core/#")
        edge_b.publish("spoolmq/edge-a/receipt", "forged receipt")
        edge_b.publish("spoolmq/_core/session", "forged session")
        collector.publish("spoolmq/edge-a/receipt", "real receipt")

        before = edge_a.wait_for_payload(b"real receipt")
    finally:
        for client in (edge_a, edge_b, collector):
            client.disconnect()

    assert before == []


def test_collectors_may_share_the_data_through_a_shared_subscription(
    secured_broker,
):
    collector = login(secured_broker, "core-01")
    edge = login(secured_broker, "edge-a")
    try:
        collector.subscribe("$share/collectors/spoolmq/+/data/#")
        collector.subscribe("$share/collectors/spoolmq/+/status")
        edge.publish("spoolmq/edge-a/status", "online", retain=True)
        edge.publish("spoolmq/edge-a/data/readings", "shared")

        before = collector.wait_for_payload(b"shared")
    finally:
        edge.disconnect()
        collector.disconnect()

    assert [message.payload for message in before] == [b"online"]


def test_an_edges_session_follows_its_username_whatever_client_id_it_sends(
    secured_broker,
):
    edge = login(secured_broker, "edge-a", client_id="first-id")
    edge.subscribe("spoolmq/edge-a/receipt")
    edge.disconnect()
    collector = login(secured_broker, "core-01")
    collector.publish("spoolmq/edge-a/receipt", "queued receipt")
    collector.disconnect()

    edge = login(secured_broker, "edge-a", client_id="second-id")
    try:
        received = edge.wait_for_messages(1)
    finally:
        edge.disconnect()

    assert edge.session_present
    assert [message.payload for message in received] == [b"queued receipt"]

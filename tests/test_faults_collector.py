"""Fault: a collector killed mid-batch, and a broker restart under pending acks.

The collector acks a message only after the commit that holds its records,
and only on the connection the message came on. Killed before its commit,
the broker still holds the message and gives it to the next collector; a
commit that ends after a reconnect leaves the old connection's messages
unacked, and the broker's redelivery of them is absorbed by the unique key.

The broker runs at `log_type all`, so the test reads every PUBLISH it sent
the collector and every PUBACK it got back, connection by connection.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.harness.pipeline import (
    PROTOCOLS,
    Pipeline,
    assert_exactly,
    datastore_locked,
    puback_audit,
    pubacks_from,
    wait_for,
)

pytestmark = pytest.mark.integration

CORE_ID = "core-test"
W = 200
# Resends so late that, within a test, only the broker's redelivery of what
# the collector left unacked can bring a record to the datastore.
NO_RESENDS = {
    "publish": {
        "window": W,
        "batch_records": 50,
        "resend_initial": 300,
        "resend_max": 600,
    }
}
VERBOSE_BROKER = {"log_type": ["all"]}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_collector_killed_mid_batch_twice_leaves_its_uncommitted_messages_to_the_broker(
    tmp_path, broker_factory, daemons, protocol
):
    broker = broker_factory(**VERBOSE_BROKER)
    # A long linger keeps a received, uncommitted batch in the collector
    # most of the time, so a kill lands mid-batch.
    pipe = Pipeline(
        tmp_path,
        broker,
        daemons,
        protocol,
        datastore={"linger_ms": 400, "commit_when_idle": False},
    )
    edge = pipe.add_edge("e1", **NO_RESENDS)
    rng = random.Random(20261204)
    try:
        pipe.start_collector()
        edge.spooler.start()
        edge.send_count(3000, chunk=250)
        for kill in (1, 2):
            wait_for(
                lambda k=kill: len(pipe.stored()) >= 400 * k, 30, describe=pipe.tails
            )
            time.sleep(rng.uniform(0.05, 0.4))
            pipe.collector.kill()
            pipe.collector.start()

        stored = pipe.wait_stored(timeout=60)
        pipe.wait_outboxes_empty()
        assert_exactly(stored, pipe.expected())
        # Nothing came from an edge resend: the broker redelivered it all.
        wait_for(lambda: edge.state().get("confirmed_total") == 3000, 5)
        assert edge.state()["resent_total"] == 0
        assert "new broker session" not in edge.spooler.log_text()
        audit = puback_audit(broker.log_text(), CORE_ID)
        print(f"\n[{protocol}] PUBACK audit: {audit}")
        assert audit["connections"] == 3
        assert audit["redelivered"] > 0
        assert audit["violations"] == []
    finally:
        pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_broker_restart_with_acks_pending_acks_nothing_of_the_old_connection(
    tmp_path, broker_factory, daemons, protocol
):
    broker = broker_factory(**VERBOSE_BROKER)
    pipe = Pipeline(tmp_path, broker, daemons, protocol)
    edge = pipe.add_edge("e1", **NO_RESENDS)
    try:
        pipe.start_collector()
        edge.spooler.start()
        pipe.wait_stored(edge.send_count(100), timeout=30)
        time.sleep(1.0)  # the acks of that commit reach the broker

        with datastore_locked(pipe.db):
            # Received but not committable: the collector must not ack.
            acks_before = pubacks_from(broker.log_text(), CORE_ID)
            sent_before = broker.log_text().count(f"Sending PUBLISH to {CORE_ID}")
            pending = edge.send_count(150)
            wait_for(
                lambda: (
                    broker.log_text().count(f"Sending PUBLISH to {CORE_ID}")
                    >= sent_before + 3
                ),
                15,
                describe=broker.log_tail,
            )
            time.sleep(2.0)
            assert pubacks_from(broker.log_text(), CORE_ID) == acks_before

            # The broker comes back with the collector's unacked messages
            # and sends them again on a new connection.
            broker.restart(keep_state=True)
            wait_for(
                lambda: pipe.collector.log_text().count("connected to ") >= 2,
                30,
                describe=pipe.tails,
            )
            time.sleep(1.0)
            assert pubacks_from(broker.log_text(), CORE_ID) == acks_before

        stored = pipe.wait_stored(timeout=60)
        pipe.wait_outboxes_empty()
        assert_exactly(stored, pipe.expected())
        assert pending <= set(stored)
        wait_for(
            lambda: (
                "came on an earlier connection: left unacked"
                in pipe.collector.log_text()
            ),
            10,
            describe=pipe.tails,
        )
        audit = puback_audit(broker.log_text(), CORE_ID)
        print(f"\n[{protocol}] PUBACK audit: {audit}")
        assert audit["connections"] >= 2
        assert audit["redelivered"] > 0
        assert audit["violations"] == []
    finally:
        pipe.close()

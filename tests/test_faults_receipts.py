"""Fault: receipts that never arrive, and a core away for a long time.

A lost receipt costs a resend: the edge sends the records again on its
timer, the datastore's unique key ignores the copies and the core confirms
them once more, so the outbox empties and each record is stored once. While
the core is known to be away (its retained status, from its last will),
timed resends pause, so a long outage costs at most W copies per edge (the
README's duplicate bound); a probe subscriber counts every copy the broker
forwarded.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.client import ProbeClient
from tests.harness.pipeline import (
    PROTOCOLS,
    DataProbe,
    Pipeline,
    assert_exactly,
    wait_for,
)

pytestmark = pytest.mark.integration

W = 200
OUTAGE_S = 20.0


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_receipt_lost_with_the_edges_session_is_made_good_by_a_resend(
    tmp_path, broker, daemons, protocol
):
    pipe = Pipeline(tmp_path, broker, daemons, protocol)
    edge = pipe.add_edge(
        "e1",
        via_proxy=True,
        publish={
            "window": W,
            "batch_records": 50,
            "resend_initial": 2,
            "resend_max": 5,
        },
    )
    try:
        pipe.start_collector()
        edge.spooler.start()
        edge.wait_connected()
        pipe.collector.stop()
        with DataProbe(broker.port) as probe:
            ids = edge.send_count(150)
            wait_for(lambda: probe.summary()["records"] >= 150, 20, probe.summary)
        # The broker's PUBACKs reach the edge: a cut that took one would make
        # paho replay that message on reconnect, outside the resend counted.
        wait_for(lambda: edge.state().get("published_total", 0) >= 150, 5, edge.state)
        time.sleep(0.5)

        # The edge's link goes down, and its session with the broker is
        # taken over by a clean one under its client id: the subscription
        # its receipts would have come through is gone.
        edge.proxy.cut()
        wait_for(
            lambda: "disconnected from" in edge.spooler.log_text(),
            15,
            edge.spooler.log_tail,
        )
        with ProbeClient(broker.port, "e1", clean=True):
            pass
        pipe.start_collector()
        stored = pipe.wait_stored(ids, timeout=30)
        assert_exactly(stored, ids)
        time.sleep(1.0)
        assert edge.outbox_records() == 150, "the receipt was not lost"

        edge.proxy.restore()
        pipe.wait_outboxes_empty(timeout=30)
        assert_exactly(pipe.stored(), ids)
        wait_for(lambda: edge.state().get("resent_total", 0) >= 150, 5, edge.state)
    finally:
        pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_long_core_outage_costs_at_most_w_duplicate_records(
    tmp_path, broker, daemons, protocol
):
    pipe = Pipeline(tmp_path, broker, daemons, protocol)
    edge = pipe.add_edge(
        "e1",
        publish={
            "window": W,
            "batch_records": 50,
            "resend_initial": 1,
            "resend_max": 2,
        },
    )
    try:
        pipe.start_collector()
        edge.spooler.start()
        with DataProbe(broker.port) as probe:
            pipe.wait_stored(edge.send_count(100), timeout=30)

            # Killed: the broker publishes its last will, "offline".
            pipe.collector.kill()
            edge.send_count(1000)
            edge.wait_unconfirmed(W)
            wait_for(lambda: edge.state().get("core_away") is True, 10, edge.state)
            time.sleep(OUTAGE_S)
            during = probe.summary()

            pipe.start_collector()
            stored = pipe.wait_stored(timeout=60)
            pipe.wait_outboxes_empty()
            time.sleep(0.5)
            expected = pipe.expected()
            duplicates = probe.copies_of(expected) - len(expected)

        assert_exactly(stored, expected)
        print(
            f"\n[{protocol}] {OUTAGE_S:.0f} s outage with resend timers of 1-2 s: "
            f"{duplicates} duplicate records forwarded (W = {W}); during the "
            f"outage: {during['copies']} copies of {during['records']} records"
        )
        assert duplicates <= W
    finally:
        pipe.close()

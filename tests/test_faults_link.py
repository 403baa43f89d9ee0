"""Fault: a link between an edge and the broker that fails silently.

A blackholed link sends no RST and no FIN; only the keepalive can tell. The
edge must notice within two keepalive intervals, keep accepting records, and
after the link returns drain a backlog far larger than W without ever having
more than W records unconfirmed.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.pipeline import (
    PROTOCOLS,
    DataProbe,
    Pipeline,
    Sampler,
    assert_exactly,
    wait_for,
)

pytestmark = pytest.mark.integration

KEEPALIVE = 5
W = 200
BATCH = 50
EDGE = {
    "broker": {"keepalive": KEEPALIVE, "connect_timeout": 3},
    "publish": {
        "window": W,
        "batch_records": BATCH,
        "resend_initial": 2,
        "resend_max": 5,
    },
}
# paho's loop runs every 50 ms; allow for it and for a loaded test host.
DETECTION_SLACK_S = 2.0
# The state file is rewritten at most every 2 s.
STATE_FILE_CADENCE_S = 2.0


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_blackholed_link_is_noticed_within_two_keepalives_and_its_backlog_drains_within_w(
    tmp_path, broker, daemons, protocol
):
    pipe = Pipeline(tmp_path, broker, daemons, protocol)
    edge = pipe.add_edge("e1", via_proxy=True, **EDGE)
    try:
        with DataProbe(broker.port) as probe:
            pipe.start_collector()
            edge.spooler.start()
            edge.wait_connected()
            states = Sampler(lambda: edge.state().get("unconfirmed"), 0.2).start()

            # Production is under way when the link goes silent.
            edge.send_count(1000, chunk=100)
            wait_for(lambda: len(pipe.stored()) >= 200, 20, describe=pipe.tails)
            lost_before = edge.spooler.log_text().count("disconnected from")
            edge.proxy.blackhole()
            blackholed_at = time.monotonic()
            edge.send_count(4000, chunk=500, tag="late")

            by_log = _seconds_until(
                lambda: (
                    edge.spooler.log_text().count("disconnected from") > lost_before
                ),
                blackholed_at,
                2 * KEEPALIVE + 10,
            )
            by_state = _seconds_until(
                lambda: edge.state().get("connected") is False,
                blackholed_at,
                2 * KEEPALIVE + 10,
            )
            assert edge.spooler.running

            edge.proxy.restore()
            stored = pipe.wait_stored(timeout=90)
            pipe.wait_outboxes_empty()
            unconfirmed = states.stop()
            seen = probe.summary()

        assert_exactly(stored, pipe.expected())
        print(
            f"\n[{protocol}] dead link noticed after {by_log:.1f} s (log), "
            f"{by_state:.1f} s (state file); probe {seen}; state file "
            f"unconfirmed max {max(states.values(), default=0)} over "
            f"{len(unconfirmed)} samples"
        )
        assert by_log <= 2 * KEEPALIVE + DETECTION_SLACK_S
        assert by_state <= 2 * KEEPALIVE + DETECTION_SLACK_S + STATE_FILE_CADENCE_S
        assert max(states.values()) <= W
        assert seen["max_outstanding"]["e1"] <= W
        assert seen["max_records_per_message"] <= BATCH
        assert seen["records"] == len(pipe.expected())
    finally:
        pipe.close()


def _seconds_until(predicate, since: float, timeout: float) -> float:
    wait_for(
        predicate,
        timeout,
        interval=0.05,
        describe=lambda: f"not seen within {timeout} s",
    )
    return time.monotonic() - since

"""Fault: a broker unreachable while a large backlog is accepted.

The outbox on disk holds the backlog; the spooler keeps only about W records
in memory, so its memory stays flat however large the backlog, and paho's
16-bit packet ids wrap many times over without losing or doubling a record.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.pipeline import (
    PROTOCOLS,
    Pipeline,
    Sampler,
    assert_exactly,
    rss_kib,
    wait_for,
)

pytestmark = pytest.mark.integration

RECORDS = 80_000
PACKET_IDS = 65_535
RSS_GROWTH_MAX_KIB = 30 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_backlog_of_80000_records_drains_in_single_record_messages_with_flat_memory(
    tmp_path, broker, daemons, protocol
):
    pipe = Pipeline(
        tmp_path,
        broker,
        daemons,
        protocol,
        datastore={"batch_messages": 500, "linger_ms": 20},
    )
    # One record per message, so more messages flow than packet ids exist.
    # The resend timer is the default: flights wait that long in memory.
    edge = pipe.add_edge(
        "e1",
        via_proxy=True,
        publish={
            "window": 1000,
            "batch_records": 1,
            "resend_initial": 30,
            "resend_max": 600,
        },
    )
    try:
        pipe.collector.start()
        edge.proxy.cut()
        edge.spooler.start()
        edge.wait_started()
        time.sleep(1.0)
        baseline = rss_kib(edge.spooler.pid)
        rss = Sampler(lambda: rss_kib(edge.spooler.pid), 0.25).start()

        edge.send_count(RECORDS, chunk=5000)
        assert edge.outbox_records() == RECORDS
        started = time.monotonic()
        edge.proxy.restore()
        stored = pipe.wait_stored(timeout=150)
        drained_s = time.monotonic() - started
        pipe.wait_outboxes_empty()
        peak = max(rss.values())
        rss.stop()
        # The state file is rewritten every 2 s: wait for the final figures.
        state = wait_for(
            lambda: (st := edge.state()).get("confirmed_total") == RECORDS and st,
            5,
            edge.state,
        )

        print(
            f"\n[{protocol}] {RECORDS} records drained in {drained_s:.1f} s "
            f"({state.get('published_total')} published); spooler RSS "
            f"{baseline} KiB after start, peak {peak} KiB, "
            f"+{(peak - baseline) / 1024:.1f} MiB"
        )
        assert_exactly(stored, pipe.expected())
        assert state["published_total"] > PACKET_IDS
        assert peak - baseline < RSS_GROWTH_MAX_KIB
    finally:
        pipe.close()

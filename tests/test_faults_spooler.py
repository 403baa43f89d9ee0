"""Fault: the spooler killed at any moment while records flow.

SIGKILL lands during spool intake (a claim half done), during publishing
(paho's queue lost) or during receipt handling (a receipt applied in memory
but its segments not yet deleted). Each restart works from the outbox on
disk: every accepted record is stored once, none is lost, no seq is reused.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from tests.harness.daemons import stored_payloads
from tests.harness.pipeline import (
    PROTOCOLS,
    Pipeline,
    assert_exactly,
    wait_for,
)

pytestmark = pytest.mark.integration

FILES = 1500
KILLS = 6
EDGE = {
    "publish": {
        "window": 200,
        "batch_records": 50,
        "resend_initial": 2,
        "resend_max": 5,
    },
    # Small intake transactions, so a kill often lands inside one.
    "intake": {"batch_files": 100, "scan_interval": 0.1},
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: f"mqtt{p}")
def test_a_spooler_killed_during_intake_publishing_and_receipts_stores_each_record_once(
    tmp_path, broker, daemons, protocol
):
    pipe = Pipeline(tmp_path, broker, daemons, protocol)
    edge = pipe.add_edge("e1", **EDGE)
    rng = random.Random(4711)
    try:
        pipe.start_collector()
        edge.spooler.start()
        kills = []
        per_round = FILES // KILLS
        for k in range(KILLS):
            # Files and API records land while the spooler is down; it is
            # killed right after its start (intake under way) or a little
            # later (publishing and receipts under way), at seeded moments.
            edge.spooler.kill()
            first = k * per_round
            edge.write_spool_files(
                ({"file": i} for i in range(first, first + per_round)), prefix=f"r{k}-"
            )
            edge.send({"api": k, "i": i} for i in range(300))
            starts = edge.spooler.log_text().count(" started: outbox")
            edge.spooler.start()
            wait_for(
                lambda n=starts: edge.spooler.log_text().count(" started: outbox") > n,
                15,
                edge.spooler.log_tail,
                interval=0.01,
            )
            at = rng.uniform(0.0, 0.15) if k % 2 == 0 else rng.uniform(0.3, 1.2)
            time.sleep(at)
            kills.append((round(at, 2), edge.spool_files_left(), len(pipe.stored())))
        edge.spooler.kill()
        edge.spooler.start()

        wait_for(lambda: edge.spool_files_left() == 0, 30, edge.spooler.log_tail)
        issued = edge.issued_ids()
        assert len(issued) == FILES + KILLS * 300
        assert edge.sent <= issued
        stored = pipe.wait_stored(issued, timeout=60)
        pipe.wait_outboxes_empty()
        assert_exactly(stored, issued)
        files = Counter(
            p["file"] for p in stored_payloads(pipe.db, "e1") if "file" in p
        )
        assert files == Counter(range(FILES))
        print(f"\n[{protocol}] kills at (s after start, files left, stored): {kills}")
    finally:
        pipe.close()

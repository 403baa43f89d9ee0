"""Three collectors in one share group, on one PostgreSQL, one of them killed.

Real Mosquitto, three real `core-collector run` processes with stable client
ids and persistent sessions, three real spoolers fed continuously. Mosquitto
2.0.11 keeps handing a share of the traffic to a member that is gone but
whose session lives, and gives its unacked messages back only to that same
client id: a member restarted under its id gets them back; for one that
never returns, the edges' resends are what deliver them (DESIGN.md, Known
traps). Either way PostgreSQL must end with every record exactly once and
every outbox empty, whichever collector committed a record.
"""

from __future__ import annotations

import threading
import time
from typing import Self

import pytest

from tests.harness.daemons import wait_until, write_core_config
from tests.harness.pipeline import Pipeline, assert_exactly, wait_for
from tests.harness.stores import postgres_stored_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDGES = ("sg-e1", "sg-e2", "sg-e3")
COLLECTORS = ("core-a", "core-b", "core-c")
GROUP = "collectors"
# Short resend timers, so that the never-restarted case heals within the test.
RESEND = {"resend_initial": 2.0, "resend_max": 8.0}
# Longer than the test: the dead member's session outlives it, as the trap
# needs, so its share is recovered by resends and not by expiry.
SESSION_EXPIRY_S = 3600
SEND_EVERY_S = 0.1
PER_SEND = 20
BEFORE_KILL_S = 3.0
AFTER_KILL_S = 4.0
AFTER_RESTART_S = 3.0
HEAL_TIMEOUT_S = 120.0


class Feeder:
    """Sends PER_SEND records to every edge each SEND_EVERY_S, in a thread."""

    def __init__(self, edges):
        self.edges = edges
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # a bound, whatever the test does
        try:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                for edge in self.edges:
                    edge.send({"n": i} for i in range(PER_SEND))
                self.stop_event.wait(SEND_EVERY_S)
        except Exception as exc:  # noqa: BLE001 - stop() raises it in the test
            self.error = exc

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the feeder did not stop"
        if self.error:
            raise self.error

    def __exit__(self, *exc) -> None:
        self.stop()


def start_collectors(tmp_path, broker, daemons, url):
    collectors = []
    for client_id in COLLECTORS:
        config = write_core_config(
            tmp_path / f"{client_id}.yaml",
            port=broker.port,
            db_url=url,
            client_id=client_id,
            share_group=GROUP,
            broker={"session_expiry": SESSION_EXPIRY_S},
        )
        collector = daemons.collector(config, tmp_path, name=client_id)
        collector.start()
        collectors.append(collector)
    for collector in collectors:
        wait_until(
            lambda c=collector: "subscribed to" in c.log_text(),
            30,
            message=f"{collector.name} did not subscribe",
        )
    return collectors


@pytest.mark.parametrize("restarted", [True, False], ids=["restarted", "gone"])
def test_a_killed_member_loses_no_record_and_doubles_none(
    restarted, broker, postgres_url, daemons, tmp_path
):
    collectors = start_collectors(tmp_path, broker, daemons, postgres_url)
    pipeline = Pipeline(tmp_path, broker, daemons, "5")
    edges = [pipeline.add_edge(edge_id, publish=RESEND) for edge_id in EDGES]
    for edge in edges:
        edge.spooler.start()
        edge.wait_connected()
    victim = collectors[0]

    with Feeder(edges) as feeder:
        time.sleep(BEFORE_KILL_S)
        victim.kill()
        killed_at = time.monotonic()
        time.sleep(AFTER_KILL_S)
        if restarted:
            victim.start()
            time.sleep(AFTER_RESTART_S)
        feeder.stop()
    sent_at = time.monotonic()

    expected = pipeline.expected()
    wait_for(
        lambda: set(postgres_stored_ids(postgres_url)) >= expected,
        HEAL_TIMEOUT_S,
        lambda: f"not every record stored\n{pipeline.tails()}",
    )
    healed_at = time.monotonic()
    pipeline.wait_outboxes_empty(timeout=HEAL_TIMEOUT_S)
    emptied_at = time.monotonic()

    assert_exactly(postgres_stored_ids(postgres_url), expected)
    committed_by = {c.name: c.log_text().count("committed") for c in collectors}
    print(
        f"\nshare group, member {'restarted' if restarted else 'gone'}: "
        f"{len(expected)} records; all stored {healed_at - sent_at:.1f} s after "
        f"the last send ({healed_at - killed_at:.1f} s after the kill), outboxes "
        f"empty {emptied_at - sent_at:.1f} s after the last send; "
        f"resend {RESEND}, session expiry {SESSION_EXPIRY_S} s"
    )
    survivors = collectors if restarted else collectors[1:]
    assert all(c.running for c in survivors), committed_by

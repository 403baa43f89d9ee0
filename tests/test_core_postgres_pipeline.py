"""A real collector on PostgreSQL: every id once in the database, confirmed.

A real Mosquitto, a real `core-collector run` process whose datastore is a
database of the test's own, and an edge played by a plain MQTT client that
publishes batches (one of them twice) and reads its receipts.
"""

from __future__ import annotations

import collections

import psycopg
import pytest

from common.envelope import WireRecord, decode_receipt, encode_batch
from tests.harness.client import ProbeClient
from tests.harness.daemons import wait_until, write_core_config
from tests.harness.stores import postgres_stored_ids

pytestmark = pytest.mark.integration

EDGE = "pg-edge-1"
EPOCH = "ep-pg"
BATCHES = 4
PER_BATCH = 50
REFUSED_SEQ = 77  # its payload holds \u0000, which jsonb refuses
WAIT_S = 30.0


def batch(first: int) -> bytes:
    records = [
        WireRecord(
            seq,
            1714564800.0 + seq,
            False,
            '{"s":"a\\u0000b"}' if seq == REFUSED_SEQ else f'{{"n":{seq}}}',
        )
        for seq in range(first, first + PER_BATCH)
    ]
    return encode_batch(EDGE, EPOCH, "readings", records)


def confirmed(edge: ProbeClient) -> set[int]:
    seqs: set[int] = set()
    for message in edge.wait_for_messages(0, timeout=0):
        for first, last in decode_receipt(message.payload).get(EPOCH, []):
            seqs.update(range(first, last + 1))
    return seqs


def test_published_records_are_in_postgresql_once_and_confirmed(
    broker, postgres_url, daemons, tmp_path
):
    config = write_core_config(
        tmp_path / "core.yaml", port=broker.port, db_url=postgres_url
    )
    collector = daemons.collector(config, tmp_path)
    collector.start()
    wait_until(
        lambda: "subscribed to" in collector.log_text(),
        WAIT_S,
        message=f"the collector did not subscribe:\n{collector.log_tail()}",
    )
    every = set(range(1, BATCHES * PER_BATCH + 1))

    with ProbeClient(broker.port, f"{EDGE}-probe", clean=True) as edge:
        edge.subscribe(f"spoolmq/{EDGE}/receipt")
        for first in range(1, BATCHES * PER_BATCH, PER_BATCH):
            edge.publish(f"spoolmq/{EDGE}/data/readings", batch(first))
        edge.publish(f"spoolmq/{EDGE}/data/readings", batch(1))  # a redelivery

        expected = collections.Counter(
            (EDGE, EPOCH, seq) for seq in every - {REFUSED_SEQ}
        )
        wait_until(
            lambda: postgres_stored_ids(postgres_url) == expected,
            WAIT_S,
            message=f"records missing or doubled:\n{collector.log_tail()}",
        )
        wait_until(
            lambda: confirmed(edge) == every,
            WAIT_S,
            message="not every id was confirmed",
        )

    with psycopg.connect(postgres_url) as conn:
        letters = conn.execute("SELECT seq, reason FROM dead_letters").fetchall()
        n = conn.execute(
            "SELECT payload->>'n' FROM records WHERE seq = %s", [PER_BATCH]
        ).fetchone()
        summary = conn.execute("SELECT records, dead_letters FROM edges").fetchall()
    assert [seq for seq, _ in letters] == [REFUSED_SEQ]
    assert "jsonb" in letters[0][1]
    assert n == (str(PER_BATCH),)
    assert summary == [(len(every) - 1, 1)]

    collector.stop()
    assert collector.returncode == 0, collector.log_tail()

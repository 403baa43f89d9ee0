"""The edge acts on each MQTT 5 PUBACK and DISCONNECT reason code as
``edge/reasons.py`` says, against a real Mosquitto wherever it sends the code
and against a fake broker for the codes Mosquitto cannot be made to send."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest

from common.envelope import decode_batch
from edge.api import Producer
from edge.reasons import (
    CONFIG_PAUSE_S,
    DISCONNECT,
    PUBACK,
    WAIT_PAUSE_S,
    Action,
    Pause,
    again,
    disconnect_reason,
    puback_reason,
)
from edge.window import Chunk
from tests.harness.daemons import (
    stored_ids,
    wait_until,
    write_core_config,
    write_edge_config,
)
from tests.harness.fake_broker import Disconnect, FakeBroker

OPEN_ACL = "topic readwrite spoolmq/#\n"
# Anonymous clients may do everything but publish record batches.
DATA_DENIED_ACL = """\
topic read spoolmq/+/data/#
topic readwrite spoolmq/+/receipt
topic readwrite spoolmq/+/skipped
topic readwrite spoolmq/+/status
topic readwrite spoolmq/_core/#
"""


def rows(path, sql):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def edge_config(tmp_path, port, **overrides):
    return write_edge_config(
        tmp_path / "edge.yaml",
        edge_id="e1",
        port=port,
        outbox=tmp_path / "outbox.db",
        spools=[],
        **overrides,
    )


def core_config(tmp_path, port):
    db = tmp_path / "core.db"
    path = write_core_config(
        tmp_path / "core.yaml", port=port, db_url=f"sqlite:///{db}"
    )
    return path, db


def seqs_in(published) -> list[int]:
    return [r["seq"] for p in published for r in decode_batch(p.payload).records]


def exactly(ids) -> dict:
    return {(i.edge_id, i.epoch, i.seq): 1 for i in ids}


# --- the table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (0x00, Action.OK),
        (0x10, Action.UNROUTED),
        (0x80, Action.WAIT),
        (0x83, Action.WAIT),
        (0x86, Action.CONFIG),
        (0x87, Action.CONFIG),
        (0x89, Action.WAIT),
        (0x8C, Action.CONFIG),
        (0x90, Action.DEAD_LETTER),
        (0x91, Action.WAIT),
        (0x95, Action.SPLIT),
        (0x97, Action.WAIT),
        (0x99, Action.DEAD_LETTER),
    ],
)
def test_each_puback_code_maps_to_its_action(code, action):
    assert puback_reason(code).action is action
    assert PUBACK[code].code == code


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (0x00, Action.OK),
        (0x04, Action.OK),
        (0x80, Action.OK),
        (0x82, Action.OK),
        (0x8B, Action.OK),
        (0x8D, Action.OK),
        (0x86, Action.CONFIG),
        (0x87, Action.CONFIG),
        (0x8C, Action.CONFIG),
        (0x8E, Action.CONFIG),
        (0x89, Action.WAIT),
        (0x97, Action.WAIT),
        (0x9F, Action.WAIT),
        (0x95, Action.SPLIT),
        (0x81, Action.OK),
        (0x83, Action.OK),
    ],
)
def test_each_disconnect_code_maps_to_its_action(code, action):
    assert disconnect_reason(code).action is action
    assert DISCONNECT[code].code == code


def test_unknown_codes_below_0x80_are_successes_and_above_mean_wait():
    assert puback_reason(0x01).action is Action.OK
    assert puback_reason(0xA2).action is Action.WAIT
    assert disconnect_reason(0xA2).action is Action.WAIT
    assert Action.DEAD_LETTER not in {puback_reason(c).action for c in range(0x9A, 256)}


def test_a_paho_reason_code_or_error_code_is_looked_up_by_its_number():
    assert puback_reason(SimpleNamespace(value=0x97)).action is Action.WAIT
    assert disconnect_reason(7).action is Action.OK  # MQTT_ERR_CONN_LOST


def test_pauses_double_per_refusal_up_to_their_cap_and_one_spell_counts_once():
    pause = Pause()
    assert pause.start(Action.WAIT, 0.0) == WAIT_PAUSE_S[0]
    assert pause.start(Action.WAIT, 0.5) == pytest.approx(0.5)  # same spell
    delays = [pause.start(Action.WAIT, t * 1000.0) for t in range(1, 12)]
    assert delays[0] == 2 * WAIT_PAUSE_S[0] and delays[-1] == WAIT_PAUSE_S[1]
    pause.reset()
    assert pause.start(Action.CONFIG, 1e6) == CONFIG_PAUSE_S[0]


def test_a_chunk_sent_again_is_a_resend_of_its_unconfirmed_records_only():
    seg = SimpleNamespace(unconfirmed={1, 2})
    chunk = Chunk("ep", "s", [(seg, [0, 1, 2])], 0)
    resend = again(chunk, 5.0)
    assert resend.pieces == [(seg, [1, 2])]
    assert (resend.attempt, resend.since) == (1, 5.0)
    seg.unconfirmed.clear()
    assert again(chunk, 6.0) is None


# --- real Mosquitto ----------------------------------------------------------


@pytest.mark.integration
def test_an_acl_that_denies_the_data_topic_keeps_the_records_until_it_is_fixed(
    tmp_path, broker_factory, daemons
):
    broker = broker_factory(start=False)
    broker.settings.update(
        allow_anonymous=True, acl_file=broker.write_file("acl", DATA_DENIED_ACL)
    )
    broker.start()
    edge_yaml = edge_config(tmp_path, broker.port)
    with Producer(str(edge_yaml)) as producer:
        ids = producer.send_many("s", [{"n": i} for i in range(20)])
    core_yaml, db = core_config(tmp_path, broker.port)
    daemons.collector(core_yaml, tmp_path).start()
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()

    wait_until(
        lambda: "Not authorized" in spooler.log_text(), 20, message=spooler.log_tail()
    )
    assert (
        "check that the ACL lets user e1 write spoolmq/e1/data/s" in spooler.log_text()
    )
    assert rows(tmp_path / "outbox.db", "SELECT count(*) FROM dead_letters") == [(0,)]
    assert stored_ids(db) == {}

    broker.write_file("acl", OPEN_ACL)
    broker.restart()
    wait_until(lambda: stored_ids(db) == exactly(ids), 60, message=spooler.log_tail())
    wait_until(
        lambda: rows(tmp_path / "outbox.db", "SELECT count(*) FROM segments") == [(0,)],
        30,
    )
    assert stored_ids(db) == exactly(ids)


@pytest.mark.integration
def test_batches_with_no_collector_subscribed_warn_once_and_wait_for_one(
    tmp_path, broker, daemons
):
    edge_yaml = edge_config(
        tmp_path, broker.port, publish={"batch_records": 5, "window": 50}
    )
    with Producer(str(edge_yaml)) as producer:
        ids = producer.send_many("s", [{"n": i} for i in range(30)])
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()

    warning = "no subscription matched"
    wait_until(lambda: warning in spooler.log_text(), 20, message=spooler.log_tail())
    wait_until(lambda: spooler.log_text().count("connected to") >= 1, 5)
    assert spooler.log_text().count(warning) == 1
    assert rows(tmp_path / "outbox.db", "SELECT count(*) FROM dead_letters") == [(0,)]
    assert rows(tmp_path / "outbox.db", "SELECT sum(count) FROM segments") == [(30,)]

    core_yaml, db = core_config(tmp_path, broker.port)
    daemons.collector(core_yaml, tmp_path).start()
    wait_until(lambda: stored_ids(db) == exactly(ids), 60, message=spooler.log_tail())


@pytest.mark.integration
def test_a_broker_max_packet_size_splits_batches_and_dead_letters_one_too_large(
    tmp_path, broker_factory, daemons
):
    # Mosquitto 2.0.11 announces max_packet_size in its CONNACK (and drops a
    # client sending more with DISCONNECT 0x95): the edge fits under it.
    broker = broker_factory(max_packet_size=4096)
    edge_yaml = edge_config(tmp_path, broker.port)
    with Producer(str(edge_yaml)) as producer:
        small = producer.send_many(
            "s", [{"blob": "x" * 300, "n": i} for i in range(40)]
        )
        (big,) = producer.send_many("s", [{"blob": "y" * 6000}])
    core_yaml, db = core_config(tmp_path, broker.port)
    daemons.collector(core_yaml, tmp_path).start()
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()

    wait_until(lambda: stored_ids(db) == exactly(small), 60, message=spooler.log_tail())
    wait_until(
        lambda: rows(tmp_path / "outbox.db", "SELECT count(*) FROM segments") == [(0,)],
        30,
    )
    assert rows(tmp_path / "outbox.db", "SELECT seq FROM dead_letters") == [(big.seq,)]
    assert "oversize packet" not in broker.log_text()


# --- the fake broker, for the codes Mosquitto never sends ----------------------


def data_answer(code):
    """Answer `code` to every record batch, success to everything else."""
    return lambda topic, payload: code if "/data/" in topic else 0


@pytest.mark.integration
@pytest.mark.parametrize("code", [0x99, 0x90])
def test_a_batch_the_broker_can_never_take_is_dead_lettered_and_reported_skipped(
    tmp_path, daemons, code
):
    with FakeBroker(data_answer(code)) as fake:
        edge_yaml = edge_config(tmp_path, fake.port)
        with Producer(str(edge_yaml)) as producer:
            ids = producer.send_many("s", [{"n": i} for i in range(5)])
        spooler = daemons.spooler(edge_yaml, tmp_path)
        spooler.start()

        outbox = tmp_path / "outbox.db"
        wait_until(
            lambda: len(rows(outbox, "SELECT seq FROM dead_letters")) == 5,
            20,
            message=spooler.log_tail(),
        )
        wait_until(lambda: fake.on("/skipped"), 10, message=spooler.log_tail())
        wait_until(lambda: rows(outbox, "SELECT count(*) FROM segments") == [(0,)], 10)
        spooler.stop()
    assert sorted(rows(outbox, "SELECT seq FROM dead_letters")) == [
        (i.seq,) for i in ids
    ]
    assert rows(outbox, "SELECT first_seq, last_seq FROM skipped") == [
        (ids[0].seq, ids[-1].seq)
    ]


@pytest.mark.integration
@pytest.mark.parametrize("code", [0x97, 0x80, 0x83, 0x91])
def test_a_batch_refused_for_now_stays_in_the_outbox_and_is_published_again(
    tmp_path, daemons, code
):
    refused = []

    def answer(topic, payload):
        if "/data/" not in topic or refused:
            return 0
        refused.append(payload)
        return code

    with FakeBroker(answer) as fake:
        edge_yaml = edge_config(tmp_path, fake.port)
        with Producer(str(edge_yaml)) as producer:
            ids = producer.send_many("s", [{"n": i} for i in range(5)])
        spooler = daemons.spooler(edge_yaml, tmp_path)
        spooler.start()

        wait_until(lambda: len(fake.on("/data/")) >= 2, 20, message=spooler.log_tail())
        spooler.stop()
        first, second = fake.on("/data/")[:2]
    assert (first.answer, second.answer) == (code, 0)
    assert seqs_in([second]) == seqs_in([first]) == [i.seq for i in ids]
    assert "publishing paused" in spooler.log_text()
    outbox = tmp_path / "outbox.db"
    assert rows(outbox, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert rows(outbox, "SELECT sum(count) FROM segments") == [(5,)]


@pytest.mark.integration
def test_a_disconnect_for_a_packet_too_large_splits_until_each_message_fits(
    tmp_path, daemons
):
    limit = 3000

    def answer(topic, payload):
        return Disconnect(0x95) if len(payload) > limit else 0

    with FakeBroker(answer) as fake:
        edge_yaml = edge_config(tmp_path, fake.port)
        with Producer(str(edge_yaml)) as producer:
            small = producer.send_many(
                "s", [{"blob": "x" * 200, "n": i} for i in range(30)]
            )
            (big,) = producer.send_many("s", [{"blob": "y" * 4000}])
        spooler = daemons.spooler(edge_yaml, tmp_path)
        spooler.start()

        outbox = tmp_path / "outbox.db"
        wait_until(
            lambda: rows(outbox, "SELECT seq FROM dead_letters"),
            30,
            message=spooler.log_tail(),
        )
        wait_until(
            lambda: (
                {i.seq for i in small}
                <= set(seqs_in(p for p in fake.on("/data/") if p.answer == 0))
            ),
            30,
            message=spooler.log_tail(),
        )
        spooler.stop()
    accepted = [p for p in fake.on("/data/") if p.answer == 0]
    assert all(len(p.payload) <= limit for p in accepted)
    assert big.seq not in seqs_in(accepted)
    assert rows(outbox, "SELECT seq FROM dead_letters") == [(big.seq,)]


@pytest.mark.integration
@pytest.mark.parametrize("code", [0x97, 0x89])
def test_a_disconnect_for_quota_or_a_busy_server_reconnects_later_than_usual(
    tmp_path, daemons, code
):
    answers = iter([Disconnect(code)])

    def answer(topic, payload):
        return next(answers, 0) if "/data/" in topic else 0

    with FakeBroker(answer) as fake:
        edge_yaml = edge_config(tmp_path, fake.port)
        with Producer(str(edge_yaml)) as producer:
            ids = producer.send_many("s", [{"n": i} for i in range(5)])
        spooler = daemons.spooler(edge_yaml, tmp_path)
        spooler.start()

        wait_until(lambda: len(fake.on("/data/")) >= 2, 20, message=spooler.log_tail())
        spooler.stop()
        gap = fake.connects[1] - fake.connects[0]
    # The test config's ordinary reconnect delay is 0.2 s (plus jitter).
    assert gap >= WAIT_PAUSE_S[0] * 0.9
    assert seqs_in(fake.on("/data/")[1:2]) == [i.seq for i in ids]

"""The bad-input corpus (tests/corpus/cases.yaml) against real processes: a
real spooler daemon, real `send` processes, a real Mosquitto and collector.
Every bad input gets its expected outcome, and good input beside it flows."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from common.envelope import WireRecord, encode_batch
from tests.harness.daemons import stored_ids, wait_until, write_core_config
from tests.harness.daemons import write_edge_config

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).parent / "corpus"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
MAX_FILE = 65536
MAX_MESSAGE = 32768


def test_the_corpus_holds_at_least_40_bad_inputs():
    count = sum(len(CASES[k]) for k in ("spool", "special", "send", "core"))
    assert count >= 40, count


def make_special(spool: Path, name: str) -> None:
    target = spool / name
    if name == "symlink.json":
        real = spool.parent / "real.json"
        real.write_text('{"a": 1}')
        target.symlink_to(real)
    elif name == "dangling_symlink.json":
        target.symlink_to(spool.parent / "nowhere.json")
    elif name == "fifo.json":
        os.mkfifo(target)
    elif name == "directory.json":
        target.mkdir()
    elif name == "over_max_file_bytes.json":
        target.write_text(json.dumps({"pad": "x" * MAX_FILE}))
    elif name == "record_over_broker_limit.jsonl":
        target.write_text('{"ok": 1}\n' + json.dumps({"pad": "y" * MAX_MESSAGE}))
    else:
        raise AssertionError(f"no recipe for {name}")


def test_every_bad_spool_file_is_quarantined_with_its_reason_and_good_ones_flow(
        tmp_path, broker, daemons):
    spool, db = tmp_path / "spool", tmp_path / "core.db"
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
        outbox=tmp_path / "o.db", spools=[(spool, "s")],
        broker={"max_message_bytes": MAX_MESSAGE})
    data = yaml.safe_load(edge_yaml.read_text())
    data["spool"][0]["max_file_bytes"] = MAX_FILE
    edge_yaml.write_text(yaml.safe_dump(data))
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    daemons.collector(core, tmp_path).start()
    spooler = daemons.spooler(edge_yaml, tmp_path)
    spooler.start()
    wait_until(lambda: (spool / ".failed").is_dir(), 20)

    for name in CASES["spool"]:
        (spool / name).write_bytes((CORPUS / "spool" / name).read_bytes())
    for name in CASES["special"]:
        make_special(spool, name)
    for i in range(5):
        (spool / f"good{i}.json").write_text(json.dumps({"good": i}))

    expected = {**CASES["spool"], **CASES["special"]}
    failed = spool / ".failed"
    def waiting() -> list[str]:
        return [n for n in expected if not (failed / f"{n}.reason").exists()]

    wait_until(lambda: not waiting(), 30, message=f"not quarantined: {waiting()}")
    for name, text in expected.items():
        reason = (failed / f"{name}.reason").read_text()
        assert text in reason, f"{name}: {reason!r}"
    wait_until(lambda: len(stored_ids(db)) == 5, 30, message=spooler.log_tail())
    assert spooler.running
    assert sorted(p.name for p in spool.iterdir() if not p.name.startswith(".")) \
        == []


@pytest.mark.parametrize("case", CASES["send"], ids=lambda c: " ".join(c["args"])[:40])
def test_send_refuses_bad_input_with_its_exit_code_and_accepts_nothing(
        tmp_path, case):
    edge_yaml = write_edge_config(
        tmp_path / "edge.yaml", edge_id="e1", port=1, outbox=tmp_path / "o.db",
        spools=[], broker={"max_message_bytes": MAX_MESSAGE})
    args = [a if a != "BIG" else json.dumps("z" * MAX_MESSAGE) for a in case["args"]]

    done = subprocess.run([sys.executable, "-m", "edge", "send", "-c",
                           str(edge_yaml), *args], capture_output=True, text=True,
                          timeout=60)

    assert done.returncode == case["exit"], done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
    if (tmp_path / "o.db").exists():
        conn = sqlite3.connect(tmp_path / "o.db")
        assert conn.execute("SELECT count(*) FROM segments").fetchone() == (0,)


def test_every_bad_message_is_dead_lettered_at_the_core_and_the_rest_is_stored(
        tmp_path, broker, daemons):
    db = tmp_path / "core.db"
    core = write_core_config(tmp_path / "core.yaml", port=broker.port,
                             db_url=f"sqlite:///{db}")
    collector = daemons.collector(core, tmp_path)
    collector.start()
    wait_until(lambda: "subscribed" in collector.log_text(), 20)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="corpus-pub")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = []
        for name in CASES["core"]:
            topic = "spoolmq/e9/skipped" if name.startswith("skipped") else \
                "spoolmq/e9/data/s"
            infos.append(client.publish(topic, (CORPUS / "core" / name).read_bytes(),
                                        qos=1))
        good = [WireRecord(i, 1767225600.0, False, json.dumps({"n": i}))
                for i in range(1, 4)]
        bad_seq = '{"seq":0,"created_at":"2026-01-02T00:00:00Z","payload":1}'
        batch = encode_batch("e9", "c0", "s", good)
        batch = batch.replace(b'"records":[', b'"records":[' + bad_seq.encode() + b",")
        infos.append(client.publish("spoolmq/e9/data/s", batch, qos=1))
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()

    wait_until(lambda: len(stored_ids(db)) == 3, 30, message=collector.log_tail())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letters")]
    for name, text in CASES["core"].items():
        assert any(text in r for r in reasons), f"{name}: no dead letter with {text!r}"
    assert any("positive integer" in r for r in reasons)
    assert len(reasons) == len(CASES["core"]) + 1
    assert collector.running

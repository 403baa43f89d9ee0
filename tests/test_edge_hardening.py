"""Inputs and situations that once stopped or fooled the edge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.config import mask_url
from edge.config import IntakeConfig, OutboxConfig, SpoolConfig
from edge.outbox import Outbox, SegmentRow, encode_body
from edge.outbox import Record as OutboxRecord
from edge.spool import SpoolIntake
from edge.window import Window
from tests.harness.daemons import Daemon, wait_until, write_edge_config


def edge(tmp_path, *args, data=None):
    cfg = write_edge_config(tmp_path / "edge.yaml", edge_id="e1", port=1,
                            outbox=tmp_path / "o.db", spools=[])
    return subprocess.run([sys.executable, "-m", "edge", *args, "-c", str(cfg)],
                          capture_output=True, text=True, input=data, timeout=60)


def intake_of(tmp_path, max_record_bytes=0):
    outbox = Outbox(tmp_path / "o.db", "e1")
    spool = tmp_path / "spool"
    intake = SpoolIntake(outbox, [SpoolConfig(str(spool), "s")], OutboxConfig(),
                         IntakeConfig(), None, max_record_bytes)
    intake.prepare()
    return outbox, spool, intake


@pytest.mark.parametrize("depth", [65, 900, 100_000])
def test_a_spool_file_nested_too_deeply_is_quarantined_and_the_rest_flows(
        tmp_path, depth):
    outbox, spool, intake = intake_of(tmp_path)
    (spool / "deep.json").write_text("[" * depth + "]" * depth)
    (spool / "good.json").write_text('{"ok": 1}')

    assert intake.scan() == 1

    reason = (spool / ".failed" / "deep.json.reason").read_text()
    assert "deeper than 64" in reason or "nested too deeply" in reason


def test_send_refuses_json_nested_too_deeply_with_65(tmp_path):
    done = edge(tmp_path, "send", "--stream", "s", "-", data="[" * 900 + "]" * 900)

    assert done.returncode == 65
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_spool_record_larger_than_the_broker_accepts_is_quarantined(tmp_path):
    outbox, spool, intake = intake_of(tmp_path, max_record_bytes=1000)
    (spool / "big.jsonl").write_text('{"n":1}\n' + json.dumps({"x": "y" * 2000}))

    assert intake.scan() == 0

    assert "line 2" in (spool / ".failed" / "big.jsonl.reason").read_text()
    assert outbox.totals() == (0, 0)


def test_a_second_daemon_on_the_same_outbox_exits_75(tmp_path):
    cfg = write_edge_config(tmp_path / "edge.yaml", edge_id="e1", port=1,
                            outbox=tmp_path / "o.db", spools=[(tmp_path / "sp", "s")])
    first = Daemon("first", [sys.executable, "-m", "edge", "run", "-c", str(cfg)],
                   tmp_path / "first.log")
    first.start()
    try:
        wait_until(lambda: "started" in first.log_text(), 15)
        second = subprocess.run(
            [sys.executable, "-m", "edge", "run", "-c", str(cfg)],
            capture_output=True, text=True, timeout=30)
        assert second.returncode == 75
        assert f"pid {first.pid}" in second.stderr
        assert first.running
    finally:
        first.kill()


def test_the_unconfirmed_age_counts_from_the_first_publication():
    w = Window(10, 5, 10**6, 0.0, 1.0, 4.0)
    body = encode_body([OutboxRecord("s", "1", 0.0)] * 5)
    w.add([SegmentRow(1, "ep", "s", 1, 5, 0.0, body)], now=0.0)
    w.mark_published(w.next_chunk(100.0), 100.0)

    for now in (101.0, 103.0, 107.0, 111.0):
        for chunk in w.due_resends(now):
            w.mark_published(chunk, now)

    assert w.oldest_unconfirmed_since() == 100.0


@pytest.mark.parametrize("url", ["postgresql://u:top/secret@h/db",
                                 "postgresql://u:p@ss@h/db"])
def test_a_password_holding_slash_or_at_is_masked_whole(url):
    masked = mask_url(url)

    assert "secret" not in masked and "ss@" not in masked
    assert masked.endswith("@h/db")


def test_a_key_given_twice_is_a_config_error_with_its_line(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("edge_id: e1\nbroker: {port: 1}\nbroker: {port: 2}\n")

    done = subprocess.run([sys.executable, "-m", "edge", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 78
    assert "line 3" in done.stderr and "given twice" in done.stderr


def test_a_factory_host_name_with_a_domain_is_refused(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("edge_id: raspberrypi.local\n")

    done = subprocess.run([sys.executable, "-m", "edge", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 78




def test_a_payload_holding_unicode_line_separators_survives_the_outbox(tmp_path):
    from edge.outbox import decode_body

    outbox = Outbox(tmp_path / "o.db", "e1")
    text = json.dumps({"t": "a\u2028b\u2029c\x85d"}, ensure_ascii=False)
    outbox.accept([OutboxRecord("s", text, 1767225600.0)] * 2)

    (row,) = outbox.segments_after(0, 10)

    assert [p for _, _, p in decode_body(row.body)] == [text, text]

"""The operator's tools: `edge-spooler dead-letters` and `edge-spooler quarantine`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from common.envelope import WireRecord
from edge.cli import build_parser
from edge.config import IntakeConfig, OutboxConfig, SpoolConfig
from edge.operator import (
    find_quarantined,
    list_dead_letters,
    requeue_dead_letters,
    requeue_name,
)
from edge.outbox import Outbox, Record, decode_body
from edge.spool import FAILED_DIR, SpoolIntake

EDGE = "pi-017"
SPOOLER = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "edge-spooler"

# --- fixtures ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def outbox_path(tmp_path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def spool_dirs(tmp_path) -> list[Path]:
    return [tmp_path / "spool" / "readings", tmp_path / "spool" / "events"]


@pytest.fixture
def spools(spool_dirs) -> list[SpoolConfig]:
    return [
        SpoolConfig(str(spool_dirs[0]), "readings"),
        SpoolConfig(str(spool_dirs[1]), "events"),
    ]


@pytest.fixture
def config(tmp_path, outbox_path, spools) -> Path:
    """An edge.yaml with two spool dirs and a broker port where nothing listens."""
    path = tmp_path / "edge.yaml"
    lines = [f"  - {{dir: '{s.dir}', stream: {s.stream}}}" for s in spools]
    path.write_text(
        f"edge_id: {EDGE}\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}}}\n"
        f"outbox: {{path: '{outbox_path}', segment_records: 2}}\n"
        "spool:\n" + "\n".join(lines) + "\n"
    )
    return path


@pytest.fixture
def run(tmp_path, config):
    """Run edge-spooler with -c config; never waits long."""

    def run_it(*args: str):
        environ = {k: v for k, v in os.environ.items() if k != "SPOOLMQ_EDGE_CONFIG"}
        result = subprocess.run(
            [str(SPOOLER), *args, "-c", str(config)],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result

    return run_it


@pytest.fixture
def dead(outbox_path):
    """An outbox with records 1-6 accepted; 2, 3 and 5 dead-lettered.

    Returns the outbox's epoch and seq -> payload of the dead letters.
    """
    box = Outbox(outbox_path, EDGE)
    batch = [
        Record("readings", json.dumps({"n": i}), 1767225600.0 + i) for i in range(1, 7)
    ]
    ids = box.accept(batch)
    letters = [
        WireRecord(i.seq, r.created_at, False, r.payload)
        for i, r in zip(ids, batch)
        if i.seq in (2, 3, 5)
    ]
    box.dead_letter(box.epoch, "readings", letters, "9999 bytes, over the limit")
    epoch = box.epoch
    box.close()
    return epoch, {w.seq: w.payload for w in letters}


def dead_rows(outbox_path: Path) -> list[tuple[int, int]]:
    """(id, seq) of every dead letter."""
    box = Outbox(outbox_path, EDGE)
    try:
        return [(d.id, d.seq) for d in list_dead_letters(box)]
    finally:
        box.close()


def segments(outbox_path: Path) -> list[tuple[str, str, int, int, list[str]]]:
    """(epoch, stream, first_seq, count, payloads) of every segment, by id."""
    box = Outbox(outbox_path, EDGE)
    try:
        return [
            (
                s.epoch,
                s.stream,
                s.first_seq,
                s.count,
                [p for _, _, p in decode_body(s.body)],
            )
            for s in box.segments_after(0, 10**9)
        ]
    finally:
        box.close()


def quarantine(outbox_path: Path, spool: SpoolConfig, files: dict[str, bytes]):
    """Have the real intake quarantine `files` (name -> bad contents)."""
    folder = Path(spool.dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, folder / name)
    box = Outbox(outbox_path, EDGE)
    intake = SpoolIntake(box, [spool], OutboxConfig(), IntakeConfig())
    intake.prepare()
    intake.scan()
    assert intake.quarantined == len(files)
    box.close()


def failed(spool: SpoolConfig) -> list[str]:
    folder = Path(spool.dir, FAILED_DIR)
    return sorted(os.listdir(folder)) if folder.exists() else []


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


# --- dead-letters list -------------------------------------------------------


def test_dead_letters_list_shows_each_with_its_record_reason_and_size(run, dead):
    epoch, _ = dead

    result = run("dead-letters", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "RECORD",
        "STREAM",
        "DEAD",
        "AT",
        "BYTES",
        "REASON",
    ]
    assert [line.split()[1] for line in lines[1:4]] == [
        f"{epoch}:2",
        f"{epoch}:3",
        f"{epoch}:5",
    ]
    assert all(
        "readings" in line and "9999 bytes, over the limit" in line
        for line in lines[1:4]
    )
    assert lines[-1] == "3 dead letters"


def test_dead_letters_list_json_parses_with_every_field(run, dead):
    epoch, payloads = dead

    result = run("dead-letters", "list", "--json")

    assert result.returncode == 0, result.stderr
    letters = json.loads(result.stdout)
    assert [(d["epoch"], d["seq"]) for d in letters] == [
        (epoch, 2),
        (epoch, 3),
        (epoch, 5),
    ]
    first = letters[0]
    assert first["record_id"] == f"{EDGE}:{epoch}:2"
    assert first["stream"] == "readings"
    assert first["reason"] == "9999 bytes, over the limit"
    assert first["payload_bytes"] == len(payloads[2])
    assert first["dead_at"].endswith("Z")
    assert isinstance(first["id"], int)


def test_dead_letters_list_of_an_outbox_without_any_says_0(run, outbox_path):
    Outbox(outbox_path, EDGE).close()

    text, as_json = run("dead-letters", "list"), run("dead-letters", "list", "--json")

    assert text.stdout == "0 dead letters\n"
    assert json.loads(as_json.stdout) == []


def test_dead_letters_without_an_outbox_exit_73(run, outbox_path):
    result = run("dead-letters", "list")

    assert_one_line_error(result, 73, str(outbox_path), "does not exist")
    assert not outbox_path.exists()


# --- dead-letters requeue ------------------------------------------------------


def test_requeue_puts_records_back_under_their_original_epoch_and_seq(
    run, dead, outbox_path
):
    epoch, payloads = dead
    before = segments(outbox_path)
    (two, _), (three, _) = dead_rows(outbox_path)[:2]

    result = run("dead-letters", "requeue", "--id", str(two), str(three))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("requeued 2 dead letters")
    added = segments(outbox_path)[len(before) :]
    assert added == [(epoch, "readings", 2, 2, [payloads[2], payloads[3]])]
    assert [seq for _, seq in dead_rows(outbox_path)] == [5]


def test_requeue_all_makes_a_segment_per_run_of_consecutive_seqs(
    run, dead, outbox_path
):
    epoch, payloads = dead
    before = len(segments(outbox_path))

    result = run("dead-letters", "requeue", "--all")

    assert result.returncode == 0, result.stderr
    assert "requeued 3 dead letters into the outbox (2 segments)" in result.stdout
    assert segments(outbox_path)[before:] == [
        (epoch, "readings", 2, 2, [payloads[2], payloads[3]]),
        (epoch, "readings", 5, 1, [payloads[5]]),
    ]
    assert dead_rows(outbox_path) == []


def test_requeue_keeps_segments_within_segment_records(dead, outbox_path):
    box = Outbox(outbox_path, EDGE)
    letters = [WireRecord(s, 1767225600.0, False, str(s)) for s in range(10, 15)]
    box.dead_letter(box.epoch, "readings", letters, "too big")

    records, made = requeue_dead_letters(box, None, segment_records=2)

    rows = box.conn.execute(
        "SELECT first_seq, count FROM segments WHERE first_seq >= 10 ORDER BY first_seq"
    ).fetchall()
    box.close()
    assert (records, made) == (8, 5)
    assert rows == [(10, 2), (12, 2), (14, 1)]


def test_requeued_records_keep_their_created_at_and_clock_flag(dead, outbox_path):
    box = Outbox(outbox_path, EDGE)
    box.dead_letter(box.epoch, "s", [WireRecord(20, 12.5, True, "[1]")], "why")

    requeue_dead_letters(box, [list_dead_letters(box)[-1].id])

    (row,) = box.conn.execute("SELECT body FROM segments WHERE first_seq = 20")
    box.close()
    assert list(decode_body(row[0])) == [(12.5, True, "[1]")]


def test_a_running_daemon_sees_requeued_segments_as_new(run, dead, outbox_path):
    daemon = Outbox(outbox_path, EDGE)  # the daemon's connection, kept open
    last_id = max(s.id for s in daemon.segments_after(0, 10**9))
    version = daemon.data_version()

    assert run("dead-letters", "requeue", "--all").returncode == 0

    assert daemon.data_version() != version
    fresh = daemon.segments_after(last_id, 10**9)
    daemon.close()
    assert [(s.first_seq, s.count) for s in fresh] == [(2, 2), (5, 1)]


# --- dead-letters purge ---------------------------------------------------------


def test_purge_by_id_removes_those_and_prints_how_many(run, dead, outbox_path):
    (first, _), *_ = dead_rows(outbox_path)

    result = run("dead-letters", "purge", "--id", str(first))

    assert result.returncode == 0, result.stderr
    assert result.stdout == "purged 1 dead letters\n"
    assert [seq for _, seq in dead_rows(outbox_path)] == [3, 5]


def test_purge_all_removes_every_one_and_no_segment(run, dead, outbox_path):
    before = segments(outbox_path)

    result = run("dead-letters", "purge", "--all")

    assert result.stdout == "purged 3 dead letters\n"
    assert dead_rows(outbox_path) == []
    assert segments(outbox_path) == before


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_an_unknown_dead_letter_id_exits_65_and_changes_nothing(
    run, dead, outbox_path, action
):
    before = (dead_rows(outbox_path), segments(outbox_path))
    known = before[0][0][0]

    result = run("dead-letters", action, "--id", str(known), "999")

    assert_one_line_error(result, 65, "no dead letter with id 999", "nothing")
    assert (dead_rows(outbox_path), segments(outbox_path)) == before


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters"],
        ["dead-letters", "list", "--yaml"],
        ["dead-letters", "requeue"],
        ["dead-letters", "requeue", "--all", "--id", "1"],
        ["dead-letters", "purge", "--id", "one"],
        ["dead-letters", "purge", "--id"],
        ["quarantine"],
        ["quarantine", "requeue"],
        ["quarantine", "purge", "--all", "a.json"],
        ["quarantine", "list", "a.json"],
    ],
)
def test_usage_errors_exit_64_with_one_line(run, outbox_path, args):
    result = run(*args)

    assert_one_line_error(result, 64, "--help")


# --- quarantine list ------------------------------------------------------------


def test_quarantine_list_shows_each_file_with_its_reason_and_size(
    run, outbox_path, spools
):
    quarantine(outbox_path, spools[0], {"bad.json": b'{"t": 21.5', "x.jsonl": b"{\n"})

    result = run("quarantine", "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    folder = Path(spools[0].dir, FAILED_DIR)
    assert lines[0].startswith(f"{folder / 'bad.json'}  (readings, 10 bytes): ")
    assert "bad.json is not valid JSON" in lines[0]
    assert lines[1].startswith(f"{folder / 'x.jsonl'}  (readings, 2 bytes): ")
    assert lines[-1] == "2 quarantined files"


def test_quarantine_list_json_parses_with_every_field(run, outbox_path, spools):
    quarantine(outbox_path, spools[1], {"e.json": b"NaN"})

    result = run("quarantine", "list", "--json")

    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)
    assert item["name"] == "e.json"
    assert item["path"] == str(Path(spools[1].dir, FAILED_DIR, "e.json"))
    assert (item["dir"], item["stream"], item["bytes"]) == (spools[1].dir, "events", 3)
    assert "NaN" in item["reason"]


def test_quarantine_list_with_nothing_quarantined_says_0(run):
    assert run("quarantine", "list").stdout == "0 quarantined files\n"
    assert json.loads(run("quarantine", "list", "--json").stdout) == []


# --- quarantine requeue and purge ----------------------------------------------


def test_requeue_moves_a_fixed_file_back_and_the_intake_takes_it(
    run, outbox_path, spools
):
    quarantine(outbox_path, spools[0], {"bad.json": b'{"t": 21.5'})
    Path(spools[0].dir, FAILED_DIR, "bad.json").write_bytes(b'{"t": 21.5}')

    result = run("quarantine", "requeue", "bad.json")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "requeued 1 quarantined files"
    assert failed(spools[0]) == []
    assert Path(spools[0].dir, "bad.json").read_bytes() == b'{"t": 21.5}'
    box = Outbox(outbox_path, EDGE)
    intake = SpoolIntake(box, spools[:1], OutboxConfig(), IntakeConfig())
    assert intake.scan() == 1
    box.close()


def test_requeue_never_overwrites_a_producers_new_file_of_that_name(
    run, outbox_path, spools
):
    quarantine(outbox_path, spools[0], {"r.json": b"{"})
    new = Path(spools[0].dir, "r.json")
    new.write_bytes(b'{"new": true}')

    result = run("quarantine", "requeue", "r.json")

    assert result.returncode == 0, result.stderr
    assert new.read_bytes() == b'{"new": true}'
    back = Path(spools[0].dir, "r.requeued-1.json")
    assert back.read_bytes() == b"{"
    assert f"-> {back}" in result.stdout


def test_a_file_quarantined_under_a_numbered_name_goes_back_under_its_own(
    run, outbox_path, spools
):
    quarantine(outbox_path, spools[0], {"r.json": b"{"})
    quarantine(outbox_path, spools[0], {"r.json": b"["})
    assert failed(spools[0]) == [
        "r.json",
        "r.json.1",
        "r.json.1.reason",
        "r.json.reason",
    ]
    assert requeue_name("r.json.1") == "r.json"

    result = run("quarantine", "requeue", "r.json.1")

    assert result.returncode == 0, result.stderr
    assert Path(spools[0].dir, "r.json").read_bytes() == b"["
    assert failed(spools[0]) == ["r.json", "r.json.reason"]


def test_requeue_all_moves_every_file_of_every_spool_dir(run, outbox_path, spools):
    quarantine(outbox_path, spools[0], {"a.json": b"{", "b.json": b"{"})
    quarantine(outbox_path, spools[1], {"c.json": b"{"})

    result = run("quarantine", "requeue", "--all")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "requeued 3 quarantined files"
    assert failed(spools[0]) == failed(spools[1]) == []
    assert sorted(os.listdir(spools[1].dir)) == [".failed", ".spoolmq", "c.json"]


def test_purge_deletes_the_file_and_its_reason(run, outbox_path, spools):
    quarantine(outbox_path, spools[0], {"a.json": b"{", "b.json": b"{"})

    result = run("quarantine", "purge", "a.json")

    assert result.stdout == "purged 1 quarantined files\n"
    assert failed(spools[0]) == ["b.json", "b.json.reason"]
    assert not Path(spools[0].dir, "a.json").exists()


def test_purge_all_prints_how_many(run, outbox_path, spools):
    quarantine(outbox_path, spools[0], {"a.json": b"{"})
    quarantine(outbox_path, spools[1], {"b.json": b"{", "c.jsonl": b"{"})

    result = run("quarantine", "purge", "--all")

    assert result.stdout == "purged 3 quarantined files\n"
    assert failed(spools[0]) == failed(spools[1]) == []


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_an_unknown_quarantined_name_exits_65_and_changes_nothing(
    run, outbox_path, spools, action
):
    quarantine(outbox_path, spools[0], {"a.json": b"{"})

    result = run("quarantine", action, "a.json", "absent.json")

    assert_one_line_error(result, 65, "no quarantined file absent.json")
    assert failed(spools[0]) == ["a.json", "a.json.reason"]


def test_a_name_in_two_spool_dirs_must_be_given_by_its_path(run, outbox_path, spools):
    quarantine(outbox_path, spools[0], {"a.json": b"{"})
    quarantine(outbox_path, spools[1], {"a.json": b"["})

    ambiguous = run("quarantine", "purge", "a.json")
    by_path = run("quarantine", "purge", str(Path(spools[1].dir, FAILED_DIR, "a.json")))

    assert_one_line_error(ambiguous, 64, "several spool dirs", "by its path")
    assert by_path.stdout == "purged 1 quarantined files\n"
    assert failed(spools[0]) == ["a.json", "a.json.reason"]
    assert failed(spools[1]) == []
    assert [q.name for q in find_quarantined(spools, ["a.json"])] == ["a.json"]


# --- help -------------------------------------------------------------------------


def operator_commands() -> dict[str, argparse.ArgumentParser]:
    """'dead-letters list' and the others, each with its parser."""
    out = {}
    for name in ("dead-letters", "quarantine"):
        group = _subparsers(build_parser())[name]
        out.update({f"{name} {a}": p for a, p in _subparsers(group).items()})
    return out


def _subparsers(parser) -> dict[str, argparse.ArgumentParser]:
    action = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    return dict(action.choices)


def test_there_are_six_operator_commands_each_with_a_help_line():
    assert set(operator_commands()) == {
        f"{group} {action}"
        for group in ("dead-letters", "quarantine")
        for action in ("list", "requeue", "purge")
    }
    for name in ("dead-letters", "quarantine"):
        group = _subparsers(build_parser())[name]
        action = next(
            a for a in group._actions if isinstance(a, argparse._SubParsersAction)
        )
        assert all(choice.help for choice in action._choices_actions)


@pytest.mark.parametrize("name", sorted(operator_commands()))
def test_every_option_of_every_operator_command_has_help_text(name):
    for action in operator_commands()[name]._actions:
        assert action.help, (name, action.option_strings or action.dest)


@pytest.mark.parametrize("name", ["dead-letters", "quarantine"])
def test_operator_help_exits_0_and_lists_its_actions(name):
    result = subprocess.run(
        [str(SPOOLER), name, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    for action in ("list", "requeue", "purge"):
        assert action in result.stdout

"""The `edge-spooler` command line: send, status, usage errors, help."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from edge.cli import build_parser
from edge.outbox import Outbox, decode_body

EDGE = "pi-017"
SPOOLER = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "edge-spooler"
ID_RE = re.compile(r"^pi-017:([0-9a-f]{16}):(\d+)$")

# --- fixtures ------------------------------------------------------------


def free_port() -> int:
    """A loopback port where nothing listens (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def outbox_path(tmp_path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def config(tmp_path, outbox_path) -> Path:
    """An edge.yaml whose broker port has nothing listening."""
    path = tmp_path / "edge.yaml"
    path.write_text(
        f"edge_id: {EDGE}\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}, max_message_bytes: 4096}}\n"
        f"outbox: {{path: '{outbox_path}'}}\n"
    )
    return path


@pytest.fixture
def run(tmp_path, config):
    """Run edge-spooler with -c config (unless config=None); never waits long."""

    def run_it(*args: str, stdin: bytes = b"", config_file=config, env=None):
        full = [str(SPOOLER), *args]
        if config_file is not None:
            full += ["-c", str(config_file)]
        environ = {k: v for k, v in os.environ.items() if k != "SPOOLMQ_EDGE_CONFIG"}
        environ.update(env or {})
        result = subprocess.run(
            full,
            input=stdin,
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            timeout=60,
        )
        result.stdout = result.stdout.decode()
        result.stderr = result.stderr.decode()
        return result

    return run_it


@pytest.fixture
def existing_outbox(outbox_path) -> Path:
    """The outbox as an edge in service has it: created, empty."""
    Outbox(outbox_path, EDGE).close()
    return outbox_path


def stored(outbox_path: Path) -> list[tuple[str, int, str]]:
    """(stream, seq, payload) of every record in the outbox, by seq."""
    box = Outbox(outbox_path, EDGE)
    try:
        out = []
        for seg in box.segments_after(0, 10**9):
            for i, (_, _, payload) in enumerate(decode_body(seg.body)):
                out.append((seg.stream, seg.first_seq + i, payload))
        return sorted(out, key=lambda r: r[1])
    finally:
        box.close()


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edge-spooler: ")
    for word in words:
        assert word in lines[0]


# --- send ----------------------------------------------------------------


def test_send_data_prints_the_id_and_accepts_the_record(run, outbox_path):
    result = run("send", "--stream", "readings", "--data", '{"t": 21.5}')

    assert result.returncode == 0, result.stderr
    match = ID_RE.match(result.stdout.strip())
    assert match and match.group(2) == "1"
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    assert stored(outbox_path) == [("readings", 1, '{"t":21.5}')]
    box = Outbox(outbox_path, EDGE)
    assert match.group(1) == box.epoch
    box.close()


def test_send_works_with_no_daemon_and_no_broker(run, outbox_path, config):
    assert "port:" in config.read_text()  # nothing listens there

    results = [run("send", "--stream", "s", "--data", str(i)) for i in range(3)]

    assert [r.returncode for r in results] == [0, 0, 0]
    assert [int(ID_RE.match(r.stdout.strip()).group(2)) for r in results] == [1, 2, 3]


def test_send_file_reads_one_value(run, outbox_path, tmp_path):
    source = tmp_path / "reading.json"
    source.write_text('{\n  "t": [1, 2]\n}\n')

    result = run("send", "--stream", "readings", "--file", str(source))

    assert result.returncode == 0, result.stderr
    assert stored(outbox_path) == [("readings", 1, '{"t":[1,2]}')]


def test_send_reads_standard_input_with_dash(run, outbox_path):
    result = run("send", "--stream", "readings", "-", stdin=b'{"from": "stdin"}\n')

    assert result.returncode == 0, result.stderr
    assert ID_RE.match(result.stdout.strip())
    assert stored(outbox_path) == [("readings", 1, '{"from":"stdin"}')]


def test_send_lines_accepts_one_record_per_line_and_prints_each_id(run, outbox_path):
    data = b'{"i": 1}\n\n{"i": 2}\n[3]\n'

    result = run("send", "--stream", "events", "--lines", "-", stdin=data)

    assert result.returncode == 0, result.stderr
    ids = result.stdout.splitlines()
    assert [int(ID_RE.match(i).group(2)) for i in ids] == [1, 2, 3]
    assert len({ID_RE.match(i).group(1) for i in ids}) == 1
    assert stored(outbox_path) == [
        ("events", 1, '{"i":1}'),
        ("events", 2, '{"i":2}'),
        ("events", 3, "[3]"),
    ]


def test_send_lines_from_a_file(run, outbox_path, tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text('{"a":1}\n{"a":2}\n')

    result = run("send", "--stream", "s", "--lines", "--file", str(source))

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_without_lines_a_multi_line_value_is_one_record(run, outbox_path):
    result = run("send", "--stream", "s", "-", stdin=b"[1,\n 2]\n")

    assert result.returncode == 0, result.stderr
    assert stored(outbox_path) == [("s", 1, "[1,2]")]


def test_the_environment_variable_stands_in_for_dash_c(run, config, outbox_path):
    result = run(
        "send",
        "--stream",
        "s",
        "--data",
        "1",
        config_file=None,
        env={"SPOOLMQ_EDGE_CONFIG": str(config)},
    )

    assert result.returncode == 0, result.stderr
    assert stored(outbox_path) == [("s", 1, "1")]


@pytest.mark.parametrize(
    "args, stdin, words",
    [
        (["--data", '{"t": 21.5'], b"", "--data is not valid JSON"),
        (["--data", "NaN"], b"", "NaN"),
        (["--data", "[1, Infinity]"], b"", "Infinity"),
        (["--data", "1e999"], b"", "Out of range"),
        (["--data", '"\\ud800"'], b"", "lone surrogate"),
        (["--data", ""], b"", "is empty"),
        (["-"], b'{"s": "\xff"}', "stdin is not valid UTF-8"),
        (["-"], b"", "stdin is empty"),
        (["--lines", "-"], b'{"a":1}\n{"a":\n', "stdin line 2 is not valid JSON"),
        (["--lines", "-"], b"\n\n", "holds no records"),
        (["--lines", "--data", '{"a":1} {"b":2}'], b"", "line 1"),
    ],
)
def test_invalid_json_exits_65_with_one_line(run, outbox_path, args, stdin, words):
    result = run("send", "--stream", "s", *args, stdin=stdin)

    assert_one_line_error(result, 65, words)
    assert result.stdout == ""


def test_a_bad_line_refuses_the_whole_input(run, outbox_path):
    result = run("send", "--stream", "s", "--lines", "-", stdin=b"1\n2\n{\n4\n")

    assert_one_line_error(result, 65, "line 3")
    assert not outbox_path.exists() or stored(outbox_path) == []


def test_a_missing_input_file_exits_65(run, tmp_path):
    result = run("send", "--stream", "s", "--file", str(tmp_path / "absent.json"))

    assert_one_line_error(result, 65, "absent.json")


def test_a_record_over_the_broker_limit_exits_65_and_nothing_is_sent(
    run, existing_outbox
):
    big = json.dumps({"blob": "x" * 5000})
    lines = ("1\n" + big + "\n2\n").encode()

    single = run("send", "--stream", "s", "--data", big)
    several = run("send", "--stream", "s", "--lines", "-", stdin=lines)

    assert_one_line_error(single, 65, "broker.max_message_bytes", "nothing was sent")
    assert_one_line_error(several, 65, "record 2 is")
    assert stored(existing_outbox) == []


def test_a_record_just_under_the_broker_limit_is_accepted(run, outbox_path):
    result = run("send", "--stream", "s", "--data", json.dumps("x" * 3000))

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("stream", ["a/b", "+", "#", "x" * 65, ".x", "a b"])
def test_an_invalid_stream_name_exits_65(run, existing_outbox, stream):
    result = run("send", "--stream", stream, "--data", "1")

    assert_one_line_error(result, 65, "stream")
    assert stored(existing_outbox) == []


def test_an_empty_stream_name_exits_65(run, existing_outbox):
    assert_one_line_error(run("send", "--stream", "", "--data", "1"), 65, "empty")


def test_send_with_a_config_naming_another_edge_exits_78(run, config, tmp_path):
    assert run("send", "--stream", "s", "--data", "1").returncode == 0
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace(EDGE, "pi-018"))

    result = run("send", "--stream", "s", "--data", "2", config_file=other)

    assert_one_line_error(result, 78, "pi-017", "pi-018")


def test_send_to_an_outbox_that_cannot_be_created_exits_73(run, tmp_path, config):
    (tmp_path / "afile").write_text("a regular file")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "afile"))
    )

    result = run("send", "--stream", "s", "--data", "1", config_file=bad)

    assert_one_line_error(result, 73, "afile")


def test_send_with_a_bad_config_exits_78(run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("edge_id: pi-017\nbrokr: {}\n")

    result = run("send", "--stream", "s", "--data", "1", config_file=bad)

    assert_one_line_error(result, 78, "brokr", "did you mean 'broker'")


# --- usage errors --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["launch"],
        ["send", "--data", "1"],
        ["send", "--stream", "s"],
        ["send", "--stream", "s", "--data", "1", "--file", "x"],
        ["send", "--stream", "s", "--data", "1", "-"],
        ["send", "--stream", "s", "--data"],
        ["send", "--stream", "s", "--data", "1", "--colour"],
        ["status", "--yaml"],
        ["check", "extra"],
        ["run", "--log-format", "xml"],
    ],
)
def test_usage_errors_exit_64_with_one_line(run, args):
    result = run(*args, config_file=None)

    assert result.returncode == 64, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "--help" in result.stderr


def test_version_exits_0(run):
    result = run("--version", config_file=None)

    assert result.returncode == 0
    assert "edge-spooler (spoolmq)" in result.stdout


# --- status --------------------------------------------------------------


def test_status_exits_75_when_the_daemon_is_down(run):
    assert run("send", "--stream", "s", "--lines", "-", stdin=b"1\n2\n").returncode == 0

    result = run("status")

    assert result.returncode == 75
    assert "not running" in result.stdout
    assert "degraded" in result.stdout


def test_status_json_parses_and_says_why_it_is_degraded(run):
    run("send", "--stream", "s", "--lines", "-", stdin=b"1\n2\n3\n")

    result = run("status", "--json")

    assert result.returncode == 75
    report = json.loads(result.stdout)
    assert report["edge_id"] == EDGE
    assert report["running"] is False
    assert report["connected"] is False
    assert report["healthy"] is False
    assert report["problems"] == ["daemon not running"]
    assert report["records_waiting"] == 3
    assert report["next_seq"] == 4
    assert report["dead_letters"] == 0
    assert report["oldest_waiting_age_s"] >= 0


def test_status_ignores_a_state_file_left_by_a_dead_daemon(run, outbox_path):
    run("send", "--stream", "s", "--data", "1")
    dead = subprocess.Popen(["true"])
    dead.wait(10)
    Path(f"{outbox_path}.status.json").write_text(
        json.dumps({"pid": dead.pid, "connected": True, "unconfirmed": 5})
    )

    result = run("status", "--json")

    assert result.returncode == 75
    report = json.loads(result.stdout)
    assert (report["running"], report["connected"], report["unconfirmed"]) == (
        False,
        False,
        0,
    )


# --- help ----------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    return dict(action.choices)


def test_every_subcommand_has_a_help_line():
    parser = build_parser()
    action = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )

    commands = {"run", "send", "status", "check", "dead-letters", "quarantine"}
    assert set(action.choices) == commands
    for choice in action._choices_actions:
        assert choice.help, choice.dest


@pytest.mark.parametrize("name", ["run", "send", "status", "check"])
def test_every_option_of_every_subcommand_has_help_text(name):
    for action in subcommands()[name]._actions:
        assert action.help, (name, action.option_strings)


@pytest.mark.parametrize("name", ["run", "send", "status", "check"])
def test_help_exits_0_and_mentions_each_option(run, name):
    result = run(name, "--help", config_file=None)

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in subcommands()[name]._actions:
        for option in action.option_strings:
            assert f" {option}" in text, option
        assert action.help[:24] in text, action.help


def test_top_level_help_lists_every_subcommand(run):
    result = run("--help", config_file=None)

    assert result.returncode == 0
    for name in ("run", "send", "status", "check"):
        assert name in result.stdout

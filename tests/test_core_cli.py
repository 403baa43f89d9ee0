"""The core-collector command line: help, exit codes, one-line failures."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from common import __version__
from core.cli import build_parser, main
from core.datastore import Record, open_datastore


@pytest.fixture(autouse=True)
def restore_logging():
    """main() points the root logger at the stderr of its test; undo that."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], root.level = saved


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.delenv("SPOOLMQ_CORE_CONFIG", raising=False)
    path = tmp_path / "core.yaml"
    path.write_text(
        f"datastore: {{url: 'sqlite:///{tmp_path}/core.db'}}\nclient_id: core-t\n"
    )
    return path


def stored(config_path, *seqs: int) -> None:
    url = f"sqlite:///{config_path.parent}/core.db"
    store = open_datastore(url)
    try:
        store.store(
            [
                Record("e1", "ep1", seq, "s", "2024-05-01T00:00:00.000Z", False, "{}")
                for seq in seqs
            ]
        )
    finally:
        store.close()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_every_command_and_option_has_help_text():
    parser = build_parser()
    (commands,) = [
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ]
    assert set(commands.choices) == {"run", "status", "gaps", "check"}
    for helped in [parser, *commands.choices.values()]:
        for action in helped._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{helped.prog} {action.option_strings}"
    for choice in commands._choices_actions:
        assert choice.help


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_a_usage_error_exits_64_with_one_line(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["status", "--bogus"])

    assert caught.value.code == 64
    assert "--bogus" in one_line(capsys.readouterr().err)


def test_no_command_exits_64(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])

    assert caught.value.code == 64
    one_line(capsys.readouterr().err)


def test_check_prints_the_effective_config(config, capsys):
    assert main(["check", "-c", str(config)]) == 0

    out = capsys.readouterr().out
    assert "client_id: core-t" in out
    assert "batch_records: 20000" in out


def test_options_may_come_before_or_after_the_command(config, capsys):
    assert main(["-c", str(config), "check"]) == 0
    assert main(["check", "--log-format", "json", "-c", str(config)]) == 0


def test_the_config_may_come_from_the_environment(config, monkeypatch, capsys):
    monkeypatch.setenv("SPOOLMQ_CORE_CONFIG", str(config))

    assert main(["check"]) == 0


def test_no_config_at_all_exits_78_naming_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("SPOOLMQ_CORE_CONFIG", raising=False)

    assert main(["check"]) == 78
    assert "SPOOLMQ_CORE_CONFIG" in one_line(capsys.readouterr().err)


def test_check_exits_78_naming_the_key_and_the_reason(config, capsys):
    config.write_text("share_group: g\n")

    assert main(["check", "-c", str(config)]) == 78
    line = one_line(capsys.readouterr().err)
    assert "client_id" in line and "share_group" in line


def test_a_malformed_postgresql_url_exits_78_with_its_password_masked(config, capsys):
    config.write_text("datastore: {url: 'postgresql://u:hunter2@db:port/core'}\n")

    assert main(["run", "-c", str(config)]) == 78
    line = one_line(capsys.readouterr().err)
    assert "datastore.url" in line and "hunter2" not in line


def test_run_exits_73_when_the_datastore_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path / "core.yaml"
    path.write_text(f"datastore: {{url: 'sqlite:///{tmp_path}/file/core.db'}}\n")

    assert main(["run", "-c", str(path)]) == 73
    assert "cannot create or write" in capsys.readouterr().err.splitlines()[-1]


def test_status_exits_69_when_the_datastore_cannot_be_opened(config, capsys):
    assert main(["status", "-c", str(config)]) == 69
    assert "does not exist" in one_line(capsys.readouterr().err)


def test_status_reports_each_edge_as_text(config, capsys):
    stored(config, 1, 2, 4)

    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 edges, 3 records, 0 dead letters" in out
    assert any(line.split()[:3] == ["e1", "3", "1"] for line in out.splitlines())


def test_status_json_is_machine_readable(config, capsys):
    stored(config, 1, 2)

    assert main(["status", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True
    assert report["totals"] == {"records": 2, "dead_letters": 0, "edges": 1}
    (edge,) = report["edges"]
    assert (edge["edge_id"], edge["records"], edge["missing"]) == ("e1", 2, 0)
    assert edge["lag_s"] is not None


def test_status_exits_75_when_an_edge_fell_silent(config, capsys):
    config.write_text(config.read_text() + "status: {silent_after: 1}\n")
    stored(config, 1)
    url = f"sqlite:///{config.parent}/core.db"
    store = open_datastore(url)
    store.db.execute("UPDATE edges SET last_seen = '2020-01-01T00:00:00.000Z'")
    store.close()

    assert main(["status", "-c", str(config)]) == 75
    assert "e1" in one_line(capsys.readouterr().err)


def test_gaps_of_an_edge_the_datastore_does_not_know_exits_65(config, capsys):
    stored(config, 1, 3)

    code = main(["gaps", "-c", str(config), "nosuch"])

    assert code == 65
    assert "no edge 'nosuch'" in one_line(capsys.readouterr().err)

"""The edge's config: edge.yaml keys, validation, and `edge-spooler check`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError
from edge.config import EdgeConfig, load_edge_config

# --- fixtures ------------------------------------------------------------


def free_port() -> int:
    """A loopback port where nothing listens (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def write_config(tmp_path):
    """Write an edge.yaml from text, with {tmp} standing for tmp_path."""

    def write(text: str, name: str = "edge.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
        return path

    return write


@pytest.fixture
def good_config(write_config) -> Path:
    return write_config(
        "edge_id: pi-017\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}, protocol: 5}}\n"
        "outbox: {path: '{tmp}/outbox.db'}\n"
        "spool:\n"
        "  - {dir: '{tmp}/spool/readings', stream: readings}\n"
    )


def spooler(*args: str, cwd: Path, env: dict | None = None):
    """Run the edge-spooler command line as a user would; never waits long."""
    full_env = {k: v for k, v in os.environ.items() if k != "SPOOLMQ_EDGE_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_edge_config(str(path))
    return caught.value


# --- loading -------------------------------------------------------------


def test_a_minimal_config_gets_every_default(good_config, tmp_path):
    cfg = load_edge_config(str(good_config))

    assert isinstance(cfg, EdgeConfig)
    assert cfg.edge_id == "pi-017"
    assert cfg.topic_prefix == "spoolmq"
    assert cfg.broker.protocol == "5"
    assert cfg.outbox.path == f"{tmp_path}/outbox.db"
    assert cfg.outbox.status_path == Path(f"{tmp_path}/outbox.db.status.json")
    assert [(s.stream, s.max_file_bytes) for s in cfg.spool] == [
        ("readings", 16 * 1024 * 1024)
    ]
    assert cfg.publish.window == 20000
    assert cfg.intake.batch_files == 1000


def test_an_unknown_key_names_the_nearest_valid_one(write_config):
    error = config_error(write_config("edge_id: pi-017\nbrokr: {port: 1883}\n"))

    assert error.key == "brokr"
    assert "did you mean 'broker'?" in str(error)


def test_an_unknown_key_inside_a_spool_entry_names_its_index(write_config):
    error = config_error(
        write_config("edge_id: pi-017\nspool:\n  - {dir: /x, stream: s, strem: t}\n")
    )

    assert error.key == "spool[0].strem"
    assert "did you mean 'stream'?" in str(error)


def test_a_wrong_type_names_the_dotted_key(write_config):
    error = config_error(write_config('edge_id: pi-017\nbroker:\n  port: "x"\n'))

    assert error.key == "broker.port"
    assert str(error) == "config error: broker.port: must be a whole number, not 'x'"


def test_a_yaml_syntax_error_gives_the_line(write_config):
    path = write_config("edge_id: pi-017\nbroker: {port: 1883\noutbox: {}\n")

    with pytest.raises(ConfigError, match=r"YAML syntax error in .* at line 3"):
        load_edge_config(str(path))


def test_a_missing_file_is_a_config_error(tmp_path):
    error = config_error(tmp_path / "absent.yaml")

    assert "absent.yaml not found" in str(error)


@pytest.mark.parametrize("name", ["raspberrypi", "localhost", "RaspberryPi", "ubuntu"])
def test_a_factory_host_name_is_refused_as_edge_id(write_config, name):
    error = config_error(write_config(f"edge_id: {name}\n"))

    assert error.key == "edge_id"
    assert "factory default" in str(error)
    assert "set in the config" in str(error)


def test_the_host_name_is_the_default_edge_id(write_config, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "pi-042")

    assert load_edge_config(str(write_config("topic_prefix: spoolmq\n"))).edge_id == (
        "pi-042"
    )


def test_a_factory_host_name_is_refused_when_edge_id_is_left_out(
    write_config, monkeypatch
):
    monkeypatch.setattr(socket, "gethostname", lambda: "raspberrypi")

    error = config_error(write_config("topic_prefix: spoolmq\n"))

    assert error.key == "edge_id"
    assert "the host name" in str(error)


@pytest.mark.parametrize("edge_id", ["pi/017", "pi+", "#", "-pi", "x" * 65])
def test_an_edge_id_unusable_in_a_topic_is_refused(write_config, edge_id):
    path = write_config(yaml.safe_dump({"edge_id": edge_id}))

    assert config_error(path).key == "edge_id"


@pytest.mark.parametrize(
    "stream",
    ["a/b", "+", "#", "", "x" * 65, "abc\n", "a b", ".hidden", "caf\u00e9", "a\x00"],
)
def test_an_invalid_stream_name_is_refused_naming_spool_0_stream(write_config, stream):
    text = yaml.safe_dump(
        {"edge_id": "pi-017", "spool": [{"dir": "/tmp/x", "stream": stream}]}
    )

    error = config_error(write_config(text))

    assert error.key == "spool[0].stream"
    assert str(error).startswith("config error: spool[0].stream: ")


@pytest.mark.parametrize("stream", ["x" * 64, "a.b-c_d", "R2", "9"])
def test_a_valid_stream_name_is_accepted(write_config, stream):
    text = yaml.safe_dump(
        {"edge_id": "pi-017", "spool": [{"dir": "/tmp/x", "stream": stream}]}
    )

    assert load_edge_config(str(write_config(text))).spool[0].stream == stream


def test_the_second_spool_entry_is_named_by_its_index(write_config):
    path = write_config(
        "edge_id: pi-017\nspool:\n"
        "  - {dir: /a, stream: ok}\n"
        "  - {dir: /b, stream: a/b}\n"
    )

    assert config_error(path).key == "spool[1].stream"


def test_a_spool_dir_listed_twice_is_refused(write_config):
    path = write_config(
        "edge_id: pi-017\nspool:\n  - {dir: /a/x, stream: s}\n"
        "  - {dir: /a/./x/, stream: t}\n"
    )

    assert config_error(path).key == "spool[1].dir"


@pytest.mark.parametrize(
    "text, key",
    [
        ("spool:\n  - {stream: s}\n", "spool[0].dir"),
        ("publish: {window: 0}\n", "publish.window"),
        ("publish: {window: 10, batch_records: 11}\n", "publish.batch_records"),
        ("publish: {batch_bytes: 10}\n", "publish.batch_bytes"),
        ("publish: {codec: gzip}\n", "publish.codec"),
        ("publish: {resend_initial: 10, resend_max: 5}\n", "publish.resend_max"),
        ("publish: {linger_ms: -1}\n", "publish.linger_ms"),
        ("outbox: {segment_records: 0}\n", "outbox.segment_records"),
        ("intake: {scan_interval: 0}\n", "intake.scan_interval"),
        ("topic_prefix: 'a/+'\n", "topic_prefix"),
    ],
)
def test_other_bad_values_name_their_key(write_config, text, key):
    assert config_error(write_config("edge_id: pi-017\n" + text)).key == key


# --- `edge-spooler check` ------------------------------------------------


def test_check_prints_the_effective_config_and_exits_0(good_config, tmp_path):
    result = spooler("check", "-c", str(good_config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["edge_id"] == "pi-017"
    assert effective["outbox"]["path"] == f"{tmp_path}/outbox.db"
    assert effective["spool"][0]["stream"] == "readings"
    assert effective["publish"]["window"] == 20000
    assert effective["broker"]["keepalive"] == 30
    assert result.stderr == ""


def test_check_of_a_bad_config_exits_78_with_one_line_naming_the_key(
    write_config, tmp_path
):
    path = write_config('edge_id: pi-017\nbroker:\n  port: "x"\n')

    result = spooler("check", "-c", str(path), cwd=tmp_path)

    assert result.returncode == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("edge-spooler: config error: broker.port: ")


@pytest.mark.parametrize(
    "text, words",
    [
        ("brokr: {}\n", "did you mean 'broker'"),
        ("edge_id: raspberrypi\n", "edge_id"),
        ("edge_id: pi\nspool: [{dir: /x, stream: 'a/b'}]\n", "spool[0].stream"),
        ("edge_id: pi-1\nbroker: a: b\n", "at line 2"),
    ],
)
def test_check_reports_each_kind_of_error_on_one_line(
    write_config, tmp_path, text, words
):
    result = spooler("check", "-c", str(write_config(text)), cwd=tmp_path)

    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1
    assert words in result.stderr


def test_check_of_a_missing_file_exits_78(tmp_path):
    result = spooler("check", "-c", str(tmp_path / "none.yaml"), cwd=tmp_path)

    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1
    assert "none.yaml not found" in result.stderr


def test_check_never_prints_the_broker_password(write_config, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2-secret\n")
    path = write_config(
        "edge_id: pi-017\n"
        f"broker: {{username: pi-017, password_file: '{secret}'}}\n"
        "topic_prefix: spoolmq\n"
    )

    result = spooler("check", "-c", str(path), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout
    assert yaml.safe_load(result.stdout)["broker"]["password_file"] == str(secret)


def test_check_masks_a_password_written_into_a_url_valued_key(write_config, tmp_path):
    path = write_config("edge_id: pi-017\nbroker: {host: 'mqtt://u:s3cret@hub'}\n")

    result = spooler("check", "-c", str(path), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    assert "mqtt://u:***@hub" in result.stdout


def test_the_environment_variable_stands_in_for_dash_c(good_config, tmp_path):
    result = spooler(
        "check", cwd=tmp_path, env={"SPOOLMQ_EDGE_CONFIG": str(good_config)}
    )

    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["edge_id"] == "pi-017"


def test_dash_c_wins_over_the_environment_variable(good_config, write_config, tmp_path):
    other = write_config("edge_id: pi-099\n", "other.yaml")

    result = spooler(
        "check",
        "-c",
        str(other),
        cwd=tmp_path,
        env={"SPOOLMQ_EDGE_CONFIG": str(good_config)},
    )

    assert yaml.safe_load(result.stdout)["edge_id"] == "pi-099"


def test_with_no_config_at_all_check_names_the_variable_and_exits_78(tmp_path):
    result = spooler("check", cwd=tmp_path)

    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1
    assert "SPOOLMQ_EDGE_CONFIG" in result.stderr

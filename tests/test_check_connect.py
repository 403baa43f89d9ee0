"""`check --connect`: the one-shot way to see the broker and the credentials
work, with the exit codes of the contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness.broker import free_port
from tests.harness.daemons import write_core_config, write_edge_config

pytestmark = pytest.mark.integration


def check(side: str, cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", side, "check", "--connect", "-c",
                           str(cfg)], capture_output=True, text=True, timeout=60)


def configs(tmp_path, port, **broker):
    edge = write_edge_config(tmp_path / "edge.yaml", edge_id="e1", port=port,
                             outbox=tmp_path / "o.db", spools=[], broker=broker)
    core = write_core_config(tmp_path / "core.yaml", port=port,
                             db_url=f"sqlite:///{tmp_path}/core.db", broker=broker)
    return {"edge": edge, "core": core}


@pytest.mark.parametrize("side", ["edge", "core"])
def test_check_connect_succeeds_against_a_running_broker(tmp_path, broker, side):
    done = check(side, configs(tmp_path, broker.port)[side])

    assert done.returncode == 0, done.stderr
    assert f"accepted MQTT 5" in done.stdout


@pytest.mark.parametrize("side", ["edge", "core"])
def test_check_connect_exits_69_when_the_broker_is_unreachable(tmp_path, side):
    done = check(side, configs(tmp_path, free_port())[side])

    assert done.returncode == 69
    assert len(done.stderr.strip().splitlines()) == 1
    assert "unreachable" in done.stderr


@pytest.mark.parametrize("side", ["edge", "core"])
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_check_connect_exits_77_when_the_credentials_are_refused(
        tmp_path, broker_factory, side, protocol):
    broker = broker_factory(start=False, allow_anonymous=False)
    broker.settings["password_file"] = broker.write_file("passwd", "")
    broker.start()
    secret = tmp_path / "pw"
    secret.write_text("wrong")
    cfg = configs(tmp_path, broker.port, username="e1", password_file=str(secret),
                  protocol=protocol)[side]

    done = check(side, cfg)

    assert done.returncode == 77, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "wrong" not in done.stderr + done.stdout

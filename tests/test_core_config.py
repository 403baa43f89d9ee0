"""core.yaml: defaults in one place, errors that name the key."""

from __future__ import annotations

import socket

import pytest

from common.errors import ConfigError
from common.exits import Exit
from core.config import CoreConfig, load_core_config
from core.datastore import require_backend


def load(tmp_path, text: str) -> CoreConfig:
    path = tmp_path / "core.yaml"
    path.write_text(text)
    return load_core_config(str(path))


def refusal(tmp_path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.exit_code == Exit.CONFIG == 78
    return caught.value


def test_an_empty_file_gives_the_documented_defaults(tmp_path):
    cfg = load(tmp_path, "")

    assert cfg.client_id == f"core-{socket.gethostname().split('.')[0]}"
    assert cfg.datastore.url == "sqlite:////var/lib/spoolmq/core.db"
    assert (cfg.datastore.batch_messages, cfg.datastore.batch_records) == (200, 20000)
    assert cfg.datastore.linger_ms == 50
    assert cfg.topic_prefix == "spoolmq"
    assert cfg.share_group is None
    assert cfg.broker.protocol == "5"


def test_the_contract_example_loads(tmp_path):
    cfg = load(
        tmp_path,
        """
broker:    {host: 127.0.0.1, port: 1883, protocol: "3.1.1"}
datastore: {url: "sqlite:///core.db"}
client_id: core-01
share_group: collectors
topic_prefix: spoolmq
""",
    )

    assert (cfg.client_id, cfg.share_group) == ("core-01", "collectors")
    assert cfg.broker.protocol == "3.1.1"


def test_an_unknown_key_names_the_nearest_valid_one(tmp_path):
    error = refusal(tmp_path, "datastore: {urll: 'sqlite:///x.db'}\n")

    assert error.key == "datastore.urll"
    assert "did you mean 'url'" in error.reason


def test_share_group_without_an_explicit_client_id_is_refused(tmp_path):
    error = refusal(tmp_path, "share_group: collectors\n")

    assert error.key == "client_id"
    assert "share_group" in error.reason


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db/core",
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "core.db",
    ],
)
def test_a_datastore_url_of_no_known_form_is_refused(tmp_path, url):
    error = refusal(tmp_path, f"datastore: {{url: '{url}'}}\n")

    assert error.key == "datastore.url"


def test_a_postgresql_url_is_accepted_and_has_a_backend_in_this_build(tmp_path):
    cfg = load(tmp_path, "datastore: {url: 'postgresql://u:secret@db/core'}\n")

    require_backend(cfg.datastore.url)  # raises ConfigError when it has none


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("datastore: {batch_messages: 0}\n", "datastore.batch_messages"),
        ("datastore: {batch_messages: 70000}\n", "datastore.batch_messages"),
        ("datastore: {linger_ms: -1}\n", "datastore.linger_ms"),
        ("client_id: 'core/1'\n", "client_id"),
        ("client_id: c\nshare_group: 'a+b'\n", "share_group"),
        ("topic_prefix: 'a/#'\n", "topic_prefix"),
        ("status: {silent_after: -5}\n", "status.silent_after"),
        ("broker: {protocol: 4}\n", "broker.protocol"),
    ],
)
def test_a_bad_value_is_refused_with_its_key(tmp_path, text, key):
    assert refusal(tmp_path, text).key == key

"""Config loading: YAML into dataclasses, errors that name the key, masking."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.config import (
    as_plain,
    check_positive,
    config_path,
    dump_effective,
    load_dataclass,
    mask_url,
    read_yaml,
)
from common.errors import ConfigError
from common.exits import Exit
from common.link import BrokerConfig


@dataclass(frozen=True)
class Item:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Store:
    url: str = "sqlite:////var/lib/x.db"
    password: str | None = None
    password_file: str | None = None
    api_token: str = ""


@dataclass(frozen=True)
class Sample:
    title: str = "t"
    count: int = 3
    ratio: float = 0.5
    enabled: bool = True
    mode: Literal["fast", "safe"] = "safe"
    protocol: Literal["5", "3.1.1"] = "5"
    items: list[Item] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    store: Store = field(default_factory=Store)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    note: str | None = None


@pytest.fixture
def write_yaml(tmp_path):
    """Write YAML text to a file and return its path."""

    def write(text: str, name: str = "c.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load(write_yaml, text: str) -> Sample:
    return load_dataclass(Sample, read_yaml(write_yaml(text)))


def config_error(write_yaml, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(write_yaml, text)
    assert caught.value.exit_code == Exit.CONFIG
    return caught.value


def test_defaults_fill_what_the_file_leaves_out(write_yaml):
    cfg = load(write_yaml, "count: 7\nitems: [{name: a}, {name: b, weight: 2}]\n")

    assert cfg.count == 7
    assert cfg.ratio == 0.5
    assert cfg.items == [Item("a", 1.0), Item("b", 2.0)]
    assert cfg.broker == BrokerConfig()


def test_an_empty_file_means_all_defaults(write_yaml):
    assert load(write_yaml, "") == Sample()
    assert load(write_yaml, "# only a comment\n") == Sample()


def test_an_unknown_key_names_the_nearest_valid_one(write_yaml):
    error = config_error(write_yaml, "brokr: {port: 1}\n")

    assert error.key == "brokr"
    assert "did you mean 'broker'?" in str(error)


def test_an_unknown_nested_key_names_its_dotted_path_and_the_nearest(write_yaml):
    error = config_error(write_yaml, "broker:\n  prot: 1884\n")

    assert error.key == "broker.prot"
    assert "did you mean 'port'?" in str(error)


def test_an_unknown_key_with_nothing_close_lists_the_valid_keys(write_yaml):
    error = config_error(write_yaml, "store: {zzzzzz: 1}\n")

    assert error.key == "store.zzzzzz"
    assert "valid keys: api_token, password, password_file, url" in str(error)


@pytest.mark.parametrize(
    "text, key, words",
    [
        ('broker:\n  port: "x"\n', "broker.port", "must be a whole number"),
        ("broker:\n  port: true\n", "broker.port", "must be a whole number"),
        ("broker:\n  port: 1883.5\n", "broker.port", "must be a whole number"),
        ("count: [1]\n", "count", "must be a whole number"),
        ("ratio: fast\n", "ratio", "must be a number"),
        ("ratio: false\n", "ratio", "must be a number"),
        ("enabled: 1\n", "enabled", "must be true or false"),
        ("enabled: 'yes'\n", "enabled", "must be true or false"),
        ("title: {a: 1}\n", "title", "must be a string"),
        ("title: true\n", "title", "must be a string"),
        ("mode: quick\n", "mode", "must be one of 'fast', 'safe'"),
        ("items: {name: a}\n", "items", "must be a list"),
        ("items: [{name: a}, {name: b, weight: x}]\n", "items[1].weight", "number"),
        ("items: [{weight: 2}]\n", "items[0].name", "is required"),
        ("items: [7]\n", "items[0]", "must be a mapping"),
        ("labels: [a]\n", "labels", "must be a mapping"),
        ("labels: {a: b}\n", "labels.a", "whole number"),
        ("store: 5\n", "store", "must be a mapping"),
    ],
)
def test_a_wrong_type_names_the_dotted_key(write_yaml, text, key, words):
    error = config_error(write_yaml, text)

    assert error.key == key
    assert words in str(error)
    assert str(error).startswith(f"config error: {key}: ")


def test_a_protocol_given_as_a_number_is_read_as_its_name(write_yaml):
    assert load(write_yaml, "protocol: 5\n").protocol == "5"
    assert load(write_yaml, "protocol: '3.1.1'\n").protocol == "3.1.1"
    assert load(write_yaml, "mode: fast\n").mode == "fast"


def test_an_optional_key_may_be_null(write_yaml):
    assert load(write_yaml, "note: ~\n").note is None
    assert load(write_yaml, "note: hello\n").note == "hello"


def test_a_yaml_syntax_error_gives_the_line(write_yaml):
    path = write_yaml("title: a\ncount: 1\nitems: [1, 2\nratio: 3\n")

    with pytest.raises(ConfigError) as caught:
        read_yaml(path)

    message = str(caught.value)
    assert "YAML syntax error" in message
    assert str(path) in message
    assert "at line 4, column 6" in message


def test_a_yaml_tab_indent_error_gives_its_line(write_yaml):
    path = write_yaml("title: a\nbroker:\n\tport: 1\n")

    with pytest.raises(ConfigError, match="at line 3"):
        read_yaml(path)


def test_a_missing_file_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match="nope.yaml not found") as caught:
        read_yaml(missing)

    assert caught.value.exit_code == Exit.CONFIG


def test_a_file_that_is_not_utf8_or_is_a_directory_cannot_be_read(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"title: \xff\xfe\n")

    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(tmp_path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("42\n", "int")])
def test_a_file_that_is_not_a_mapping_is_refused(write_yaml, text, kind):
    with pytest.raises(ConfigError, match=f"must hold a mapping of keys, not {kind}"):
        read_yaml(write_yaml(text))


@pytest.mark.parametrize(
    "text, key",
    [
        ("broker: {port: 0}\n", "broker.port"),
        ("broker: {port: 65536}\n", "broker.port"),
        ("broker: {keepalive: 2}\n", "broker.keepalive"),
        ("broker: {max_message_bytes: 0}\n", "broker.max_message_bytes"),
        ("broker: {max_message_bytes: 100}\n", "broker.max_message_bytes"),
        ("broker: {host: ''}\n", "broker.host"),
        ("broker: {host: ' 127.0.0.1'}\n", "broker.host"),
        ("broker: {reconnect_min: 5, reconnect_max: 1}\n", "broker.reconnect_max"),
        ("broker: {password_file: /nonexistent/pw}\n", "broker.password_file"),
        ("broker: {protocol: 4}\n", "broker.protocol"),
        ("broker: {tls: {ca: /nonexistent/ca.pem}}\n", "broker.tls.ca"),
    ],
)
def test_broker_settings_are_validated_with_their_dotted_key(write_yaml, text, key):
    assert config_error(write_yaml, text).key == key


def test_tls_cert_without_key_is_refused(write_yaml, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")

    error = config_error(write_yaml, f"broker: {{tls: {{cert: {cert}}}}}\n")

    assert error.key == "broker.tls.cert"


def test_check_positive_names_the_key_and_the_bound():
    check_positive("a", "b", 1)
    check_positive("a", "b", 0, zero_ok=True)
    with pytest.raises(ConfigError, match=r"a\.b: must be > 0"):
        check_positive("a", "b", 0)
    with pytest.raises(ConfigError, match=r"^config error: b: must be >= 0"):
        check_positive("", "b", -1, zero_ok=True)


@pytest.mark.parametrize(
    "url, masked",
    [
        (
            "postgresql://spool:s3cret@db.example:5432/spoolmq",
            "postgresql://spool:***@db.example:5432/spoolmq",
        ),
        ("postgresql+psycopg://u:p%40ss@host/db", "postgresql+psycopg://u:***@host/db"),
        ("postgresql://:onlypass@host/db", "postgresql://:***@host/db"),
        ("mqtts://edge:pw@broker:8883", "mqtts://edge:***@broker:8883"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
        ("sqlite:////var/lib/spoolmq/core.db", "sqlite:////var/lib/spoolmq/core.db"),
        ("plain text: a:b@c", "plain text: a:b@c"),
    ],
)
def test_mask_url_hides_only_the_password(url, masked):
    assert mask_url(url) == masked


def test_the_effective_config_masks_passwords_and_secret_fields():
    cfg = Sample(
        store=Store(
            url="postgresql://spool:s3cret@db/spoolmq",
            password="hunter2",
            password_file="/etc/spoolmq/pw",
            api_token="tok-123",
        )
    )

    plain = as_plain(cfg)
    text = dump_effective(cfg)

    assert plain["store"] == {
        "url": "postgresql://spool:***@db/spoolmq",
        "password": "***",
        "password_file": "/etc/spoolmq/pw",
        "api_token": "***",
    }
    for secret in ("s3cret", "hunter2", "tok-123"):
        assert secret not in text
    assert "/etc/spoolmq/pw" in text


def test_an_unset_secret_is_shown_as_unset():
    assert as_plain(Store())["password"] is None
    assert as_plain(Store())["api_token"] == ""


def test_the_effective_config_is_yaml_that_loads_back(write_yaml):
    cfg = load(write_yaml, "items: [{name: a}]\nlabels: {x: 1}\n")

    again = load_dataclass(Sample, read_yaml(write_yaml(dump_effective(cfg), "e.yaml")))

    assert again == cfg


def test_config_path_prefers_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("SPOOLMQ_TEST_CONFIG", "/from/env.yaml")

    assert config_path("/from/arg.yaml", "SPOOLMQ_TEST_CONFIG") == "/from/arg.yaml"
    assert config_path(None, "SPOOLMQ_TEST_CONFIG") == "/from/env.yaml"


def test_config_path_without_either_names_the_variable(monkeypatch):
    monkeypatch.delenv("SPOOLMQ_TEST_CONFIG", raising=False)

    with pytest.raises(ConfigError, match=r"pass -c FILE or set SPOOLMQ_TEST_CONFIG"):
        config_path(None, "SPOOLMQ_TEST_CONFIG")

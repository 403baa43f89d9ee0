"""Fixtures shared by every test: real Mosquitto brokers on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.harness.broker import Broker, SettingValue


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A started broker with the derived production config."""
    with Broker() as started:
        yield started


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., Broker]]:
    """Make brokers with overridden settings; all are closed at teardown.

    ``broker_factory(autosave_interval=3600)`` returns a started broker;
    pass ``start=False`` to add files (a password or ACL file) first.
    """
    with ExitStack() as cleanup:

        def make(*, start: bool = True, **settings: SettingValue) -> Broker:
            new = Broker(settings)
            cleanup.callback(new.close)
            if start:
                new.start()
            return new

        yield make


# Imported beside the fixture it serves, so the fixtures above stay untouched.
from tests.harness.daemons import DaemonSet  # noqa: E402


@pytest.fixture
def daemons() -> Iterator[DaemonSet]:
    """Make daemon processes; any still running at teardown is killed.

    ``daemons(name, argv, log_path)`` makes any command a Daemon;
    ``daemons.spooler(config, workdir)`` and ``daemons.collector(...)`` make
    the project's own. Each is returned unstarted.
    """
    made = DaemonSet()
    try:
        yield made
    finally:
        made.close()


# The datastore on both backends. Imported here, beside the fixtures it serves.
import os  # noqa: E402

from tests.harness.stores import (  # noqa: E402
    own_database,
    postgres_unavailable,
)


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """Skip when no PostgreSQL server answers; fail instead when CI is set."""
    reason = postgres_unavailable()
    if reason is None:
        return
    message = f"no PostgreSQL server for the tests: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails rather than skips)")
    pytest.skip(message)


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The URL of a new database of this test's own, dropped at teardown."""
    with own_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def datastore_url(request, tmp_path) -> str:
    """A datastore URL, not opened yet, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/core.db"
    return request.getfixturevalue("postgres_url")

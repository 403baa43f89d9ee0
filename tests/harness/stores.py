"""A datastore's tables read from outside, the same way on every backend.

Tests of the datastore interface check what landed in the tables through a
`StoreProbe`: its own connection, opened and closed per query, so a check
never shares the transaction or the session of the store it checks.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from types import ModuleType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

import core.postgres_store
import core.sqlite_store
from core.datastore import sqlite_path

# The shared local server: trust authentication for postgres on loopback.
POSTGRES_ADMIN_URL = os.environ.get(
    "SPOOLMQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CONNECT_TIMEOUT_S = 5


class StoreProbe:
    """Reads and writes one store's tables behind its back, by URL."""

    backend: str
    module: ModuleType

    def __init__(self, url: str):
        self.url = url

    def rows(self, sql: str) -> list[tuple]:
        """The rows of `sql`, JSON payloads parsed, so backends compare equal."""
        return [tuple(_plain(value) for value in row) for row in self._query(sql)]

    def execute(self, sql: str) -> None:
        self._query(sql, fetch=False)

    def table_names(self) -> set[str]:
        raise NotImplementedError

    def commits_are_durable(self) -> bool:
        """Whether a commit returns only once it is on disk."""
        raise NotImplementedError

    def _query(self, sql: str, fetch: bool = True) -> list[tuple]:
        raise NotImplementedError


class SQLiteProbe(StoreProbe):
    backend = "sqlite"
    module = core.sqlite_store

    def table_names(self) -> set[str]:
        found = self._query("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in found}

    def commits_are_durable(self) -> bool:
        # A fresh connection would report its own defaults: ask the store's.
        from core.datastore import open_datastore

        store = open_datastore(self.url)
        try:
            mode = store.db.execute("PRAGMA journal_mode").fetchone()
            synchronous = store.db.execute("PRAGMA synchronous").fetchone()
        finally:
            store.close()
        return mode == ("wal",) and synchronous == (2,)  # FULL

    def _query(self, sql: str, fetch: bool = True) -> list[tuple]:
        with closing(sqlite3.connect(sqlite_path(self.url))) as conn, conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if fetch else []


class PostgresProbe(StoreProbe):
    backend = "postgresql"
    module = core.postgres_store

    def table_names(self) -> set[str]:
        found = self._query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        return {name for (name,) in found}

    def commits_are_durable(self) -> bool:
        from core.datastore import open_datastore

        store = open_datastore(self.url)
        try:
            sql = "SELECT current_setting('synchronous_commit')"
            return store._guarded("query", lambda c: c.execute(sql).fetchone()) == (
                "on",
            )
        finally:
            store.close()

    def _query(self, sql: str, fetch: bool = True) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if fetch and cursor.description else []


def probe(url: str) -> StoreProbe:
    """The probe for `url`'s backend."""
    return PostgresProbe(url) if url.startswith("postgresql") else SQLiteProbe(url)


def _plain(value: Any) -> Any:
    # SQLite hands back the JSON text, psycopg the parsed jsonb; bytea as bytes.
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    return value


# -- databases of our own on the shared server ---------------------------


def postgres_unavailable(admin_url: str = POSTGRES_ADMIN_URL) -> str | None:
    """Why no test database can be made on the server, or None."""
    try:
        with psycopg.connect(
            admin_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return None


@contextmanager
def own_database(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A new, uniquely named database; its URL. Dropped (FORCE) at the end.

    Copied from template0, which no session may connect to: template1 refuses
    to be copied while anyone else on the shared server is connected to it.
    """
    name = f"spoolmq_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield _database_url(conninfo_to_dict(admin_url), name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _database_url(params: dict[str, str], dbname: str) -> str:
    # A URL, not a key=value string: the collector's config wants one.
    user = params.get("user", "")
    password = f":{params['password']}" if params.get("password") else ""
    at = "@" if user or password else ""
    host = params.get("host", "127.0.0.1")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{password}{at}{host}{port}/{dbname}"


def postgres_stored_ids(url: str) -> collections.Counter:
    """How often each (edge_id, epoch, seq) is in `records` (empty before)."""
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('records') IS NOT NULL").fetchone()
        if not exists[0]:
            return collections.Counter()
        found: Sequence[tuple] = conn.execute(
            "SELECT edge_id, epoch, seq FROM records"
        ).fetchall()
    return collections.Counter(found)

"""What only the PostgreSQL datastore does: jsonb, timestamptz, a server.

Each test has a database of its own on the local server (`postgres_url`);
refused credentials are played by a fake server that answers the startup
message with the error a real one sends.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from datetime import UTC, datetime

import psycopg
import pytest

from common.envelope import WireRecord, encode_batch
from common.exits import Exit
from common.topics import Topics
from core.cli import main
from core.datastore import DeadLetter, Record, open_datastore
from core.errors import DatastoreError
from core.messages import decode_message
from core.postgres_store import NUL_REFUSED, SCHEMA_VERSION, SURROGATE_REFUSED
from tests.harness.broker import free_port
from tests.harness.stores import probe

CREATED = "2024-05-01T12:00:00.000Z"
OPENERS = 4
FAKE_SERVER_TIMEOUT_S = 10.0


def record(seq: int, *, payload: str | None = None, **kw) -> Record:
    values = {
        "edge_id": "e1",
        "epoch": "ep1",
        "stream": "s",
        "created_at": CREATED,
        "clock_unsynced": False,
        "payload": payload or f'{{"n":{seq}}}',
    }
    values.update(kw)
    return Record(seq=seq, **values)


@pytest.fixture
def store(postgres_url):
    opened = open_datastore(postgres_url)
    yield opened
    opened.close()


@pytest.fixture(autouse=True)
def restore_logging():
    """main() points the root logger at the stderr of its test; undo that."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], root.level = saved


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def write_config(tmp_path, url: str):
    path = tmp_path / "core.yaml"
    path.write_text(f"datastore: {{url: {json.dumps(url)}}}\nclient_id: core-t\n")
    return path


# -- what jsonb refuses ------------------------------------------------------


def test_a_payload_with_u0000_is_dead_lettered_alone_and_its_batch_stored(
    store, postgres_url
):
    wire = [
        WireRecord(1, 1714564800.0, False, '{"n":1}'),
        WireRecord(2, 1714564800.0, False, '{"n":2,"s":"a\\u0000b"}'),
        WireRecord(3, 1714564800.0, False, '{"n":3}'),
    ]
    body = encode_batch("e1", "ep1", "s", wire)
    items = decode_message("spoolmq/e1/data/s", body, Topics("spoolmq"), store.refusal)

    confirmed = store.store(items)

    assert confirmed == {"e1": {"ep1": [1, 2, 3]}}
    tables = probe(postgres_url)
    assert tables.rows("SELECT seq FROM records ORDER BY seq") == [(1,), (3,)]
    assert tables.rows("SELECT seq, reason FROM dead_letters") == [
        (2, f"seq 2: {NUL_REFUSED}")
    ]
    assert store.totals() == {"records": 2, "dead_letters": 1, "edges": 1}


def test_u0000_in_a_key_is_refused_but_an_escaped_backslash_is_not(store):
    assert store.refusal(record(1, payload='{"k\\u0000":1}')) == NUL_REFUSED
    assert store.refusal(record(2, payload='["x",{"y":["\\u0000"]}]')) == NUL_REFUSED
    assert store.refusal(record(3, payload='{"s":"\\\\u0000"}')) is None
    assert store.refusal(record(4, payload='{"s":"\\u0001"}')) is None


def test_a_lone_surrogate_is_refused_but_a_pair_is_not(store):
    assert store.refusal(record(1, payload='{"s":"\\ud800x"}')) == SURROGATE_REFUSED
    assert store.refusal(record(2, payload='{"s":"\\ud83d\\ude00"}')) is None
    assert store.refusal(record(3, payload='{"s":"\\u00e9"}')) is None


def test_a_refused_record_given_to_store_fails_its_batch_with_75(store, postgres_url):
    # The collector dead-letters it first; this shows why it must.
    with pytest.raises(DatastoreError) as caught:
        store.store([record(1), record(2, payload='{"s":"\\u0000"}')])

    assert caught.value.exit_code == Exit.TEMPFAIL
    assert probe(postgres_url).rows("SELECT count(*) FROM records") == [(0,)]


def test_a_reason_holding_nul_is_stored_escaped(store, postgres_url):
    letter = DeadLetter("spoolmq/e1/data/s", "bad \x00 byte", b"\x00", "e1")

    store.store([letter])

    rows = probe(postgres_url).rows("SELECT reason, raw FROM dead_letters")
    assert rows == [("bad \\u0000 byte", b"\x00")]


# -- column types ------------------------------------------------------------


def test_payloads_are_stored_as_jsonb(store, postgres_url):
    store.store([record(1, payload='{"n":41,"tags":["a"]}'), record(2)])

    tables = probe(postgres_url)
    assert tables.rows(
        "SELECT payload->>'n', jsonb_typeof(payload->'tags') FROM records ORDER BY seq"
    ) == [("41", "array"), ("2", None)]
    assert tables.rows(
        "SELECT count(*) FROM records WHERE payload @> '{\"n\": 41}'"
    ) == [(1,)]


def test_the_columns_have_the_postgresql_types(store, postgres_url):
    found = dict(
        probe(postgres_url).rows(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'records'"
        )
    )
    assert found["payload"] == "jsonb"
    assert found["seq"] == "bigint"
    assert found["created_at"] == found["received_at"] == "timestamp with time zone"
    raw = probe(postgres_url).rows(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_name = 'dead_letters' AND column_name = 'raw'"
    )
    assert raw == [("bytea",)]


def test_times_are_stored_as_timestamptz_in_utc(store, postgres_url):
    received = datetime(2024, 5, 1, 12, 0, 5, 250000, tzinfo=UTC)
    store.store(
        [record(1, created_at="2024-05-01T12:00:00.125Z")],
        received_at=received.timestamp(),
    )

    with psycopg.connect(postgres_url) as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        created_at, received_at, local = conn.execute(
            "SELECT created_at, received_at, created_at::text FROM records"
        ).fetchone()
    assert created_at == datetime(2024, 5, 1, 12, 0, 0, 125000, tzinfo=UTC)
    assert received_at == received
    assert local == "2024-05-01 21:00:00.125+09"
    summary = store.edge_summary()[0]
    assert summary["last_created_at"] == "2024-05-01T12:00:00.125Z"
    assert summary["last_seen"] == "2024-05-01T12:00:05.250Z"


def test_a_seq_beyond_32_bits_is_stored(store, postgres_url):
    big = 2**63 - 1

    assert store.store([record(big)]) == {"e1": {"ep1": [big]}}
    assert probe(postgres_url).rows("SELECT seq FROM records") == [(big,)]


# -- migrations and several collectors ---------------------------------------


def test_stores_opened_together_record_each_migration_once(postgres_url):
    start = threading.Barrier(OPENERS)
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            start.wait(timeout=10)
            open_datastore(postgres_url).close()
        except (DatastoreError, threading.BrokenBarrierError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(OPENERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    versions = probe(postgres_url).rows(
        "SELECT version FROM schema_migrations ORDER BY version"
    )
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_two_stores_on_one_database_store_each_record_once(postgres_url):
    first, second = open_datastore(postgres_url), open_datastore(postgres_url)
    try:
        first.store([record(1), record(2)])
        second.store([record(2), record(3)])
        summary = first.edge_summary()
    finally:
        first.close()
        second.close()

    assert probe(postgres_url).rows("SELECT seq FROM records ORDER BY seq") == [
        (1,),
        (2,),
        (3,),
    ]
    assert summary[0]["records"] == 3 and summary[0]["missing"] == 0


# -- a lost connection -------------------------------------------------------


def kill_session(store, admin_url: str) -> None:
    pid = store._conn.info.backend_pid
    with psycopg.connect(admin_url, autocommit=True) as other:
        killed = other.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
    assert killed == (True,)


def test_a_killed_session_fails_one_store_with_75_then_reconnects(
    store, postgres_url, caplog
):
    caplog.set_level(logging.INFO, logger="core.postgres_store")
    store.store([record(1), record(2)])
    kill_session(store, postgres_url)
    batch = [record(3), record(4)]

    try:
        store.store(batch)
    except DatastoreError as exc:
        # What the collector does: keep the batch unacked, retry it later.
        assert exc.exit_code == Exit.TEMPFAIL == 75
    assert store.store(batch) == {"e1": {"ep1": [3, 4]}}
    store.store([record(5)])

    assert "reconnected" in caplog.text

    tables = probe(postgres_url)
    assert tables.rows(
        "SELECT seq, count(*) FROM records GROUP BY seq ORDER BY seq"
    ) == [(seq, 1) for seq in range(1, 6)]
    assert store.totals()["records"] == 5
    assert store.edge_summary()[0]["missing"] == 0


def test_reads_and_state_reconnect_after_a_killed_session(store, postgres_url):
    store.save_state("k", "v1")
    kill_session(store, postgres_url)

    try:
        store.load_state("k")
    except DatastoreError as exc:
        assert exc.exit_code == Exit.TEMPFAIL
    assert store.load_state("k") == "v1"
    store.save_state("k", "v2")
    assert store.load_state("k") == "v2"


# -- a server that cannot be used --------------------------------------------


def test_an_unreachable_server_exits_69(tmp_path, capsys):
    url = f"postgresql://spool:hunter2@127.0.0.1:{free_port()}/core"

    with pytest.raises(DatastoreError) as caught:
        open_datastore(url)
    assert caught.value.exit_code == Exit.UNAVAILABLE == 69

    assert main(["status", "-c", str(write_config(tmp_path, url))]) == 69
    line = one_line(capsys.readouterr().err)
    assert "cannot reach the server" in line and "hunter2" not in line


def test_a_role_the_server_does_not_know_exits_77(postgres_server, tmp_path, capsys):
    url = "postgresql://spoolmq_no_such_role_9f3e@127.0.0.1:5432/postgres"

    assert main(["run", "-c", str(write_config(tmp_path, url))]) == 77
    line = one_line(capsys.readouterr().err)
    assert "credentials refused" in line and "does not exist" in line


def test_a_database_that_does_not_exist_exits_69_saying_so(
    postgres_server, tmp_path, capsys
):
    url = "postgresql://postgres@127.0.0.1:5432/spoolmq_test_never_created_4b1d"

    assert main(["run", "-c", str(write_config(tmp_path, url))]) == 69
    assert "createdb" in one_line(capsys.readouterr().err)


class RefusingServer:
    """Answers one startup message with PostgreSQL's wrong-password error."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(FAKE_SERVER_TIMEOUT_S)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(FAKE_SERVER_TIMEOUT_S)
            (length,) = struct.unpack("!I", conn.recv(4))
            conn.recv(length - 4)
            fields = (
                b"SFATAL\0VFATAL\0C28P01\0"
                b'Mpassword authentication failed for user "spool"\0\0'
            )
            conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=FAKE_SERVER_TIMEOUT_S)


def test_a_wrong_password_exits_77_without_showing_it(tmp_path, capsys):
    server = RefusingServer()
    url = (
        f"postgresql://spool:hunter2@127.0.0.1:{server.port}/core"
        "?sslmode=disable&gssencmode=disable"
    )
    try:
        code = main(["run", "-c", str(write_config(tmp_path, url))])
    finally:
        server.close()

    assert code == 77
    line = one_line(capsys.readouterr().err)
    assert "password authentication failed" in line and "hunter2" not in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://spool:hunter2@127.0.0.1:port/core",
        "postgresql://spool:hunter2@127.0.0.1:70000/core",
        "postgresql://spool:hunter2@127.0.0.1/core?no_such_option=1",
        "postgresql://spool:hunter2@[::1/core",
    ],
)
def test_a_malformed_url_exits_78_naming_the_key(tmp_path, capsys, url):
    assert main(["check", "-c", str(write_config(tmp_path, url))]) == 78
    line = one_line(capsys.readouterr().err)
    assert "datastore.url" in line and "hunter2" not in line


# -- status reads the server -------------------------------------------------


def test_status_reports_what_the_collector_stored(
    store, postgres_url, tmp_path, capsys
):
    store.store([record(1), record(3), DeadLetter("t", "bad", b"x", "e1")])
    config = write_config(tmp_path, postgres_url)

    assert main(["status", "--json", "-c", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"] == {"records": 2, "dead_letters": 1, "edges": 1}
    assert report["edges"][0]["missing"] == 1
    assert report["edges"][0]["last_created_at"] == CREATED


def test_status_on_an_empty_database_exits_69(postgres_url, tmp_path, capsys):
    assert main(["status", "-c", str(write_config(tmp_path, postgres_url))]) == 69
    assert "core-collector run" in one_line(capsys.readouterr().err)


def test_a_password_in_the_url_query_is_masked():
    from common.config import mask_url

    masked = mask_url("postgresql://u@h:5432/db?sslmode=require&password=topsecret")

    assert "topsecret" not in masked
    assert masked.endswith("password=***")


def test_an_option_libpq_refuses_is_a_config_error(postgres_url):
    from common.exits import Exit
    from core.datastore import open_datastore
    from core.errors import DatastoreError

    with pytest.raises(DatastoreError) as caught:
        open_datastore(postgres_url + "?sslmode=bogus")

    assert caught.value.exit_code == Exit.CONFIG

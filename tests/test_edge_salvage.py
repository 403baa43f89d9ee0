"""A damaged outbox is salvaged at start: set aside, never deleted, never fatal."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from common.envelope import WireRecord
from common.exits import Exit
from edge.config import load_edge_config
from edge.errors import OutboxBusy, OutboxError
from edge.outbox import Outbox, Record, decode_body
from edge.salvage import REQUIRED, damage, salvage_if_damaged
from edge.spooler import Spooler
from tests.harness.daemons import (
    stored_ids,
    wait_until,
    write_core_config,
    write_edge_config,
)

EDGE = "pi-017"
SPOOLER = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "edge-spooler"
ID_RE = re.compile(r"^pi-017:([0-9a-f]{16}):(\d+)$")

# --- fixtures ------------------------------------------------------------


@pytest.fixture
def outbox_path(tmp_path) -> Path:
    return tmp_path / "state" / "outbox.db"


def records(n: int, start: int = 0, stream: str = "readings") -> list[Record]:
    return [
        Record(stream, json.dumps({"i": start + i, "pad": "x" * 20}), 1767225600.0 + i)
        for i in range(n)
    ]


def fill(path: Path, segments: int, per_segment: int = 100) -> tuple[str, dict]:
    """An outbox with `segments` segments; returns its epoch and seq -> payload."""
    box = Outbox(path, EDGE)
    sent = {}
    for n in range(segments):
        batch = records(per_segment, start=n * per_segment)
        ids = box.accept(batch, segment_records=per_segment)
        sent.update({i.seq: r.payload for i, r in zip(ids, batch)})
    box.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    epoch = box.epoch
    box.close()
    return epoch, sent


def contents(box: Outbox) -> dict[tuple[str, int], str]:
    """(epoch, seq) -> payload of every record in the outbox."""
    out = {}
    for seg in box.segments_after(0, 10**9):
        for i, (_, _, payload) in enumerate(decode_body(seg.body)):
            out[(seg.epoch, seg.first_seq + i)] = payload
    return out


def asides(path: Path) -> list[Path]:
    """The damaged files set aside beside `path` (not their -wal or -shm)."""
    pattern = re.compile(re.escape(path.name) + r"\.damaged-\d{8}T\d{6}Z(-\d+)?\Z")
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))


def foreign_database(path: Path) -> None:
    """Another program's SQLite file, in rollback mode as most are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO foo (name) VALUES (?)", [("a",), ("b",)])
    conn.commit()
    conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def edge_yaml(tmp_path: Path, outbox_path: Path) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(
        f"edge_id: {EDGE}\n"
        f"broker: {{host: 127.0.0.1, port: {free_port()}}}\n"
        f"outbox: {{path: '{outbox_path}'}}\n"
    )
    return path


def open_together(path: str, start, out) -> None:
    """Run in a child process: open the (damaged) outbox with the others."""
    start.wait(60)
    try:
        box = Outbox(path, EDGE)
        out.put(("ok", box.epoch, sorted(contents(box))))
        box.close()
    except Exception as exc:  # reported to the test, which fails with it
        out.put(("error", repr(exc), []))


HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM meta").fetchall()
print("open", flush=True)
time.sleep(60)
"""


# --- what is damage, what is not -----------------------------------------


def test_a_healthy_outbox_is_not_damage_and_is_left_byte_for_byte(outbox_path):
    fill(outbox_path, 3)
    before = outbox_path.read_bytes()

    assert damage(outbox_path, EDGE) is None
    assert salvage_if_damaged(outbox_path, EDGE) is None
    Outbox(outbox_path, EDGE).close()

    assert asides(outbox_path) == []
    assert outbox_path.read_bytes() == before


def test_a_zero_length_file_is_a_new_outbox_not_damage(outbox_path):
    # SQLite leaves a zero-length file between creating it and writing its
    # first page: a process opening a new outbox at that moment sees one.
    outbox_path.parent.mkdir(parents=True)
    outbox_path.touch()

    assert damage(outbox_path, EDGE) is None
    box = Outbox(outbox_path, EDGE)

    assert asides(outbox_path) == []
    assert [i.seq for i in box.accept(records(2))] == [1, 2]
    box.close()


def test_a_missing_file_is_not_damage(outbox_path):
    assert damage(outbox_path, EDGE) is None


def test_an_outbox_of_another_edge_is_refused_with_exit_78_and_not_touched(
    outbox_path,
):
    fill(outbox_path, 1)
    before = outbox_path.read_bytes()

    with pytest.raises(OutboxError) as caught:
        Outbox(outbox_path, "pi-018")

    assert caught.value.exit_code == Exit.CONFIG == 78
    assert asides(outbox_path) == []
    assert outbox_path.read_bytes() == before


def test_an_outbox_of_a_newer_schema_is_refused_with_exit_78_not_salvaged(
    outbox_path,
):
    fill(outbox_path, 1)
    with sqlite3.connect(outbox_path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()

    with pytest.raises(OutboxError, match="schema 2") as caught:
        Outbox(outbox_path, EDGE)

    assert caught.value.exit_code == Exit.CONFIG
    assert asides(outbox_path) == []


@pytest.mark.parametrize(
    "change, words",
    [
        ("DELETE FROM meta WHERE key = 'epoch'", "meta lacks epoch"),
        ("UPDATE meta SET value = 'one' WHERE key = 'schema_version'", "not a number"),
        ("ALTER TABLE segments DROP COLUMN accepted_at", "segments lacks accepted_at"),
        ("DROP TABLE skipped", "table skipped is missing"),
    ],
)
def test_an_outbox_whose_meta_or_schema_is_unknown_is_damage(
    outbox_path, change, words
):
    fill(outbox_path, 1)
    with sqlite3.connect(outbox_path) as conn:
        conn.execute(change)
    conn.close()

    assert words in damage(outbox_path, EDGE)


def test_an_outbox_made_before_later_columns_were_added_is_not_damage(
    outbox_path,
):
    # Schema 1 as first made: later columns come with defaults, or a
    # migration; neither makes an older outbox damaged.
    outbox_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(outbox_path)
    for table, columns in REQUIRED.items():
        conn.execute(f"CREATE TABLE {table} ({', '.join(sorted(columns))})")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("schema_version", "1"),
            ("edge_id", EDGE),
            ("epoch", "0123456789abcdef"),
            ("next_seq", "1"),
        ],
    )
    conn.commit()
    conn.close()

    assert damage(outbox_path, EDGE) is None


def test_a_sqlite_file_of_another_program_is_damage(outbox_path):
    foreign_database(outbox_path)

    assert "no meta table among foo" in damage(outbox_path, EDGE)


# --- salvage through the daemon's path -------------------------------------


def test_a_garbage_file_is_set_aside_byte_for_byte_and_a_new_outbox_starts(
    outbox_path,
):
    outbox_path.parent.mkdir(parents=True)
    garbage = os.urandom(50_000)
    outbox_path.write_bytes(garbage)

    box = Outbox(outbox_path, EDGE)
    ids = box.accept(records(3))
    box.close()

    (aside,) = asides(outbox_path)
    assert aside.read_bytes() == garbage
    assert [i.seq for i in ids] == [1, 2, 3]
    assert damage(outbox_path, EDGE) is None


def test_nothing_can_be_salvaged_from_an_unreadable_header_and_that_is_said(
    outbox_path, caplog
):
    outbox_path.parent.mkdir(parents=True)
    outbox_path.write_bytes(b"not a database" * 1000)

    result = salvage_if_damaged(outbox_path, EDGE)

    assert result.tallies == {}
    assert result.old_epoch is None
    assert "rows lost: unknown (the file's header is unreadable)" in caplog.text
    assert Outbox(outbox_path, EDGE).summary()["records_waiting"] == 0


def test_a_truncated_outbox_keeps_each_readable_record_under_its_own_id(
    outbox_path,
):
    old_epoch, sent = fill(outbox_path, 30)
    assert len(sent) == 3000
    assert not Path(f"{outbox_path}-wal").exists()
    with open(outbox_path, "r+b") as f:
        f.truncate(outbox_path.stat().st_size // 2)
    damaged = outbox_path.read_bytes()

    box = Outbox(outbox_path, EDGE)

    kept = contents(box)
    assert 0 < len(kept) < 3000
    assert len(kept) % 100 == 0  # whole segments: a page loses what it holds
    assert {epoch for epoch, _ in kept} == {old_epoch}
    assert all(payload == sent[seq] for (_, seq), payload in kept.items())
    new = box.accept(records(5))
    assert box.epoch != old_epoch
    assert [(i.epoch, i.seq) for i in new] == [(box.epoch, s) for s in range(1, 6)]
    assert not set(kept) & {(i.epoch, i.seq) for i in new}
    box.close()
    (aside,) = asides(outbox_path)
    assert aside.read_bytes() == damaged


def test_the_salvage_warning_counts_what_was_kept_and_lost(outbox_path, caplog):
    fill(outbox_path, 30)
    with open(outbox_path, "r+b") as f:
        f.truncate(outbox_path.stat().st_size // 2)

    result = salvage_if_damaged(outbox_path, EDGE)

    segments = result.tallies["segments"]
    assert segments.salvaged + segments.lost == 30
    assert segments.records == 100 * segments.salvaged
    (warning,) = [r for r in caplog.records if r.name == "edge.salvage"
                  and "set it aside" in r.getMessage()]
    assert warning.levelname == "WARNING"
    text = warning.getMessage()
    assert f"salvaged {segments.salvaged} segments ({segments.records} records)" in text
    assert f"segments {segments.lost}" in text
    assert str(result.aside) in text


def test_dead_letters_and_skipped_notices_are_salvaged_with_their_ids(outbox_path):
    old_epoch, _ = fill(outbox_path, 2, per_segment=10)
    box = Outbox(outbox_path, EDGE)
    letters = [WireRecord(s, 1767225600.0, False, f'{{"dead":{s}}}') for s in (4, 5)]
    box.dead_letter(old_epoch, "readings", letters, "over the broker's limit")
    box.close()
    with sqlite3.connect(outbox_path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'next_seq'")
    conn.close()

    box = Outbox(outbox_path, EDGE)

    dead = box.conn.execute(
        "SELECT epoch, seq, stream, reason, payload FROM dead_letters ORDER BY seq"
    ).fetchall()
    assert dead == [
        (old_epoch, 4, "readings", "over the broker's limit", '{"dead":4}'),
        (old_epoch, 5, "readings", "over the broker's limit", '{"dead":5}'),
    ]
    skipped = [(r.epoch, r.first_seq, r.last_seq) for r in box.skipped_pending()]
    assert skipped == [(old_epoch, 4, 5)]
    assert len(contents(box)) == 20
    assert box.summary()["next_seq"] == 1
    box.close()


def test_a_sqlite_file_of_another_program_is_set_aside_intact(outbox_path):
    foreign_database(outbox_path)
    before = outbox_path.read_bytes()

    box = Outbox(outbox_path, EDGE)
    box.accept(records(1))
    box.close()

    (aside,) = asides(outbox_path)
    assert aside.read_bytes() == before
    conn = sqlite3.connect(aside)
    assert conn.execute("SELECT name FROM foo ORDER BY id").fetchall() == [
        ("a",),
        ("b",),
    ]
    conn.close()


def test_a_damaged_file_and_its_wal_are_set_aside_together_as_a_crash_left_them(
    outbox_path,
):
    old_epoch, sent = fill(outbox_path, 2, per_segment=10)
    conn = sqlite3.connect(outbox_path)
    conn.execute("DELETE FROM meta WHERE key = 'edge_id'")
    conn.commit()
    # Copied while the connection is open: the change lives in the WAL only,
    # as a killed daemon leaves it (closing would fold the WAL in).
    main, wal = outbox_path.read_bytes(), Path(f"{outbox_path}-wal").read_bytes()
    conn.close()
    outbox_path.write_bytes(main)
    Path(f"{outbox_path}-wal").write_bytes(wal)
    Path(f"{outbox_path}-shm").unlink(missing_ok=True)

    box = Outbox(outbox_path, EDGE)

    assert {k: v for k, v in contents(box).items()} == {
        (old_epoch, seq): payload for seq, payload in sent.items()
    }
    box.close()
    (aside,) = asides(outbox_path)
    assert aside.read_bytes() == main
    assert Path(f"{aside}-wal").read_bytes() == wal
    assert damage(outbox_path, EDGE) is None


def test_salvaging_twice_in_one_second_gives_two_unique_aside_names(outbox_path):
    outbox_path.parent.mkdir(parents=True)
    for n in range(2):
        outbox_path.write_bytes(b"garbage %d" % n * 500)
        Outbox(outbox_path, EDGE).close()

    assert [p.read_bytes()[:9] for p in asides(outbox_path)] == [
        b"garbage 0",
        b"garbage 1",
    ]


def test_a_damaged_outbox_another_process_has_open_is_left_alone_exit_75(
    outbox_path,
):
    fill(outbox_path, 1)
    with sqlite3.connect(outbox_path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'epoch'")
    conn.close()
    before = outbox_path.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(outbox_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"

        with pytest.raises(OutboxBusy, match="another process has it open") as caught:
            Outbox(outbox_path, EDGE)
    finally:
        holder.kill()
        holder.wait(10)

    assert caught.value.exit_code == Exit.TEMPFAIL
    assert asides(outbox_path) == []
    assert outbox_path.read_bytes() == before
    assert not list(outbox_path.parent.glob("*.salvage-*"))


@pytest.mark.timeout(120)
def test_processes_opening_one_damaged_outbox_together_salvage_it_once(
    outbox_path,
):
    fill(outbox_path, 4, per_segment=10)
    with open(outbox_path, "r+b") as f:
        f.truncate(outbox_path.stat().st_size - 4096)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(3), ctx.Queue()
    workers = [
        ctx.Process(target=open_together, args=(str(outbox_path), start, out))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    try:
        results = [out.get(timeout=60) for _ in workers]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)

    assert [r for r in results if r[0] == "error"] == []
    assert len({r[1] for r in results}) == 1  # one new outbox, one epoch
    assert len({tuple(r[2]) for r in results}) == 1
    assert len(asides(outbox_path)) == 1


def damage_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(30_000))


def damage_truncated(path: Path) -> None:
    fill(path, 30)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    "make_damage", [damage_garbage, damage_truncated, foreign_database]
)
def test_the_daemon_opens_each_kind_of_damage_and_keeps_working(
    tmp_path, outbox_path, make_damage
):
    make_damage(outbox_path)
    damaged = outbox_path.read_bytes()
    spooler = Spooler(load_edge_config(str(edge_yaml(tmp_path, outbox_path))))
    try:
        salvaged = contents(spooler.outbox)
        spooler.intake.prepare()
        for _ in range(3):
            spooler.step()  # no broker listens: it logs and goes on
        ids = spooler.outbox.accept(records(2))
    finally:
        spooler.outbox.close()

    (aside,) = asides(outbox_path)
    assert aside.read_bytes() == damaged
    assert spooler.outbox.epoch not in {epoch for epoch, _ in salvaged}
    assert [(i.epoch, i.seq) for i in ids] == [
        (spooler.outbox.epoch, 1),
        (spooler.outbox.epoch, 2),
    ]
    box = Outbox(outbox_path, EDGE)
    assert contents(box) == {
        **salvaged,
        **{(i.epoch, i.seq): r.payload for i, r in zip(ids, records(2))},
    }
    box.close()


# --- the commands ----------------------------------------------------------


def test_send_after_damage_exits_0_and_prints_an_id_of_the_new_epoch(
    tmp_path, outbox_path
):
    old_epoch, _ = fill(outbox_path, 1, per_segment=5)
    with open(outbox_path, "r+b") as f:
        f.truncate(4096)
    config = edge_yaml(tmp_path, outbox_path)

    result = subprocess.run(
        [str(SPOOLER), "send", "-c", str(config), "--stream", "s", "--data", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    match = ID_RE.match(result.stdout.strip())
    assert match and match.group(1) != old_epoch and match.group(2) == "1"
    assert "is damaged" in result.stderr  # the warning, once
    assert len(asides(outbox_path)) == 1


@pytest.mark.timeout(60)
def test_the_daemon_starts_on_a_garbage_outbox_and_keeps_running(
    tmp_path, outbox_path, daemons
):
    outbox_path.parent.mkdir(parents=True)
    outbox_path.write_bytes(os.urandom(20_000))
    spooler = daemons.spooler(edge_yaml(tmp_path, outbox_path), tmp_path)

    spooler.start()
    wait_until(lambda: " started: outbox" in spooler.log_text(), 20, message=spooler.log_tail())
    assert spooler.running
    spooler.stop()

    assert spooler.returncode == 0, spooler.log_tail()
    assert "is damaged" in spooler.log_text()
    assert len(asides(outbox_path)) == 1


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_salvaged_records_reach_the_core_under_their_original_ids(
    tmp_path, outbox_path, broker, daemons
):
    old_epoch, _ = fill(outbox_path, 30)
    with open(outbox_path, "r+b") as f:
        f.truncate(outbox_path.stat().st_size // 2)
    config = write_edge_config(
        tmp_path / "edge.yaml",
        edge_id=EDGE,
        port=broker.port,
        outbox=outbox_path,
        spools=[],
    )
    db = tmp_path / "core.db"
    core = write_core_config(
        tmp_path / "core.yaml", port=broker.port, db_url=f"sqlite:///{db}"
    )
    box = Outbox(outbox_path, EDGE)  # salvages, as the daemon would
    kept = set(contents(box))
    box.close()
    assert kept and {epoch for epoch, _ in kept} == {old_epoch}
    daemons.collector(core, tmp_path).start()
    daemons.spooler(config, tmp_path).start()

    wanted = {(EDGE, epoch, seq) for epoch, seq in kept}
    wait_until(lambda: set(stored_ids(db)) >= wanted, 60)
    assert {(e, s) for _, e, s in stored_ids(db)} == kept


def test_damage_found_while_running_stops_once_and_the_restart_salvages(
        tmp_path, broker, daemons):
    import sqlite3 as _sqlite3

    from edge.outbox import Outbox as _Outbox
    from edge.outbox import Record as _Record
    from tests.harness.daemons import wait_until, write_edge_config

    path = tmp_path / "o.db"
    box = _Outbox(path, "e1")
    box.accept([_Record("s", '{"n": %d}' % i, 1767225600.0) for i in range(3000)],
               segment_records=10)
    box.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    page = _sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    size = path.stat().st_size
    with open(path, "r+b") as f:  # a page in the middle: past the start check
        f.seek((size // page // 2) * page)
        f.write(b"\xde\xad" * (page // 2))
    cfg = write_edge_config(tmp_path / "edge.yaml", edge_id="e1", port=broker.port,
                            outbox=path, spools=[])
    spooler = daemons.spooler(cfg, tmp_path)

    spooler.start()
    assert spooler.wait(30) == 74
    assert "found damaged" in spooler.log_text()
    spooler.start()

    wait_until(lambda: list(tmp_path.glob("o.db.damaged-*")), 30,
               message=spooler.log_tail())
    wait_until(lambda: "connected to" in spooler.log_text().rsplit("salvag", 1)[-1],
               30, message=spooler.log_tail())
    assert spooler.running
    assert not (tmp_path / "o.db.damaged").exists()


def test_ids_lost_with_the_damage_are_reported_as_skipped(tmp_path):
    import sqlite3 as _sqlite3

    from edge.outbox import Outbox as _Outbox
    from edge.outbox import Record as _Record

    path = tmp_path / "o.db"
    box = _Outbox(path, "e1")
    old_epoch = box.epoch
    pad = "p" * 400
    box.accept([_Record("s", '{"n": %d, "pad": "%s"}' % (i, pad), 1767225600.0)
                for i in range(300)], segment_records=50)
    box.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    with open(path, "r+b") as f:  # the second half of the file is gone
        f.truncate(path.stat().st_size // 2)

    fresh = _Outbox(path, "e1")

    kept = {s for (f, n) in fresh.conn.execute(
        "SELECT first_seq, count FROM segments WHERE epoch = ?", (old_epoch,))
        for s in range(f, f + n)}
    lost = {s for r in fresh.skipped_pending() if r.epoch == old_epoch
            for s in range(r.first_seq, r.last_seq + 1)}
    assert lost
    assert kept | lost == set(range(1, 301))
    assert not kept & lost
    assert {r.reason for r in fresh.skipped_pending()} == {
        "lost in a damaged outbox (some may have been stored before)"}

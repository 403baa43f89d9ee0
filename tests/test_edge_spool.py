"""The spool-directory protocol, on SpoolIntake with a real outbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge.config import IntakeConfig, OutboxConfig, SpoolConfig
from edge.outbox import Outbox, decode_body
from edge.spool import CLAIM_DIR, FAILED_DIR, SpoolIntake

EDGE = "pi-017"

# --- fixtures ------------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying at one step of taking a file."""


class CrashBeforeCommit(SpoolIntake):
    """Claims files, then dies before the outbox transaction."""

    def _commit(self, records, claims):
        if claims:
            raise Crash("killed after the claim, before the commit")


class CrashAfterCommit(SpoolIntake):
    """Commits records with their claims, then dies before removing the files."""

    armed = True

    def _remove(self, claims):
        if claims and self.armed:
            raise Crash("killed after the commit, before the removal")
        super()._remove(claims)


@pytest.fixture
def spool_dir(tmp_path) -> Path:
    return tmp_path / "spool" / "readings"


@pytest.fixture
def outbox_path(tmp_path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def outbox(outbox_path):
    box = Outbox(outbox_path, EDGE)
    yield box
    box.close()


@pytest.fixture
def make_intake(outbox, spool_dir):
    """An intake over spool_dir (and any extra spools), prepared."""

    def make(cls=SpoolIntake, *, extra=(), max_file_bytes=16 * 1024 * 1024, box=None):
        spools = [SpoolConfig(str(spool_dir), "readings", max_file_bytes), *extra]
        intake = cls(box or outbox, spools, OutboxConfig(), IntakeConfig())
        intake.prepare()
        return intake

    return make


def produce(folder: Path, name: str, data: bytes | str) -> Path:
    """Write a spool file as producers must: hidden .tmp name, fsync, rename."""
    if isinstance(data, str):
        data = data.encode()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    final = folder / name
    os.rename(tmp, final)
    return final


def stored(box: Outbox) -> list[tuple[str, int, str]]:
    """(stream, seq, payload) of every record in the outbox, by seq."""
    out = []
    for seg in box.segments_after(0, 10**9):
        for i, (_, _, payload) in enumerate(decode_body(seg.body)):
            out.append((seg.stream, seg.first_seq + i, payload))
    return sorted(out, key=lambda r: r[1])


def payloads(box: Outbox) -> list[str]:
    return [p for _, _, p in stored(box)]


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def visible(folder: Path) -> list[str]:
    return [n for n in listing(folder) if n not in (CLAIM_DIR, FAILED_DIR)]


# --- taking files --------------------------------------------------------


def test_prepare_creates_the_spool_claim_and_quarantine_dirs(make_intake, spool_dir):
    make_intake()

    assert (spool_dir / CLAIM_DIR).is_dir()
    assert (spool_dir / FAILED_DIR).is_dir()


def test_a_json_file_is_one_record_with_its_exact_payload(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "r1.json", '{ "t": 21.5,\n  "s": "caf\u00e9", "n": [1, 2] }\n')

    assert intake.scan() == 1

    assert stored(outbox) == [("readings", 1, '{"t":21.5,"s":"caf\u00e9","n":[1,2]}')]
    assert visible(spool_dir) == []
    assert listing(spool_dir / CLAIM_DIR) == []
    assert intake.accepted == 1


def test_a_json_file_of_a_scalar_or_list_is_still_one_record(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "a.json", "[1, 2, 3]")
    produce(spool_dir, "b.json", '"just text"')
    produce(spool_dir, "c.json", "null")

    assert intake.scan() == 3

    assert payloads(outbox) == ["[1,2,3]", '"just text"', "null"]


def test_a_jsonl_file_is_one_record_per_line_skipping_blank_lines(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "batch.jsonl", '{"i": 1}\n\n   \n{"i": 2}\r\n[3]\n\n')

    assert intake.scan() == 3

    assert stored(outbox) == [
        ("readings", 1, '{"i":1}'),
        ("readings", 2, '{"i":2}'),
        ("readings", 3, "[3]"),
    ]
    assert visible(spool_dir) == []


def test_a_jsonl_file_without_a_final_newline_keeps_its_last_line(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "b.jsonl", '{"i":1}\n{"i":2}')

    intake.scan()

    assert payloads(outbox) == ['{"i":1}', '{"i":2}']


@pytest.mark.parametrize(
    "name",
    [
        ".hidden.json",
        ".r2.json.tmp",
        "r3.json.tmp",
        "r4.tmp",
        "notes.txt",
        "data.csv",
        "r5.json.bak",
        "r6.jsonl~",
        "r7.JSON",
        "json",
    ],
)
def test_other_names_are_left_alone(make_intake, outbox, spool_dir, name):
    intake = make_intake()
    path = spool_dir / name
    path.write_text('{"left": "alone"}')

    assert intake.scan() == 0

    assert path.read_text() == '{"left": "alone"}'
    assert payloads(outbox) == []
    assert listing(spool_dir / FAILED_DIR) == []
    assert listing(spool_dir / CLAIM_DIR) == []


def test_every_claimed_file_is_removed_after_the_commit(make_intake, outbox, spool_dir):
    intake = make_intake()
    for i in range(20):
        produce(spool_dir, f"r{i:02}.json", json.dumps({"i": i}))
    produce(spool_dir, "lines.jsonl", '{"l":1}\n{"l":2}\n')

    assert intake.scan() == 22

    assert visible(spool_dir) == []
    assert listing(spool_dir / CLAIM_DIR) == []
    assert sorted(payloads(outbox)) == sorted(
        [json.dumps({"i": i}, separators=(",", ":")) for i in range(20)]
        + ['{"l":1}', '{"l":2}']
    )


def test_one_scan_takes_at_most_batch_files(outbox, spool_dir):
    intake = SpoolIntake(
        outbox,
        [SpoolConfig(str(spool_dir), "readings")],
        OutboxConfig(),
        IntakeConfig(batch_files=3),
    )
    intake.prepare()
    for i in range(7):
        produce(spool_dir, f"r{i}.json", str(i))

    taken = [intake.scan() for _ in range(4)]

    assert taken == [3, 3, 1, 0]
    assert sorted(payloads(outbox)) == [str(i) for i in range(7)]


def test_each_spool_dir_gives_its_own_stream(make_intake, outbox, spool_dir, tmp_path):
    other = tmp_path / "spool" / "events"
    intake = make_intake(extra=[SpoolConfig(str(other), "events")])
    produce(spool_dir, "a.json", '{"r":1}')
    produce(other, "b.jsonl", '{"e":1}\n{"e":2}\n')

    assert intake.scan() == 3

    assert sorted((s, p) for s, _, p in stored(outbox)) == [
        ("events", '{"e":1}'),
        ("events", '{"e":2}'),
        ("readings", '{"r":1}'),
    ]
    assert visible(other) == []


def test_the_file_modification_time_becomes_created_at(make_intake, outbox, spool_dir):
    intake = make_intake()
    path = produce(spool_dir, "old.json", "1")
    os.utime(path, (1767225600.5, 1767225600.5))
    path_unsynced = produce(spool_dir, "boot.json", "2")
    os.utime(path_unsynced, (1000.0, 1000.0))

    intake.scan()

    body = "".join(s.body for s in outbox.segments_after(0, 100))
    assert sorted(decode_body(body)) == [
        (1000.0, True, "2"),
        (1767225600.5, False, "1"),
    ]


def test_claims_of_removed_files_are_forgotten_by_a_later_commit(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "a.json", "1")
    intake.scan()
    produce(spool_dir, "b.json", "2")
    intake.scan()
    produce(spool_dir, "c.json", "3")
    intake.scan()

    assert len(outbox.all_claims()) == 1


# --- quarantine ----------------------------------------------------------


def reason_of(spool_dir: Path, name: str) -> str:
    return (spool_dir / FAILED_DIR / f"{name}.reason").read_text()


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("bad.json", b'{"t": 21.5,', "bad.json is not valid JSON"),
        ("trailing.json", b'{"t": 1} {"t": 2}', "is not valid JSON"),
        ("nan.json", b'{"t": NaN}', "NaN is not valid JSON"),
        ("inf.json", b"[Infinity]", "Infinity is not valid JSON"),
        ("neginf.json", b'{"t": -Infinity}', "Infinity is not valid JSON"),
        ("huge.json", b'{"t": 1e999}', "Out of range float"),
        ("surrogate.json", b'{"s": "\\ud800"}', "lone surrogate"),
        ("latin1.json", b'{"s": "caf\xe9"}', "not valid UTF-8 (byte 10)"),
        ("bom.json", b'\xef\xbb\xbf{"s": 1}', "not valid JSON"),
        ("empty.json", b"", "empty.json is empty"),
        ("blank.json", b" \n\t\n", "blank.json is empty"),
        ("empty.jsonl", b"", "empty.jsonl holds no records"),
        ("blank.jsonl", b"\n\n  \n", "holds no records"),
        ("latin1.jsonl", b'{"a":1}\n{"s": "\xe9"}\n', "line 2 is not valid UTF-8"),
        ("nan.jsonl", b'{"a":1}\n\n{"a":NaN}\n', "nan.jsonl line 3 is not valid JSON"),
        ("deep.json", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
)
def test_a_file_that_is_not_strict_json_is_quarantined_with_its_reason(
    make_intake, outbox, spool_dir, name, data, words
):
    intake = make_intake()
    produce(spool_dir, name, data)
    produce(spool_dir, "good.json", '{"ok": true}')

    assert intake.scan() == 1

    assert payloads(outbox) == ['{"ok":true}']
    assert (spool_dir / FAILED_DIR / name).read_bytes() == data
    assert words in reason_of(spool_dir, name)
    assert visible(spool_dir) == []
    assert listing(spool_dir / CLAIM_DIR) == []
    assert intake.quarantined == 1


def test_a_jsonl_file_with_one_bad_line_is_quarantined_whole(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    data = '{"i":1}\n{"i":2}\n\n{"i":3,}\n{"i":5}\n'
    produce(spool_dir, "mixed.jsonl", data)

    assert intake.scan() == 0

    assert payloads(outbox) == []
    assert (spool_dir / FAILED_DIR / "mixed.jsonl").read_text() == data
    reason = reason_of(spool_dir, "mixed.jsonl")
    assert reason.startswith("mixed.jsonl line 4 is not valid JSON")
    assert reason.endswith("\n") and reason.count("\n") == 1


def test_a_file_over_max_file_bytes_is_quarantined(make_intake, outbox, spool_dir):
    intake = make_intake(max_file_bytes=100)
    produce(spool_dir, "big.json", json.dumps("x" * 99))  # 101 bytes
    produce(spool_dir, "fits.json", json.dumps("x" * 98))  # 100 bytes

    assert intake.scan() == 1

    assert payloads(outbox) == [json.dumps("x" * 98)]
    assert "big.json is 101 bytes, over the limit of 100" in reason_of(
        spool_dir, "big.json"
    )


def test_a_symlink_is_quarantined_and_its_target_is_untouched(
    make_intake, outbox, spool_dir, tmp_path
):
    intake = make_intake()
    target = tmp_path / "secret.json"
    target.write_text('{"secret": 1}')
    (spool_dir / "link.json").symlink_to(target)

    assert intake.scan() == 0

    assert payloads(outbox) == []
    assert (spool_dir / FAILED_DIR / "link.json").is_symlink()
    assert "symbolic link" in reason_of(spool_dir, "link.json")
    assert target.read_text() == '{"secret": 1}'


def test_a_fifo_is_quarantined_without_blocking_intake(make_intake, outbox, spool_dir):
    intake = make_intake()
    os.mkfifo(spool_dir / "pipe.json")
    produce(spool_dir, "good.json", "1")

    assert intake.scan() == 1

    assert (spool_dir / FAILED_DIR / "pipe.json").exists()
    assert "not a regular file" in reason_of(spool_dir, "pipe.json")


def test_a_directory_named_like_a_spool_file_is_quarantined(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    (spool_dir / "x.json").mkdir()
    (spool_dir / "x.json" / "inner.json").write_text("1")

    assert intake.scan() == 0

    assert (spool_dir / FAILED_DIR / "x.json" / "inner.json").read_text() == "1"
    assert "not a regular file" in reason_of(spool_dir, "x.json")
    assert payloads(outbox) == []


def test_two_quarantined_files_of_the_same_name_get_unique_names(
    make_intake, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "bad.json", "first {")
    intake.scan()
    produce(spool_dir, "bad.json", "second {")
    intake.scan()
    produce(spool_dir, "bad.json", "third {")
    intake.scan()

    failed = spool_dir / FAILED_DIR
    assert listing(failed) == [
        "bad.json",
        "bad.json.1",
        "bad.json.1.reason",
        "bad.json.2",
        "bad.json.2.reason",
        "bad.json.reason",
    ]
    assert [(failed / n).read_text() for n in ("bad.json", "bad.json.1")] == [
        "first {",
        "second {",
    ]
    assert (failed / "bad.json.2").read_text() == "third {"
    assert intake.quarantined == 3


# --- crashes and claims --------------------------------------------------


def test_a_file_committed_but_not_removed_is_removed_at_prepare_without_readding(
    make_intake, outbox, spool_dir, outbox_path
):
    crashed = make_intake(CrashAfterCommit)
    produce(spool_dir, "a.json", '{"a":1}')
    produce(spool_dir, "b.jsonl", '{"b":1}\n{"b":2}\n')
    with pytest.raises(Crash):
        crashed.scan()
    assert len(listing(spool_dir / CLAIM_DIR)) == 2
    assert len(payloads(outbox)) == 3

    restarted = Outbox(outbox_path, EDGE)
    make_intake(box=restarted)

    assert listing(spool_dir / CLAIM_DIR) == []
    assert sorted(payloads(restarted)) == ['{"a":1}', '{"b":1}', '{"b":2}']
    assert restarted.all_claims() == set()
    restarted.close()


def test_a_file_claimed_but_not_committed_is_taken_exactly_once_at_prepare(
    make_intake, outbox, spool_dir, outbox_path
):
    crashed = make_intake(CrashBeforeCommit)
    produce(spool_dir, "a.json", '{"a":1}')
    produce(spool_dir, "b.jsonl", '{"b":1}\n{"b":2}\n')
    with pytest.raises(Crash):
        crashed.scan()
    assert len(listing(spool_dir / CLAIM_DIR)) == 2
    assert payloads(outbox) == []

    restarted = Outbox(outbox_path, EDGE)
    intake = make_intake(box=restarted)
    assert intake.scan() == 0
    make_intake(box=restarted).scan()

    assert sorted(payloads(restarted)) == ['{"a":1}', '{"b":1}', '{"b":2}']
    assert listing(spool_dir / CLAIM_DIR) == []
    assert visible(spool_dir) == []
    restarted.close()


def test_a_crash_after_quarantining_keeps_one_quarantined_copy(
    make_intake, outbox, spool_dir
):
    crashed = make_intake(CrashBeforeCommit)
    produce(spool_dir, "bad.json", "{")
    produce(spool_dir, "good.json", "1")
    with pytest.raises(Crash):
        crashed.scan()

    make_intake()

    assert payloads(outbox) == ["1"]
    assert listing(spool_dir / FAILED_DIR) == ["bad.json", "bad.json.reason"]
    assert "bad.json is not valid JSON" in reason_of(spool_dir, "bad.json")
    assert listing(spool_dir / CLAIM_DIR) == []


def test_a_new_file_renamed_over_a_claimed_name_is_its_own_records(
    make_intake, outbox, spool_dir
):
    intake = make_intake()
    produce(spool_dir, "same.json", '{"v":"old"}')
    claims = intake._claim_new(intake.spools[0], 10)
    produce(spool_dir, "same.json", '{"v":"new"}')

    intake._take(claims)

    assert (spool_dir / "same.json").read_text() == '{"v":"new"}'
    assert payloads(outbox) == ['{"v":"old"}']
    assert intake.scan() == 1
    assert payloads(outbox) == ['{"v":"old"}', '{"v":"new"}']
    assert visible(spool_dir) == []


def test_a_new_file_under_the_old_name_survives_settling_a_committed_claim(
    make_intake, outbox, spool_dir, outbox_path
):
    crashed = make_intake(CrashAfterCommit)
    produce(spool_dir, "same.json", '{"v":"old"}')
    with pytest.raises(Crash):
        crashed.scan()
    produce(spool_dir, "same.json", '{"v":"new"}')

    restarted = Outbox(outbox_path, EDGE)
    intake = make_intake(box=restarted)

    assert (spool_dir / "same.json").read_text() == '{"v":"new"}'
    assert listing(spool_dir / CLAIM_DIR) == []
    assert payloads(restarted) == ['{"v":"old"}']
    assert intake.scan() == 1
    assert payloads(restarted) == ['{"v":"old"}', '{"v":"new"}']
    restarted.close()


def test_a_new_file_under_the_old_name_survives_retaking_an_uncommitted_claim(
    make_intake, outbox, spool_dir
):
    crashed = make_intake(CrashBeforeCommit)
    produce(spool_dir, "same.json", '{"v":"old"}')
    with pytest.raises(Crash):
        crashed.scan()
    produce(spool_dir, "same.json", '{"v":"new"}')

    intake = make_intake()

    assert (spool_dir / "same.json").read_text() == '{"v":"new"}'
    assert payloads(outbox) == ['{"v":"old"}']
    assert intake.scan() == 1
    assert payloads(outbox) == ['{"v":"old"}', '{"v":"new"}']


def test_a_name_the_producer_reuses_is_taken_once_each_time_across_a_crash(
    make_intake, outbox, spool_dir, outbox_path
):
    intake = make_intake(CrashAfterCommit)
    intake.armed = False
    produce(spool_dir, "same.json", '{"v":1}')
    intake.scan()
    produce(spool_dir, "same.json", '{"v":2}')
    intake.armed = True
    with pytest.raises(Crash):
        intake.scan()

    restarted = Outbox(outbox_path, EDGE)
    make_intake(box=restarted).scan()

    assert sorted(payloads(restarted)) == ['{"v":1}', '{"v":2}']
    assert listing(spool_dir / CLAIM_DIR) == []
    restarted.close()


def test_two_intakes_never_take_one_file_twice(make_intake, outbox, spool_dir):
    first, second = make_intake(), make_intake()
    for i in range(50):
        produce(spool_dir, f"r{i:02}.json", str(i))

    taken = first.scan() + second.scan() + first.scan()

    assert taken == 50
    assert sorted(payloads(outbox), key=int) == [str(i) for i in range(50)]

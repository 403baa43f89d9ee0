"""scripts/chaos: a small seeded run through every kind of fault ends clean."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAOS = REPO_ROOT / "scripts" / "lib" / "chaos.py"
FAULTS = 6
TIMEOUT_S = 150


def run_chaos(tmp_path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHAOS), "--scratch", str(tmp_path), *options],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO_ROOT,
    )


def table_value(output: str, label: str) -> int:
    found = re.search(rf"^{re.escape(label)}\s+(\d+)", output, re.MULTILINE)
    assert found, f"no {label!r} line in:\n{output}"
    return int(found.group(1))


def test_a_small_chaos_run_stores_every_record_once(tmp_path):
    result = run_chaos(
        tmp_path,
        "--records",
        "3000",
        "--edges",
        "2",
        "--faults",
        str(FAULTS),
        "--fault-every",
        "1.5",
        "--seed",
        "7",
        "--drain-timeout",
        "60",
    )
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    assert "seed 7" in output.splitlines()[0]
    assert table_value(output, "records accepted") == 3000
    assert table_value(output, "records stored") == 3000
    assert table_value(output, "missing") == 0
    assert table_value(output, "duplicated") == 0
    assert table_value(output, "faults injected") == FAULTS
    # Fewer faults than kinds: each is a different kind, one line each.
    kinds = re.findall(r"^  ([a-z-]+)\s+(\d+)$", output, re.MULTILINE)
    assert len(kinds) == FAULTS, output
    assert all(count == "1" for _, count in kinds), output
    assert "OK: every accepted record stored exactly once" in output


def test_chaos_refuses_an_unknown_fault_kind(tmp_path):
    result = run_chaos(tmp_path, "--kinds", "link-cut,meteor")

    assert result.returncode == 64
    assert "unknown fault kinds ['meteor']" in result.stderr

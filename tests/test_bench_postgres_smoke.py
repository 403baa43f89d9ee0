"""scripts/bench --only pg at a tiny size: it exits 0 and prints both rows.

The figures depend on the machine and are not asserted. Without a PostgreSQL
server this skips, or fails when CI is set (the ``postgres_server`` fixture).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = REPO_ROOT / "scripts" / "lib" / "bench.py"
TIMEOUT_S = 120
STOP_TIMEOUT_S = 90
TINY = ["--only", "pg", "--pg-edges", "2", "--pg-records", "1000", "--runs", "1"]


@pytest.fixture(scope="module")
def tiny_run(postgres_server) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), *TINY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, so the bench stops its daemons and drops its databases.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"bench --only pg ran over {TIMEOUT_S} s:\n{stdout}{stderr}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print(result.stdout, result.stderr, sep="\n")
    return result


def test_a_tiny_postgres_bench_exits_zero(tiny_run):
    assert tiny_run.returncode == 0, tiny_run.stdout + tiny_run.stderr


@pytest.mark.parametrize("system,members", [("1 collector", 1), ("share group", 3)])
def test_each_collector_setup_has_a_measured_row(tiny_run, system, members):
    row = rf"^{system}\s+{members}\s+2,000\s+[\d,]+\s+\d+\.\d\d\s+(\d+\.\d\d|n/a)$"
    assert re.search(row, tiny_run.stdout, re.MULTILINE), tiny_run.stdout

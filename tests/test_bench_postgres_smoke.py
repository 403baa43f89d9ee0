"""scripts/bench --only pg at a tiny size: it exits 0 and prints both rows.

The figures depend on the machine and are not asserted. Without a PostgreSQL
server this skips, or fails when CI is set (the ``postgres_server`` fixture).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.harness.bench import run_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 120
TINY = ["--only", "pg", "--pg-edges", "2", "--pg-records", "1000", "--runs", "1"]


@pytest.fixture(scope="module")
def tiny_run(postgres_server) -> subprocess.CompletedProcess:
    return run_bench(TINY, TIMEOUT_S)


def test_a_tiny_postgres_bench_exits_zero(tiny_run):
    assert tiny_run.returncode == 0, tiny_run.stdout + tiny_run.stderr


@pytest.mark.parametrize("system,members", [("1 collector", 1), ("share group", 3)])
def test_each_collector_setup_has_a_measured_row(tiny_run, system, members):
    row = rf"^{system}\s+{members}\s+2,000\s+[\d,]+\s+\d+\.\d\d\s+(\d+\.\d\d|n/a)$"
    assert re.search(row, tiny_run.stdout, re.MULTILINE), tiny_run.stdout

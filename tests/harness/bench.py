"""Running scripts/bench from the suite: its smoke runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT

BENCH = REPO_ROOT / "scripts" / "lib" / "bench.py"
STOP_TIMEOUT_S = 90


def run_bench(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """scripts/bench with ``args``; its output is printed, never asserted here.

    Past ``timeout`` it gets SIGTERM, so it stops the brokers and daemons it
    started (and drops its databases) before the test fails.
    """
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(
            f"bench {' '.join(args)} ran over {timeout:.0f} s:\n{stdout}{stderr}"
        )
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print(result.stdout, result.stderr, sep="\n")
    return result

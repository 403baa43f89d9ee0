"""scripts/bench --quick: every row of the table is printed and it exits 0.

The figures are printed for a person to read; none is asserted, because they
depend on the machine. The emulated-link rows are measured or say why not.
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
SCENARIOS = ("steady", "backlog", "netem steady", "netem backlog")
SYSTEMS = ("ceiling", "bridge default", "bridge tuned", "spoolmq", "spoolmq zlib")


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess:
    # Its own scratch folder under /tmp: pytest's is private to root, and
    # Mosquitto started as root drops to a user that could not enter it.
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, so the bench stops the brokers and daemons it started.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"bench --quick ran over {TIMEOUT_S} s:\n{stdout}{stderr}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print(result.stdout, result.stderr, sep="\n")
    return result


def test_a_quick_bench_exits_zero(quick_run):
    assert quick_run.returncode == 0, quick_run.stdout + quick_run.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_every_system_has_a_row_in_every_scenario(quick_run, scenario, system):
    row = rf"^{re.escape(scenario)}\s+{re.escape(system)}\s+(\S.*)$"
    found = re.search(row, quick_run.stdout, re.MULTILINE)
    assert found, f"no row for {scenario} / {system}:\n{quick_run.stdout}"
    if not scenario.startswith("netem"):
        assert not found.group(1).startswith(("skipped", "failed")), found.group(0)


@pytest.mark.parametrize("ours", ["spoolmq", "spoolmq zlib"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_prints_the_ratios(quick_run, scenario, ours):
    assert re.search(
        rf"^{re.escape(scenario)}\s+ratios: {ours}/bridge tuned \S+ · "
        rf"{ours}/bridge default \S+ · {ours}/ceiling \S+$",
        quick_run.stdout,
        re.MULTILINE,
    ), quick_run.stdout


def test_the_idle_edges_are_measured(quick_run):
    for name in ("edge-spooler", r"edge Mosquitto \(bridge up\)"):
        assert re.search(
            rf"^idle edge, {name}, 3 s: CPU ", quick_run.stdout, re.MULTILINE
        ), quick_run.stdout


def test_bad_options_exit_64():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--skip", "nonsense"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 64, result.stderr
    assert "allowed:" in result.stderr

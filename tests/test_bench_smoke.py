"""scripts/bench --quick: every row of the table is printed and it exits 0.

The figures are printed for a person to read; none is asserted, because they
depend on the machine. The emulated-link rows are measured or say why not.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.harness.bench import run_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 120
SCENARIOS = ("steady", "backlog", "netem steady", "netem backlog")
SYSTEMS = ("ceiling", "bridge default", "bridge tuned", "spoolmq", "spoolmq zlib")


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess:
    # Its own scratch folder under /tmp: pytest's is private to root, and
    # Mosquitto started as root drops to a user that could not enter it.
    return run_bench(["--quick"], TIMEOUT_S)


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
    result = run_bench(["--skip", "nonsense"], 30)
    assert result.returncode == 64, result.stderr
    assert "allowed:" in result.stderr

"""Throughput and edge cost of spoolmq beside plain Mosquitto: scripts/bench.

On this machine and with the same seeded 200-byte JSON records, it measures

  ceiling         mosquitto_pub -q 1 -l -> one Mosquitto -> mosquitto_sub -q 1
  bridge default  mosquitto_pub -> edge Mosquitto =bridge=> core Mosquitto ->
                  mosquitto_sub, max_inflight_messages 20 (Mosquitto's default)
  bridge tuned    the same with max_inflight_messages 0 (unlimited) on both
  spoolmq         Producer.send_many -> edge-spooler run -> Mosquitto ->
                  core-collector run -> SQLite, receipts on, shipped defaults
  spoolmq zlib    the same with publish.codec json+zlib

in a steady state (producer and path running together), draining a backlog
accepted while the path was down, and both again over an emulated link of
100 ms round trip and 1 % loss when this machine can make one. Then it
measures an idle edge. Each figure is the median of --runs runs; runs of
the systems alternate, so drift in the machine hits all alike.
With --pg (or --only pg) it also measures PostgreSQL ingest: a backlog
drain from several spoolers into one collector and into a share group of
three (scripts/lib/bench_postgres.py).

Every broker and daemon is started by this script on 127.0.0.1 or inside
network namespaces it makes, and stopped by PID at the end of its run.
Exits 0 when every measurement not skipped was made, 1 otherwise, 64 on bad
options.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

LIB = Path(__file__).resolve().parent
ROOT = LIB.parents[1]
sys.path[:0] = [str(ROOT), str(LIB)]

import bench_bridge
import bench_netem
import bench_postgres
import bench_spoolmq
from bench_bridge import Result
from bench_procs import (
    RECORD_BYTES,
    BenchError,
    Procs,
    Usage,
    broker_cannot_reach,
    make_records,
    measure_into,
    usage,
    write_lines,
)

from common.exits import Exit

SYSTEMS = ("ceiling", "bridge default", "bridge tuned", "spoolmq", "spoolmq zlib")
CODECS = {"spoolmq": "json", "spoolmq zlib": "json+zlib"}
SCENARIOS = ("steady", "backlog", "netem steady", "netem backlog")
SKIPPABLE = ("ceiling", "bridge", "spoolmq", "steady", "backlog", "netem", "idle")
QUICK = {
    "records": 2000,
    "backlog": 5000,
    "runs": 1,
    "idle_seconds": 3.0,
    "netem_records": 1000,
    "pg_edges": 2,
    "pg_records": 1000,
}
IDLE_SETTLE_S = 1.0


@dataclass
class Cell:
    """The runs of one system in one scenario."""

    results: list[Result] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    def median(self, measure: Callable[[Result], float | None]) -> float | None:
        values = [v for v in map(measure, self.results) if v is not None]
        return statistics.median(values) if values else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 64 (usage) with one line, as spoolmq's commands do."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--records",
        type=int,
        default=100_000,
        help="records per steady-state run (default 100000)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=1_000_000,
        help="records per backlog run (default 1000000)",
    )
    parser.add_argument(
        "--netem-records",
        type=int,
        default=20_000,
        help="records per run over the emulated link, steady and "
        "backlog (default 20000: a lossy 100 ms link is slow)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per system and scenario; medians are printed (default 3)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        help="how long the idle edge is measured (default 60)",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated: " + ", ".join(SKIPPABLE)
    )
    parser.add_argument(
        "--pg",
        action="store_true",
        help="also measure PostgreSQL ingest: a backlog drain from --pg-edges "
        "spoolers into one collector and into a share group of three "
        "(scripts/lib/bench_postgres.py); off by default",
    )
    parser.add_argument(
        "--only",
        choices=["pg"],
        help="measure only this: --only pg is --pg with everything else skipped",
    )
    parser.add_argument(
        "--pg-edges", type=int, default=4, help="edges for --pg (default 4)"
    )
    parser.add_argument(
        "--pg-records",
        type=int,
        default=50_000,
        help="records per edge for --pg (default 50000)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the records (default 1)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one run, 3 s idle: a smoke test",
    )
    parser.add_argument(
        "--scratch",
        help="folder for configs, logs and databases; kept. "
        "Default: a temporary folder, removed at the end",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(SKIPPABLE)
    if unknown:
        parser.error(
            f"--skip: unknown {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(SKIPPABLE)}"
        )
    if args.only == "pg":
        args.pg, args.skip = True, set(SKIPPABLE)
    for key in (
        "records",
        "backlog",
        "netem_records",
        "runs",
        "pg_edges",
        "pg_records",
    ):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so every run still stops what it started.
    signal.signal(signal.SIGTERM, _interrupted)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="spoolmq-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    # Mosquitto started as root drops to its own user, which must reach its
    # folder below this one.
    scratch.chmod(0o755)
    blocked = broker_cannot_reach(scratch / "x")
    if blocked:
        print(
            f"scripts/bench: --scratch {scratch}: the mosquitto user cannot "
            f"enter {blocked}; pick a folder it can reach, such as one "
            "under /tmp",
            file=sys.stderr,
        )
        return Exit.USAGE
    started = datetime.now().astimezone()
    print(
        f"spoolmq bench {started:%Y-%m-%d %H:%M %Z}: {RECORD_BYTES}-byte JSON "
        f"records, seed {args.seed}; {args.runs} run(s) each; "
        f"scratch {scratch}",
        flush=True,
    )
    try:
        cells, notes = measure_all(args, scratch)
        idle = measure_idle(args, scratch)
        pg = bench_postgres.measure(args, scratch) if args.pg else {}
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.only:
        print_table(args, cells, notes)
        print_idle(args, idle)
    if pg:
        bench_postgres.print_table(args, pg)
    failed = [c for c in [*cells.values(), *pg.values()] if c.error] + [
        v for v in idle.values() if isinstance(v, str) and v.startswith("failed")
    ]
    print(
        f"\n{'FAILED: some measurements could not be made' if failed else 'OK'}"
        f"; took {time.monotonic() - START:.0f} s"
    )
    return 1 if failed else 0


START = time.monotonic()


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- The measurements -------------------------------------------------------------


def measure_all(args, scratch: Path) -> tuple[dict, dict]:
    sizes = {
        "steady": args.records,
        "backlog": args.backlog,
        "netem steady": args.netem_records,
        "netem backlog": args.netem_records,
    }
    cells = {(scenario, system): Cell() for scenario in SCENARIOS for system in SYSTEMS}
    notes = {}
    for scenario in SCENARIOS:
        reason = skip_reason(args, scenario)
        for system in SYSTEMS:
            cells[scenario, system].skipped = reason or skip_reason(args, system)
    if all(cell.skipped for cell in cells.values()):
        return cells, notes

    biggest = max(sizes.values())
    records = make_records(biggest, args.seed)
    files = {}
    for count in sorted(set(sizes.values())):
        files[count] = write_lines(scratch / f"records-{count}.jsonl", records[:count])
    del records

    for scenario in ("steady", "backlog"):
        run_scenario(
            args,
            scratch,
            cells,
            scenario,
            files[sizes[scenario]],
            sizes[scenario],
            None,
        )

    netem_wanted = [
        s
        for s in ("netem steady", "netem backlog")
        if any(not cells[s, system].skipped for system in SYSTEMS)
    ]
    if netem_wanted:
        why = bench_netem.unavailable()
        notes["netem"] = why
        if why:
            for scenario in netem_wanted:
                for system in SYSTEMS:
                    cells[scenario, system].skipped = "no emulated link (below)"
        else:
            for scenario in netem_wanted:
                with bench_netem.Netem() as link:
                    run_scenario(
                        args,
                        scratch,
                        cells,
                        scenario,
                        files[sizes[scenario]],
                        sizes[scenario],
                        link,
                    )
    return cells, notes


def skip_reason(args, name: str) -> str | None:
    """Why --skip leaves out a scenario, a system or the idle edge, if it does."""
    # A word names what it is or what it starts: "steady" is the scenario
    # alone, "netem" both over the link, "bridge" both bridges.
    for word in {name, name.split()[0]}:
        if word in args.skip:
            return f"--skip {word}"
    return None


def run_scenario(args, scratch, cells, scenario, records, count, link) -> None:
    for run in range(1, args.runs + 1):
        for system in SYSTEMS:
            cell = cells[scenario, system]
            if cell.skipped or cell.error:
                continue
            workdir = (
                scratch / f"{scenario.replace(' ', '-')}-"
                f"{system.replace(' ', '-')}-{run}"
            )
            print(
                f"  {scenario:<14}{system:<16}run {run}/{args.runs}: "
                f"{count} records ...",
                end="",
                flush=True,
            )
            measured = measure_into(
                cell, run_one, scenario, system, workdir, records, count, link
            )
            if measured and not args.scratch:
                shutil.rmtree(workdir, ignore_errors=True)


def run_one(scenario, system, workdir, records, count, link) -> Result:
    backlog = scenario.endswith("backlog")
    sites = {}
    if link is not None:
        sites = {"edge_site": link.edge, "core_site": link.core}
    if system == "ceiling":
        return bench_bridge.ceiling(workdir, records, count, backlog=backlog, **sites)
    if system.startswith("bridge"):
        return bench_bridge.bridge(
            workdir, records, count, window=system.split()[1], backlog=backlog, **sites
        )
    run = bench_spoolmq.backlog if backlog else bench_spoolmq.steady
    return run(workdir, records, count, codec=CODECS[system], **sites)


def measure_idle(args, scratch: Path) -> dict[str, Usage | str]:
    """CPU and disk writes of connected edges with nothing to send."""
    wanted = {"spoolmq": "spoolmq", "bridge": "bridge tuned"}
    found: dict[str, Usage | str] = {}
    for system, label in wanted.items():
        reason = skip_reason(args, "idle") or skip_reason(args, system)
        if reason:
            found[label] = f"skipped ({reason})"
    todo = [label for label in wanted.values() if label not in found]
    if not todo:
        return found
    print(
        f"  idle edge: {', '.join(todo)} for {args.idle_seconds:g} s ...",
        end="",
        flush=True,
    )
    procs = Procs()
    try:
        pids = {}
        if "spoolmq" in todo:
            pids["spoolmq"] = bench_spoolmq.idle_spooler(
                scratch / "idle-spoolmq", procs
            ).pid
        if "bridge tuned" in todo:
            pids["bridge tuned"] = bench_bridge.idle_bridge(
                scratch / "idle-bridge", procs
            ).pid
        time.sleep(IDLE_SETTLE_S)
        before = {label: usage(pid) for label, pid in pids.items()}
        time.sleep(args.idle_seconds)
        for label, pid in pids.items():
            found[label] = usage(pid) - before[label]
        print(" done", flush=True)
    except BenchError as exc:
        print(f" failed: {exc}", flush=True)
        for label in todo:
            found.setdefault(label, f"failed: {exc}")
    finally:
        procs.stop_all()
    return found


# --- The table --------------------------------------------------------------------

COLUMNS = [
    ("scenario", 14, "<"),
    ("system", 15, "<"),
    ("records", 9, ">"),
    ("records/s", 10, ">"),
    ("edge RSS MB", 12, ">"),
    ("CPU s/100k", 11, ">"),
    ("disk B/rec", 11, ">"),
    ("B/rec-byte", 11, ">"),
]


def print_table(args, cells: dict, notes: dict) -> None:
    print()
    print(_row([name for name, _, _ in COLUMNS]))
    print(_row(["-" * width for _, width, _ in COLUMNS]))
    for scenario in SCENARIOS:
        for system in SYSTEMS:
            print(_cell_row(scenario, system, cells[scenario, system]))
        for system in CODECS:
            print(_ratio_row(scenario, cells, system))
    print()
    print(
        "records/s: steady from the first record published (Mosquitto) or "
        "accepted (spoolmq) to the last one"
    )
    print(
        "  received (mosquitto_sub's exit after N) or stored (the core's SQLite, "
        "polled read-only); backlog from"
    )
    print(
        "  the moment the path opens (core broker started, or edge-spooler "
        "started) until the last."
    )
    print(
        "edge = the edge Mosquitto (bridge; mosquitto_pub not counted) or "
        "edge-spooler + the producer process"
    )
    print(
        "  (spoolmq). RSS: the spooler's or edge broker's VmHWM; CPU: "
        "utime+stime; disk: write_bytes of"
    )
    print(
        "  /proc/<pid>/io, start to end; for a backlog accepting and draining "
        "both. Mosquitto writes its"
    )
    print(
        "  state only at autosave (300 s) and on exit, so a bridge's "
        "figure is what it wrote before the end."
    )
    print(
        "ceiling: one Mosquitto with mosquitto/mosquitto.conf "
        "(max_inflight_messages 200); spoolmq runs on the same."
    )
    print(
        "spoolmq: the shipped defaults (publish.codec json); spoolmq zlib: the "
        "same with publish.codec json+zlib."
    )
    print(
        f"netem: {bench_netem.describe()}; {args.netem_records} records per run."
        + (f" Not measured: {notes['netem']}" if notes.get("netem") else "")
    )
    if notes.get("netem") and "iproute2" in notes["netem"]:
        print(f"  to enable it: {bench_netem.INSTALL_HINT}")


def _row(values: list[str]) -> str:
    return "  ".join(
        f"{v:{align}{width}}" for v, (_, width, align) in zip(values, COLUMNS)
    ).rstrip()


def _cell_row(scenario: str, system: str, cell: Cell) -> str:
    if cell.skipped or cell.error or not cell.results:
        why = (
            cell.skipped
            and f"skipped: {cell.skipped}"
            or f"failed: {cell.error or 'no run'}"
        )
        return _row([scenario, system, why.splitlines()[0]])
    count = cell.results[0].records
    rate = cell.median(lambda r: r.rate)
    edge = [r.edge for r in cell.results if r.edge is not None]
    if not edge:
        extra = ["-"] * 4
    else:
        rss = statistics.median(e.peak_rss_kb for e in edge) / 1024
        cpu = statistics.median(e.cpu_s for e in edge) / count * 100_000
        disk = statistics.median(e.write_bytes for e in edge) / count
        extra = [
            f"{rss:.1f}" if rss else "-",
            f"{cpu:.2f}",
            f"{disk:,.0f}",
            f"{disk / RECORD_BYTES:.2f}",
        ]
    return _row([scenario, system, f"{count:,}", f"{rate:,.0f}", *extra])


def _ratio_row(scenario: str, cells: dict, ours: str = "spoolmq") -> str:
    rate = cells[scenario, ours].median(lambda r: r.rate)
    parts = []
    for baseline in ("bridge tuned", "bridge default", "ceiling"):
        theirs = cells[scenario, baseline].median(lambda r: r.rate)
        value = f"{rate / theirs:.2f}" if rate and theirs else "n/a"
        parts.append(f"{ours}/{baseline} {value}")
    return f"{scenario:<14}  ratios: " + " · ".join(parts)


def print_idle(args, idle: dict) -> None:
    print()
    for label in ("spoolmq", "bridge tuned"):
        value = idle.get(label)
        name = "edge-spooler" if label == "spoolmq" else "edge Mosquitto (bridge up)"
        if isinstance(value, Usage):
            per_min = 60.0 / args.idle_seconds
            print(
                f"idle edge, {name}, {args.idle_seconds:g} s: "
                f"CPU {value.cpu_s:.2f} s ({value.cpu_s * per_min:.2f} s/min), "
                f"disk writes {value.write_bytes:,} B "
                f"({value.write_bytes * per_min:,.0f} B/min), "
                f"RSS {value.peak_rss_kb / 1024:.1f} MB"
            )
        else:
            print(f"idle edge, {name}: {value}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

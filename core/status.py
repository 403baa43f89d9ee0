"""The `status` report: per-edge accounting read from the datastore alone.

Lag is how old an edge's newest stored record was when the core last stored
a batch from that edge: the delivery delay of the freshest data, by the two
clocks. Silence is how long ago that was, by the core's clock now.
"""

from __future__ import annotations

import time

from common.envelope import parse_time
from core.config import StatusConfig
from core.datastore import Datastore

COLUMNS = (
    ("EDGE", "edge_id"),
    ("RECORDS", "records"),
    ("MISSING", "missing"),
    ("DEAD", "dead_letters"),
    ("FIRST SEEN", "first_seen"),
    ("LAST SEEN", "last_seen"),
    ("NEWEST RECORD", "last_created_at"),
    ("LAG S", "lag_s"),
    ("SILENT S", "silent_s"),
)


def build_report(store: Datastore, cfg: StatusConfig, now: float | None = None) -> dict:
    """Totals, one entry per edge, and whether the core looks healthy."""
    now = time.time() if now is None else now
    edges = [_edge_entry(row, cfg, now) for row in store.edge_summary()]
    silent = [edge["edge_id"] for edge in edges if edge["silent"]]
    return {
        "healthy": not silent,
        "datastore": store.url,
        "totals": store.totals(),
        "silent_edges": silent,
        "edges": edges,
    }


def _edge_entry(row: dict, cfg: StatusConfig, now: float) -> dict:
    last_seen = parse_time(row["last_seen"]).timestamp()
    lag = None
    if row["last_created_at"]:
        lag = round(last_seen - parse_time(row["last_created_at"]).timestamp(), 3)
    silent_s = round(max(0.0, now - last_seen), 1)
    silent = cfg.silent_after > 0 and silent_s > cfg.silent_after
    return {**row, "lag_s": lag, "silent_s": silent_s, "silent": silent}


def format_text(report: dict) -> str:
    """The report as a short summary line and an aligned table."""
    totals = report["totals"]
    summary = (
        f"datastore {report['datastore']}: {totals['edges']} edges, "
        f"{totals['records']} records, {totals['dead_letters']} dead letters"
    )
    lines = [summary]
    if report["silent_edges"]:
        lines.append("silent edges: " + ", ".join(report["silent_edges"]))
    if report["edges"]:
        lines.extend(_table(report["edges"]))
    return "\n".join(lines)


def _table(edges: list[dict]) -> list[str]:
    cells = [[title for title, _ in COLUMNS]]
    for edge in edges:
        cells.append(
            ["-" if edge[key] is None else str(edge[key]) for _, key in COLUMNS]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]

"""The `status` report: per-edge accounting read from the datastore alone.

Lag is how old an edge's newest stored record is now: the core's clock now
minus the edge's `created_at`, so it grows while an edge is silent or its
data is held up. Silence is how long ago the core last stored a batch from
the edge, by the core's clock alone.
"""

from __future__ import annotations

import time

from common.envelope import parse_time
from core.config import StatusConfig
from core.datastore import LISTED_RANGES, Datastore

COLUMNS = (
    ("EDGE", "edge_id"),
    ("RECORDS", "records"),
    ("MISSING", "missing"),
    ("SKIPPED", "skipped_seqs"),
    ("DEAD", "dead_letters"),
    ("ONLINE", "online_text"),
    ("SINCE", "online_since"),
    ("FIRST SEEN", "first_seen"),
    ("LAST SEEN", "last_seen"),
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
    lag = silent_s = None
    if row["last_created_at"]:
        lag = round(now - parse_time(row["last_created_at"]).timestamp(), 3)
    if row["last_seen"]:
        silent_s = round(max(0.0, now - parse_time(row["last_seen"]).timestamp()), 1)
    silent = cfg.silent_after > 0 and (silent_s or 0) > cfg.silent_after
    return {
        **row,
        "lag_s": lag,
        "silent_s": silent_s,
        "silent": silent,
    }


def build_gaps_report(store: Datastore, edge_id: str) -> dict:
    """Every missing range of one edge, the skipped ones apart."""
    found = store.edge_gaps(edge_id)
    missing = sum(g["last_seq"] - g["first_seq"] + 1 for g in found["gaps"])
    return {"edge_id": edge_id, "missing": missing, **found}


def format_gaps(report: dict) -> str:
    """One line per range: `EPOCH FIRST-LAST (N)`, skipped ones with reason."""
    lines = [f"edge {report['edge_id']}: {report['missing']} seqs missing"]
    lines += [f"missing {g['epoch']} {_span(g)}" for g in report["gaps"]]
    lines += [
        f"skipped {s['epoch']} {_span(s)} {s['stream']}: {s['reason']}"
        for s in report["skipped"]
    ]
    return "\n".join(lines)


def _span(r: dict) -> str:
    first, last = r["first_seq"], r["last_seq"]
    return f"{first}-{last} ({last - first + 1})" if last > first else f"{first} (1)"


def format_text(report: dict) -> str:
    """The report as a short summary line and an aligned table."""
    totals = report["totals"]
    summary = (
        # Every edge in the table: also those heard from that sent no record.
        f"datastore {report['datastore']}: {len(report['edges'])} edges, "
        f"{totals['records']} records, {totals['dead_letters']} dead letters"
    )
    lines = [summary]
    if report["silent_edges"]:
        lines.append("silent edges: " + ", ".join(report["silent_edges"]))
    if report["edges"]:
        lines.extend(_table(report["edges"]))
    for edge in report["edges"]:
        lines.extend(_details(edge))
    return "\n".join(lines)


def _details(edge: dict) -> list[str]:
    """Per epoch the contiguous prefix; then the first gaps and skips."""
    lines = [
        f"{edge['edge_id']} epoch {p['epoch']}: seq {p['first_seq']}-"
        f"{p['last_seq']}, contiguous to {p['contiguous']}, {p['missing']} missing"
        for p in edge["epochs"]
    ]
    lines += [f"  missing {g['epoch']} {_span(g)}" for g in edge["gaps"]]
    lines += [
        f"  skipped {s['epoch']} {_span(s)}: {s['reason']}" for s in edge["skipped"]
    ]
    if edge["missing"] and len(edge["gaps"]) >= LISTED_RANGES:
        lines.append(f"  (first {LISTED_RANGES} gaps; see core-collector gaps)")
    if edge["skipped_ranges"] > len(edge["skipped"]):
        lines.append(f"  ({edge['skipped_ranges']} skipped ranges in all)")
    return lines


def _table(edges: list[dict]) -> list[str]:
    cells = [[title for title, _ in COLUMNS]]
    for edge in edges:
        edge = {**edge, "online_text": _online_text(edge["online"])}
        cells.append(
            ["-" if edge[key] is None else str(edge[key]) for _, key in COLUMNS]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _online_text(online: bool | None) -> str | None:
    return None if online is None else ("yes" if online else "no")

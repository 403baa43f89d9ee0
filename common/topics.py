"""Topic names and the names that go into them (edge ids, stream names)."""

from __future__ import annotations

import re

# \Z, not $: "$" also matches before a final newline, which would let one in.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
CORE = "_core"


def valid_name(name: str) -> bool:
    """True for a name usable as one topic level: no / + # NUL, 1-64 chars."""
    return bool(NAME_RE.match(name))


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an edge id or stream name, or None if it can."""
    if not isinstance(name, str) or not name:
        return "must not be empty"
    if len(name) > 64:
        return f"is {len(name)} characters long; at most 64"
    if NAME_RE.match(name):
        return None
    bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.-]", c)})
    shown = ", ".join(repr(c) for c in bad) if bad else repr(name[0])
    return (
        "may hold only letters, digits, '_', '.', '-' and start with one of "
        f"the first two; found {shown}"
    )


class Topics:
    """Every topic spoolmq uses, under one prefix."""

    def __init__(self, prefix: str = "spoolmq"):
        self.prefix = prefix

    def data(self, edge_id: str, stream: str) -> str:
        return f"{self.prefix}/{edge_id}/data/{stream}"

    def receipt(self, edge_id: str) -> str:
        return f"{self.prefix}/{edge_id}/receipt"

    def skipped(self, edge_id: str) -> str:
        return f"{self.prefix}/{edge_id}/skipped"

    def status(self, edge_id: str) -> str:
        return f"{self.prefix}/{edge_id}/status"

    def core_session(self) -> str:
        """Retained: the id of the collectors' current broker session."""
        return f"{self.prefix}/{CORE}/session"

    def core_status(self, client_id: str = "+") -> str:
        """Retained per collector: online, or its last will when gone."""
        return f"{self.prefix}/{CORE}/status/{client_id}"

    def all_data(self) -> str:
        return f"{self.prefix}/+/data/+"

    def all_skipped(self) -> str:
        return f"{self.prefix}/+/skipped"

    def all_status(self) -> str:
        return f"{self.prefix}/+/status"

    def parse(self, topic: str) -> tuple[str, str, str | None]:
        """(edge_id, kind, stream or None) of a topic under this prefix."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head:
            raise ValueError(f"topic {topic!r} is not under {self.prefix!r}")
        rest = parts[len(head) :]
        if len(rest) == 3 and rest[1] == "data":
            return rest[0], "data", rest[2]
        if len(rest) == 2:
            return rest[0], rest[1], None
        raise ValueError(f"topic {topic!r} is not a spoolmq topic")

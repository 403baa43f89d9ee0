"""Readings of the ULB "Library 1" sensor network, the project's real data.

Each line of ``R1.txt`` is one reading: nine space-separated fields with
comma decimals. The publisher warns that a sequence number above 999 is
written with a space (``1 000``), making ten tokens; both forms are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from tests.harness import REPO_ROOT

R1_PATH = REPO_ROOT / "data" / "ulb-library1" / "R1.txt"

INT_FIELDS = ("arrival_ms", "node_id", "seq")
FLOAT_FIELDS = (
    "internal_temp",
    "internal_voltage",
    "humidity",
    "temperature",
    "par",
    "tsr",
)
FIELDS = INT_FIELDS + FLOAT_FIELDS

_INTEGER = re.compile(r"\d+")
_COMMA_DECIMAL = re.compile(r"-?\d+(,\d+)?")
# "1 000": a leading group of one to three digits, then exactly three.
_SEQ_HEAD = re.compile(r"[1-9]\d{0,2}")
_SEQ_TAIL = re.compile(r"\d{3}")

Reading = dict[str, int | float]


def parse_line(line: str, line_number: int) -> Reading:
    """Parse one line of R1.txt; raise ValueError naming the line if malformed."""
    tokens = _join_split_seq(line.split(), line_number)
    if len(tokens) != len(FIELDS):
        raise ValueError(
            f"line {line_number}: expected {len(FIELDS)} fields, "
            f"found {len(tokens)}: {line.strip()!r}"
        )
    reading: Reading = {}
    for name, token in zip(INT_FIELDS, tokens[:3], strict=True):
        reading[name] = _parse_int(name, token, line_number)
    for name, token in zip(FLOAT_FIELDS, tokens[3:], strict=True):
        reading[name] = _parse_comma_float(name, token, line_number)
    return reading


def read_readings(path: Path = R1_PATH) -> Iterator[Reading]:
    """Yield every reading of a file, in file order."""
    with path.open(encoding="ascii") as lines:
        for line_number, line in enumerate(lines, start=1):
            yield parse_line(line, line_number)


def _join_split_seq(tokens: list[str], line_number: int) -> list[str]:
    if len(tokens) != len(FIELDS) + 1:
        return tokens
    head, tail = tokens[2], tokens[3]
    if not (_SEQ_HEAD.fullmatch(head) and _SEQ_TAIL.fullmatch(tail)):
        raise ValueError(
            f"line {line_number}: ten fields, but {head!r} {tail!r} is not a "
            f"sequence number written with a thousands space"
        )
    return [*tokens[:2], head + tail, *tokens[4:]]


def _parse_int(name: str, token: str, line_number: int) -> int:
    if not _INTEGER.fullmatch(token):
        raise ValueError(f"line {line_number}: {name} {token!r} is not a whole number")
    return int(token)


def _parse_comma_float(name: str, token: str, line_number: int) -> float:
    if not _COMMA_DECIMAL.fullmatch(token):
        raise ValueError(
            f"line {line_number}: {name} {token!r} is not a comma-decimal number"
        )
    return float(token.replace(",", "."))

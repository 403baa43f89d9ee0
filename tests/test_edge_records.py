"""Producer values to record text: compact, strict, the same on either path."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import pytest

from edge.records import compact


def stdlib_compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@pytest.mark.parametrize(
    "value",
    [
        {"t": 21.5, "tags": ["a", "b"], "ok": True},
        {"s": "café \u2028 \x1f tab\there", "n": -0.0},
        {"missing": None, "v": 1},
        {1: "int key", "x": (1, 2)},
        [2**70, -(2**64), 2**63],
        [],
    ],
)
def test_a_value_is_written_as_the_standard_library_writes_it(value):
    text = compact(value)
    assert text == stdlib_compact(value)
    assert "\n" not in text and "\t" not in text


@pytest.mark.parametrize(
    "value", [math.nan, [math.inf], {"v": -math.inf}, {"v": [1.0, math.nan]}]
)
def test_nan_and_infinity_are_refused_not_written_as_null(value):
    with pytest.raises(ValueError, match="not JSON compliant"):
        compact(value)


def test_a_lone_surrogate_is_refused():
    with pytest.raises(ValueError, match="lone surrogate U\\+D800"):
        compact({"s": "\ud800"})


@dataclasses.dataclass
class Reading:
    v: float


@pytest.mark.parametrize(
    "value", [datetime.datetime(2026, 12, 4), Reading(1.0), {1.5j}, object()]
)
def test_what_the_standard_library_refuses_is_refused(value):
    with pytest.raises(TypeError):
        compact(value)


def test_floats_keep_their_value():
    values = [0.1, 1e-7, 1e16, 5e-324, 1.7976931348623157e308, 123456.789]
    assert json.loads(compact(values)) == values

"""The project's copy of the ULB Library 1 data parses to numbers, line by line."""

from __future__ import annotations

import pytest

from tests.harness.ulb import FIELDS, R1_PATH, parse_line, read_readings

FIRST_LINE = "1163438041250 20 1 21,21 2,81 51,53 22,08 20 28"


def test_the_whole_file_parses_to_exactly_7563_readings():
    readings = list(read_readings())

    assert len(readings) == 7563
    assert all(list(reading) == list(FIELDS) for reading in readings)


def test_the_data_comes_from_the_project_copy():
    assert R1_PATH.parts[-3:] == ("data", "ulb-library1", "R1.txt")


def test_a_line_becomes_nine_numbers_with_comma_decimals():
    reading = parse_line(FIRST_LINE, 1)

    assert reading == {
        "arrival_ms": 1163438041250,
        "node_id": 20,
        "seq": 1,
        "internal_temp": 21.21,
        "internal_voltage": 2.81,
        "humidity": 51.53,
        "temperature": 22.08,
        "par": 20.0,
        "tsr": 28.0,
    }
    assert all(isinstance(reading[name], int) for name in FIELDS[:3])
    assert all(isinstance(reading[name], float) for name in FIELDS[3:])


def test_a_sequence_number_written_with_a_thousands_space_is_joined():
    reading = parse_line("1163438041250 20 1 000 21,21 2,81 51,53 22,08 20 28", 5)

    assert reading["seq"] == 1000
    assert reading["internal_temp"] == 21.21
    assert reading["tsr"] == 28.0


def test_motes_skip_sequence_numbers_as_the_data_readme_says():
    last_seq: dict[int, int] = {}
    gaps = 0
    for reading in read_readings():
        previous = last_seq.get(reading["node_id"])
        if previous is not None and reading["seq"] > previous + 1:
            gaps += 1
        last_seq[reading["node_id"]] = reading["seq"]

    assert len(last_seq) == 19
    assert gaps == 137


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("1163438041250 20 1 21,21 2,81 51,53 22,08 20", "expected 9 fields"),
        ("1163438041250 20 1 21.21 2,81 51,53 22,08 20 28", "internal_temp"),
        ("1163438041250 20 x 21,21 2,81 51,53 22,08 20 28", "seq 'x'"),
        ("1163438041250 20 1 21,21 2,81 51,53 22,08 20 28 9", "thousands space"),
        ("", "expected 9 fields"),
    ],
)
def test_a_bad_line_raises_a_value_error_naming_its_line_number(line, complaint):
    with pytest.raises(ValueError, match=f"^line 42: .*{complaint}"):
        parse_line(line, 42)

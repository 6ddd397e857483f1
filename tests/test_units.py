"""Sizes and durations as people type and read them: what a message shows
can be typed back and means the same."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.job import MAX_BYTES, MAX_RUNTIME, MIN_MEMORY
from corral.units import (
    QUOTE_LIMIT,
    YEAR,
    describe,
    parse_duration,
    parse_size,
    quote,
    short_duration,
    short_number,
    short_size,
)

# The bounds and values corral's messages show.
SIZES = {
    MIN_MEMORY: "8M", MAX_BYTES: "1P", 64 << 10: "64K", 512 << 20: "512M",
    3 << 29: "1.5G", 1536: "1.5K", 5 << 28: "1.25G", 100: "100B", 1025: "1025B",
    (1 << 30) + 1: "1073741825B", 4096: "4K", 2 << 50: "2P",
}  # fmt: skip
DURATIONS = {
    MAX_RUNTIME: "10y", 90.0: "90s", 3600.0: "1h", 7200.0: "2h", 86400.0: "1d", 0.001: "1ms",
    0.25: "250ms", 1.5: "1.5s", 0.3: "300ms", 0.0: "0s", 5400.0: "90m", 1e-5: "0.00001s",
}  # fmt: skip


@pytest.mark.parametrize(("size", "text"), SIZES.items())
def test_sizes_are_shown_short_and_exact(size: int, text: str) -> None:
    assert short_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(("seconds", "text"), DURATIONS.items())
def test_durations_are_shown_short_and_exact(seconds: float, text: str) -> None:
    assert short_duration(seconds) == text
    assert parse_duration(text) == seconds


@given(st.integers(min_value=1, max_value=1 << 70))
def test_any_size_reads_back_as_itself(size: int) -> None:
    assert parse_size(short_size(size)) == size


@given(st.integers(min_value=4, max_value=1 << 20), st.sampled_from([1 << 10, 1 << 20, 1 << 30]))
def test_whole_and_quarter_units_are_never_spelled_out_in_bytes(quarters: int, unit: int) -> None:
    assert not short_size(quarters * unit // 4).endswith("B")


@given(st.floats(min_value=0, max_value=100 * YEAR, allow_nan=False, allow_infinity=False))
def test_any_duration_reads_back_as_itself(seconds: float) -> None:
    text = short_duration(seconds)
    assert parse_duration(text) == seconds, text
    assert "e" not in text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_have_no_exponent_and_read_back(value: float) -> None:
    text = short_number(value)
    assert float(text) == value
    assert "e" not in text


def test_what_is_not_a_valid_amount_is_still_readable() -> None:
    assert short_size(0) == "0B"
    assert short_duration(-1.0) == "-1s"
    assert short_duration(float("nan")) == "nan"
    assert short_number(float("inf")) == "inf"
    assert short_number(3) == "3"


@pytest.mark.parametrize(
    ("text", "size"),
    [("256M", 256 << 20), ("1.1K", 1126), ("100b", 100), ("2 GiB", 2 << 30), ("1.5G", 3 << 29)],
)
def test_sizes_parse_exactly(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_sizes_of_digits_past_a_float_are_exact() -> None:
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size("9007199254740993K") == (2**53 + 1) << 10


# -- values in messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("relative/path", "'relative/path'"),
        (b"p\xffath", "'p\\xffath'"),  # a byte that is not UTF-8, as a person writes it
        ("p\udcffath", "'p\\xffath'"),  # the same byte, as os.fsdecode gives it
        ("caf\u00e9", "'caf\u00e9'"),  # printable: as it is
        ("two\nlines\t\x00", "'two\\nlines\\t\\x00'"),  # a message stays one line
        ("it's", '"it\'s"'),
    ],
)
def test_text_is_quoted_as_a_person_writes_it(text: str | bytes, shown: str) -> None:
    assert quote(text) == shown


def test_long_text_is_cut_short_saying_how_long() -> None:
    assert quote("x" * 5000) == f"'{'x' * QUOTE_LIMIT}...' (5000 characters)"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"), (True, "true"), (False, "false"), (3, "3"), (1.5, "1.5"),
        (1024.0, "1024.0"), (float("nan"), "nan"), ("1G", "'1G'"), (b"/x", "'/x'"),
        ([1], "a list"), ((1,), "a list"), ({"a": 1}, "a map"), (object(), "an object"),
    ],
)  # fmt: skip
def test_values_are_described_without_python(value: object, shown: str) -> None:
    assert describe(value) == shown

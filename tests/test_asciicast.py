"""A job's output as an asciicast v2 recording: the header, "o" events with
whole characters, "r" events, times relative and non-decreasing, corral's
notes left out, every line JSON; asciinema itself reads it where installed."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.client.asciicast import AsciicastWriter
from corral.records import STREAM_MARKER, STREAM_STDERR, STREAM_STDOUT, Record

START = 1_700_000_000_123_456_789  # ns: 2023-11-14T22:13:20.123456789Z
SECOND = 1_000_000_000


def out(at: float, data: bytes, stream: int = STREAM_STDOUT) -> Record:
    """A record `at` seconds after START."""
    return Record(stream, START + round(at * SECOND), data)


def resize(at: float, columns: int, rows: int) -> Record:
    return Record(STREAM_MARKER, START + round(at * SECOND), {"resize": [columns, rows]})


def cast(records: list[Record], **options: Any) -> list[Any]:
    """The recording's lines, each parsed: the header, then the events."""
    text = io.StringIO()
    writer = AsciicastWriter(text, **options)
    writer.feed(records)
    writer.close()
    written = text.getvalue()
    assert written.endswith("\n")
    return [json.loads(line) for line in written.splitlines()]


def test_the_header_takes_its_size_from_a_first_resize_marker() -> None:
    header, *events = cast([resize(0, 132, 43), out(0.5, b"hi")])
    assert header == {"version": 2, "width": 132, "height": 43, "timestamp": 1_700_000_000}
    assert events == [[0.5, "o", "hi"]]  # the first size makes no "r" event


def test_without_a_first_resize_the_header_has_the_given_size() -> None:
    header, *_ = cast([out(0, b"x"), resize(1, 100, 30)], size=(120, 40))
    assert (header["width"], header["height"]) == (120, 40)
    assert cast([out(0, b"x")])[0]["width"] == 80  # and 80x24 by default
    assert cast([out(0, b"x")])[0]["height"] == 24


def test_the_header_carries_command_term_and_title_when_given() -> None:
    header, *_ = cast([out(0, b"x")], command="bash -l", term="xterm-256color", title="job 1")
    assert header["command"] == "bash -l"
    assert header["env"] == {"TERM": "xterm-256color"}
    assert header["title"] == "job 1"
    assert set(cast([out(0, b"x")])[0]) == {"version", "width", "height", "timestamp"}


def test_times_count_from_the_first_record_in_microseconds() -> None:
    _, *events = cast([out(0, b"a"), out(1.2345678, b"b"), out(61, b"c")])
    assert events == [[0.0, "o", "a"], [1.234568, "o", "b"], [61.0, "o", "c"]]


def test_times_count_from_start_ns_when_given() -> None:
    header, *events = cast([out(2.5, b"a")], start_ns=START - 3 * SECOND)
    assert header["timestamp"] == 1_699_999_997
    assert events == [[5.5, "o", "a"]]


def test_times_never_go_backwards() -> None:
    _, *events = cast([out(0, b"a"), out(2, b"b"), out(1, b"c"), resize(0.5, 90, 20)])
    assert [event[0] for event in events] == [0.0, 2.0, 2.0, 2.0]
    _, *events = cast([out(1, b"early")], start_ns=START + 5 * SECOND)
    assert events == [[0.0, "o", "early"]]  # before the start is at the start


def test_a_character_cut_across_two_records_is_whole_in_one_event() -> None:
    snowman = "☃".encode()
    _, *events = cast([out(0, b"a" + snowman[:1]), out(1, snowman[1:]), out(2, b"b")])
    assert events == [[0.0, "o", "a"], [1.0, "o", "☃"], [2.0, "o", "b"]]


def test_a_record_that_is_only_part_of_a_character_makes_no_event() -> None:
    euro = "€".encode()
    _, *events = cast([out(0, euro[:1]), out(1, euro[1:2]), out(2, euro[2:])])
    assert events == [[2.0, "o", "€"]]


def test_a_cut_character_on_stdout_survives_stderr_in_between() -> None:
    snowman = "☃".encode()
    records = [out(0, snowman[:2]), out(1, b"err", STREAM_STDERR), out(2, snowman[2:])]
    _, *events = cast(records)
    assert events == [[1.0, "o", "err"], [2.0, "o", "☃"]]


def test_bytes_that_are_not_utf8_are_replaced() -> None:
    _, *events = cast([out(0, b"ok \xff\xfe ok")])
    assert events == [[0.0, "o", "ok \ufffd\ufffd ok"]]


def test_a_character_cut_short_at_the_end_is_replaced_on_close() -> None:
    _, *events = cast([out(0, b"x"), out(3, "☃".encode()[:2])])
    assert events == [[0.0, "o", "x"], [3.0, "o", "\ufffd"]]


def test_stdout_and_stderr_are_both_output() -> None:
    _, *events = cast([out(0, b"out\n"), out(1, b"err\n", STREAM_STDERR)])
    assert events == [[0.0, "o", "out\n"], [1.0, "o", "err\n"]]


def test_later_resizes_are_r_events_as_columns_x_rows() -> None:
    _, *events = cast([resize(0, 80, 24), out(1, b"a"), resize(2, 100, 30), resize(3, 40, 10)])
    assert events == [[1.0, "o", "a"], [2.0, "r", "100x30"], [3.0, "r", "40x10"]]


def test_dropped_bytes_markers_and_malformed_resizes_are_skipped() -> None:
    records = [
        out(0, b"a"),
        Record(STREAM_MARKER, START + SECOND, {"dropped_bytes": 4096}),
        Record(STREAM_MARKER, START + SECOND, {"resize": "wide"}),
        Record(STREAM_MARKER, START + SECOND, {"resize": [0, 24]}),
        out(2, b"b"),
    ]
    _, *events = cast(records)
    assert events == [[0.0, "o", "a"], [2.0, "o", "b"]]


def test_a_first_dropped_marker_starts_the_recording_with_the_default_size() -> None:
    header, *events = cast(
        [Record(STREAM_MARKER, START, {"dropped_bytes": 10}), resize(1, 90, 30), out(2, b"x")]
    )
    assert (header["width"], header["height"]) == (80, 24)
    assert events == [[1.0, "r", "90x30"], [2.0, "o", "x"]]


def test_an_empty_recording_is_a_header_alone() -> None:
    assert cast([], size=(100, 50), start_ns=START) == [
        {"version": 2, "width": 100, "height": 50, "timestamp": 1_700_000_000}
    ]
    assert cast([]) == [{"version": 2, "width": 80, "height": 24}]  # no start: no time


def test_records_may_come_in_many_feeds_and_close_twice_is_fine() -> None:
    text = io.StringIO()
    writer = AsciicastWriter(text)
    writer.feed([out(0, b"a")])
    writer.feed([])
    writer.feed([out(1, b"b")])
    writer.close()
    writer.close()
    assert text.getvalue().count("\n") == 3
    with pytest.raises(ValueError, match="closed"):
        writer.feed([out(2, b"c")])


def test_control_characters_and_escapes_survive_as_json() -> None:
    data = b'\x1b[31mred\x1b[0m\r\n\t"quoted" \\ \x00'
    _, *events = cast([out(0, data)])
    assert events == [[0.0, "o", data.decode()]]


TIMES = st.integers(START - SECOND, START + 100 * SECOND)
MARKERS = st.builds(
    Record,
    st.just(STREAM_MARKER),
    TIMES,
    st.one_of(
        st.builds(lambda c, r: {"resize": [c, r]}, st.integers(1, 500), st.integers(1, 200)),
        st.builds(lambda n: {"dropped_bytes": n}, st.integers(1, 1 << 20)),
    ),
)
# Bytes from a few characters' pieces, so characters are often cut between records.
PIECES = st.binary(max_size=8) | st.sampled_from([b"\xe2", b"\x98", b"\x83", b"\xf0\x9f", b"a"])


def recording(records: list[Record]) -> tuple[dict[str, Any], list[list[Any]]]:
    text = io.StringIO()
    writer = AsciicastWriter(text)
    writer.feed(records)
    writer.close()
    lines = text.getvalue().split("\n")
    assert lines[-1] == ""  # every line ends in a newline
    header, *events = (json.loads(line) for line in lines[:-1])
    return header, events


@given(
    records=st.lists(
        MARKERS | st.builds(Record, st.sampled_from([STREAM_STDOUT, STREAM_STDERR]), TIMES, PIECES),
        max_size=20,
    )
)
def test_every_line_is_json_and_times_never_decrease(records: list[Record]) -> None:
    header, events = recording(records)
    assert header["version"] == 2
    times = [event[0] for event in events]
    assert times == sorted(times)
    assert all(time >= 0 and round(time, 6) == time for time in times)
    assert all(event[1] in ("o", "r") and event[2] != "" for event in events)


@given(records=st.lists(MARKERS | st.builds(Record, st.just(STREAM_STDOUT), TIMES, PIECES)))
def test_the_output_is_all_there_decoded_as_one_text(records: list[Record]) -> None:
    _, events = recording(records)
    data = b"".join(r.data for r in records if isinstance(r.data, bytes))
    assert "".join(e[2] for e in events if e[1] == "o") == data.decode(errors="replace")


@pytest.mark.skipif(
    importlib.util.find_spec("asciinema") is None, reason="asciinema is not installed"
)
def test_asciinema_cat_reads_the_recording(tmp_path: Path) -> None:
    path = tmp_path / "job.cast"
    snowman = "☃".encode()
    with path.open("w", encoding="utf-8") as file:
        writer = AsciicastWriter(file, command="sh", term="xterm")
        writer.feed([resize(0, 100, 30), out(0.1, b"hello " + snowman[:1])])
        writer.feed([out(0.2, snowman[1:] + b"\r\n"), resize(0.3, 120, 40), out(0.4, b"bye\r\n")])
        writer.close()
    shown = subprocess.run(
        [sys.executable, "-m", "asciinema", "cat", str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert shown == "hello ☃\r\nbye\r\n".encode()

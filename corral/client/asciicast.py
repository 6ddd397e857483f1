"""A job's output as an asciicast v2 recording (asciinema's format), for
`corral logs --asciicast ID`: play it with `asciinema play`.

The first line is a JSON header, {"version": 2, "width": W, "height": H,
"timestamp": ...}; then one JSON array a line: [seconds, "o", text] for
output, [seconds, "r", "COLSxROWS"] for a resize, seconds counted from the
start of the recording. What is recorded: stdout and stderr (both "o": a
terminal shows them in one place) and the terminal's size. What is not:
the job's input, never (it carries passwords, and corral does not keep it),
and corral's notes, such as output dropped at the log's size cap.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any, TextIO

from corral.records import STREAM_MARKER, STREAM_STDERR, STREAM_STDOUT, Record

ASCIICAST_VERSION = 2
DEFAULT_SIZE = (80, 24)  # columns, rows: what a terminal of unknown size is taken to be


class AsciicastWriter:
    """Records in, asciicast lines out to `out`. The header is written with
    the first record (or by `close`, for an empty recording): its size is
    the first record's if that is a resize marker, else `size`. Times count
    from `start_ns`, else from the first record, and never go backwards."""

    def __init__(
        self,
        out: TextIO,
        *,
        size: tuple[int, int] = DEFAULT_SIZE,
        start_ns: int | None = None,
        command: str | None = None,
        term: str | None = None,
        title: str | None = None,
    ) -> None:
        self.out = out
        self.size = size
        self.start_ns = start_ns
        self.command = command
        self.term = term
        self.title = title
        self._started = False
        self._closed = False
        self._last_us = 0  # the last event's time, microseconds from the start
        # One decoder a stream: a character cut by the other stream's output stays whole.
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for stream in (STREAM_STDOUT, STREAM_STDERR)
        }
        # When each stream's last bytes came: a character they held is flushed then.
        self._fed_ns: dict[int, int | None] = dict.fromkeys(self._decoders)

    def feed(self, records: Iterable[Record]) -> None:
        """Write the events `records` make. ValueError after `close`."""
        if self._closed:
            raise ValueError("the asciicast recording is closed")
        for record in records:
            if not self._started:
                self._start(record)
                if _resize(record) is not None:
                    continue  # the header's size
            if isinstance(record.data, dict):
                size = _resize(record)
                if size is not None:
                    self._event(record.time_ns, "r", f"{size[0]}x{size[1]}")
                continue  # other notes (dropped bytes) are not the terminal's
            decoder = self._decoders.get(record.stream)
            if decoder is not None:
                self._fed_ns[record.stream] = record.time_ns
                self._output(record.time_ns, decoder.decode(record.data))

    def close(self) -> None:
        """Write what the decoders hold (a character cut short is U+FFFD),
        and the header if nothing else was written. `out` stays open."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self._write_header(self.size)
        for stream, decoder in self._decoders.items():
            self._output(self._fed_ns[stream], decoder.decode(b"", final=True))
        self.out.flush()

    def _start(self, first: Record) -> None:
        self._started = True
        if self.start_ns is None:
            self.start_ns = first.time_ns
        self._write_header(_resize(first) or self.size)

    def _write_header(self, size: tuple[int, int]) -> None:
        header: dict[str, Any] = {"version": ASCIICAST_VERSION, "width": size[0], "height": size[1]}
        if self.start_ns is not None:  # an empty recording without a start has no time
            header["timestamp"] = self.start_ns // 1_000_000_000
        if self.command is not None:
            header["command"] = self.command
        if self.term is not None:
            header["env"] = {"TERM": self.term}
        if self.title is not None:
            header["title"] = self.title
        self._write_line(header)

    def _output(self, time_ns: int | None, text: str) -> None:
        if text:  # a piece of a character, held by the decoder, makes no event yet
            self._event(time_ns, "o", text)

    def _event(self, time_ns: int | None, code: str, data: str) -> None:
        """One event line; at `time_ns`, or at the last event's time if that
        is later or `time_ns` is None."""
        if time_ns is not None and self.start_ns is not None:
            since = max(time_ns - self.start_ns, 0)
            self._last_us = max(self._last_us, (since + 500) // 1000)
        self._write_line([self._last_us / 1_000_000, code, data])

    def _write_line(self, value: object) -> None:
        self.out.write(json.dumps(value, ensure_ascii=False) + "\n")


def _resize(record: Record) -> tuple[int, int] | None:
    """(columns, rows) of a resize marker, or None for any other record."""
    if record.stream != STREAM_MARKER or not isinstance(record.data, dict):
        return None
    match record.data.get("resize"):
        case [int(columns), int(rows)] if columns > 0 and rows > 0:
            return columns, rows
    return None

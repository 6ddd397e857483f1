"""What the shell prints: output drawn around the prompt (`Screen`), and a
background follow's output cut into lines prefixed with its job's id
(`PrefixedLines`)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from corral.client.jobs import JobInfo
from corral.records import STREAM_STDERR, STREAM_STDOUT, Record
from corral.units import rfc3339

# A background line with no newline this long is printed as it is, not held on to.
MAX_LINE = 64 << 10


class Screen:
    """Output for the trio thread, drawn around the prompt when it is shown."""

    def __init__(self, prompt: str, redraw: bool) -> None:
        self.prompt = prompt
        self.redraw = redraw  # stdin and stdout are a terminal readline draws on
        self.prompt_shown = False  # set by the main thread around input()

    def write(self, text: str, target: TextIO | None = None) -> None:
        target = target or sys.stdout
        if not (self.redraw and self.prompt_shown):
            target.write(text)
            target.flush()
            return
        sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()
        target.write(text)
        target.flush()
        import readline  # noqa: PLC0415 - loaded by run_shell, after its SIGWINCH handler

        sys.stdout.write(self.prompt + readline.get_line_buffer())
        sys.stdout.flush()

    def error(self, text: str) -> None:
        self.write(text, sys.stderr)


class PrefixedLines:
    """Cuts a job's output into whole lines prefixed with its short id:
    `[3f2a9c0d1e2f] line` for stdout, `[3f2a9c0d1e2f stderr] line` for stderr."""

    def __init__(self, job: JobInfo, args: argparse.Namespace) -> None:
        self._id = job.short_id
        self._timestamps = bool(args.timestamps)
        self._streams = {STREAM_STDOUT, STREAM_STDERR}
        if args.stdout:
            self._streams.discard(STREAM_STDERR)
        if args.stderr:
            self._streams.discard(STREAM_STDOUT)
        self._partial: dict[int, bytes] = {}

    def feed(self, record: Record) -> tuple[int, str]:
        """The stream the text belongs to, and the text (maybe empty)."""
        if isinstance(record.data, dict):
            dropped = record.data.get("dropped_bytes")
            if not dropped:
                return STREAM_STDERR, ""
            why = record.data.get("error") or "the job's log reached its size cap"
            return STREAM_STDERR, f"[{self._id}] {dropped} bytes were not kept: {why}\n"
        if record.stream not in self._streams:
            return record.stream, ""
        data = self._partial.pop(record.stream, b"") + record.data
        *lines, rest = data.split(b"\n")
        if len(rest) >= MAX_LINE:
            lines.append(rest)
        elif rest:
            self._partial[record.stream] = rest
        text = "".join(self._line(record.stream, record.time_ns, line) for line in lines)
        return record.stream, text

    def rest(self) -> list[tuple[int, str]]:
        """What is left of each stream's last, unfinished line."""
        ends = [(stream, self._line(stream, 0, data)) for stream, data in self._partial.items()]
        self._partial.clear()
        return ends

    def _line(self, stream: int, time_ns: int, data: bytes) -> str:
        stamp = f"{rfc3339(time_ns)} " if self._timestamps and time_ns else ""
        tag = " stderr" if stream == STREAM_STDERR else ""
        return f"[{self._id}{tag}] {stamp}{data.decode(errors='replace')}\n"

"""A job's output written out by the CLI: stdout's bytes to our stdout,
stderr's to our stderr, unchanged, or JSON lines; and what a follow does
when its connection is lost. A reader of ours that goes away (`corral logs
ID | head -1`) ends the follow with `OutputClosed`, not a traceback.

Both followers of a job's output use it: `corral.client.follow` (trio: the
shell, `logs`) and `corral.client.oneshot` (`run`, blocking). Nothing here
imports trio.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import sys
from collections.abc import Sequence
from typing import IO, Any, TextIO

from corral.client.errors import ConnectError, CorralError, ServerError
from corral.client.jobs import JobInfo
from corral.protocol import ErrorCode
from corral.records import STREAM_STDERR, STREAM_STDOUT, Record, RecordDecoder
from corral.units import rfc3339

# A follower exists to see the whole output: a corrald restarting (an
# upgrade with --keep-jobs, a crash) should not cut it. A minute covers a
# restart; longer is a flag away.
RECONNECT_FOR = 60.0
RECONNECT_BACKOFF = 2.0  # seconds between tries, at most


class OutputClosed(Exception):
    """Whoever reads our stdout or stderr has gone (a pipe's reader exited)."""


class JobOutput:
    """Where a job's records go: stdout's bytes to our stdout, stderr's to
    our stderr, unchanged; markers as a note on stderr. With timestamps,
    each line starts with the time of the record it began in."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        out.flush()
        self.streams: dict[int, IO[bytes]] = {
            STREAM_STDOUT: getattr(out, "buffer", sys.stdout.buffer),
            STREAM_STDERR: sys.stderr.buffer,
        }
        if getattr(args, "stdout", False):
            del self.streams[STREAM_STDERR]
        if getattr(args, "stderr", False):
            del self.streams[STREAM_STDOUT]
        self.timestamps = bool(getattr(args, "timestamps", False))
        self.json = out if getattr(args, "json", False) else None
        self._line_start = {STREAM_STDOUT: True, STREAM_STDERR: True}

    def write(self, records: Sequence[Record], job_id: str) -> None:
        """Write the records out; OutputClosed if our reader has gone."""
        try:
            self._write(records, job_id)
        except BrokenPipeError:
            raise OutputClosed from None

    def _write(self, records: Sequence[Record], job_id: str) -> None:
        if self.json is not None:
            self._write_json(records)
            return
        touched = set()
        for record in records:
            if isinstance(record.data, dict):
                self.note(record.data, job_id)
                continue
            target = self.streams.get(record.stream)
            if target is None:
                continue
            if self.timestamps:
                self._write_stamped(target, record.stream, record.time_ns, record.data)
            else:
                target.write(record.data)
            touched.add(target)
        for target in touched:
            target.flush()

    def _write_stamped(self, target: IO[bytes], stream: int, time_ns: int, data: bytes) -> None:
        """`data` with the time before each line that begins in it (as
        `docker logs -t`): a line written in pieces is stamped once."""
        stamp = f"{rfc3339(time_ns)} ".encode()
        for line in data.splitlines(keepends=True):
            if self._line_start[stream]:
                target.write(stamp)
            target.write(line)
            self._line_start[stream] = line.endswith(b"\n")

    def _write_json(self, records: Sequence[Record]) -> None:
        """One JSON object per record: its stream, time and data (text when
        it is UTF-8, else `data_base64`); corral's notes as `note`."""
        assert self.json is not None
        for record in records:
            line: dict[str, Any] = {"time": rfc3339(record.time_ns)}
            if isinstance(record.data, dict):
                line.update(stream="corral", note=record.data)
            elif record.stream in self.streams:
                line["stream"] = "stdout" if record.stream == STREAM_STDOUT else "stderr"
                try:
                    line["data"] = record.data.decode()
                except UnicodeDecodeError:
                    line["data_base64"] = base64.b64encode(record.data).decode()
            else:
                continue
            self.json.write(_json_line(line))
        self.json.flush()

    def end(self, offset: int, job: JobInfo | None) -> None:
        """With --json, a last line: where the stream ended, and the job then."""
        if self.json is not None and job is not None:
            end = {"offset": offset, "job": job.to_json()}
            try:
                self.json.write(_json_line({"end": end}))
                self.json.flush()
            except BrokenPipeError:
                raise OutputClosed from None

    @staticmethod
    def note(marker: dict[str, Any], job_id: str) -> None:
        dropped = marker.get("dropped_bytes")
        if dropped:
            why = marker.get("error") or "the job's log reached its size cap"
            note(f"{dropped} bytes of job {job_id[:12]}'s output were not kept: {why}")


def _json_line(value: Any) -> str:
    import json  # noqa: PLC0415 - only --json needs it: a one-shot command's milliseconds

    return json.dumps(value, sort_keys=True) + "\n"


class LogWriter:
    """One stream of a job's log written out: its bytes decoded into
    records, each written once it is whole. A stream starts on a record
    (corrald refuses other offsets), so each gets a writer of its own;
    `offset` is where the first record not yet written whole begins: the
    stream's end once the job has ended, else where the next stream starts
    (a record half-written now is read then)."""

    def __init__(self, output: JobOutput, job_id: str, offset: int) -> None:
        self.output = output
        self.job_id = job_id
        self.offset = offset
        self._start = offset
        self._decoder = RecordDecoder()

    def write(self, data: bytes) -> None:
        """Write the records `data` completes; ServerError if the log is
        damaged, OutputClosed if our reader has gone."""
        try:
            records = self._decoder.feed(data)
        except ValueError as exc:
            message = f"the job's log is damaged: {exc}"
            raise ServerError(ErrorCode.INTERNAL, message) from None
        self.output.write(records, self.job_id)
        self.offset = self._start + self._decoder.consumed


def is_connection_loss(exc: CorralError) -> bool:
    """A lost connection, or corrald going away: worth reconnecting for."""
    if isinstance(exc, ServerError):
        return exc.code is ErrorCode.UNAVAILABLE
    return isinstance(exc, ConnectError)


def note(text: str) -> None:
    """One line for the person on stderr, `corral: ...`."""
    with contextlib.suppress(BrokenPipeError):  # nobody reads it: nothing to say
        sys.stderr.write(f"corral: {text}\n")
        sys.stderr.flush()

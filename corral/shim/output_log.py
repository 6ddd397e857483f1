"""output.log: the job's stdout and stderr as msgpack records, capped in size.

Each record is `[stream, timestamp_ns, bytes]` (`corral.records`), or a
marker `[0, timestamp_ns, {...}]` of corral's (a terminal's size, what was
dropped); readers in corrald follow the file by its size.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from corral.records import STREAM_MARKER
from corral.shim import libc
from corral.store import FULL_ERRNOS, pack

# One read of a job's pipe: what a pipe holds by default, and then some.
READ_SIZE = 64 * 1024
# Room kept below the log cap for the final "dropped" marker record, error and all.
MARKER_RESERVE = 128
# The log's blocks are allocated this far past its end: a call per two full
# reads of a pipe, and little room held aside by each running job.
ALLOCATE_AHEAD = 128 * 1024


def now_ns() -> int:
    """Wall-clock time for records and statuses, in ns since the epoch."""
    return time.time_ns()


def _allocate_past_end(fd: int, offset: int, length: int) -> None:
    """Allocate blocks for `length` bytes from `offset`, leaving the file's
    size (and so what readers see) as it is."""
    libc.fallocate(fd, libc.FALLOC_FL_KEEP_SIZE, offset, length)


class OutputLog:
    """output.log: append-only msgpack records, capped in size, never torn.

    Theory of operation. Readers follow the log by its size, so no record
    may be seen in part. Blocks for records are allocated past the end
    first (FALLOC_FL_KEEP_SIZE leaves the size alone), ALLOCATE_AHEAD at a
    time or, short of that, just what the next record needs; a write into
    them cannot run out of room. When even that fails the filesystem is
    full: that record and every later one are dropped and counted, so the
    log is a clean prefix of the output, and `close` appends a marker
    saying how much was dropped and why. Logging does not resume if room
    comes back during the job, so the log stays that prefix, as the job's
    reason says ("output from byte N on was dropped"); resuming would need
    a marker in the middle of the log, where the hole is. A filesystem that
    cannot allocate ahead gets plain writes, a short one taken back (a
    reader may then glimpse the torn record before it goes).
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.allocated = self.size  # blocks are allocated up to here
        self.can_allocate = True
        self.limit = limit
        self.relayed = 0  # bytes of output, kept or not
        self.dropped = 0
        self.error: str | None = None  # why logging stopped
        self.error_at = 0  # the byte of output it stopped at

    def append(self, stream: int, data: bytes) -> None:
        """Log one read of the job's output, or count it as dropped."""
        offset = self.relayed
        self.relayed += len(data)
        if self.error is None:
            record = pack([stream, now_ns(), data])
            # Over the cap, this record goes; a smaller one may still fit.
            if self.size + len(record) <= self.limit - MARKER_RESERVE:
                self.error = self._write(record)
                if self.error is None:
                    return
                self.error_at = offset
        self.dropped += len(data)

    def mark(self, marker: dict[str, Any]) -> None:
        """Log a corral marker (a terminal's size, say): it counts towards
        the size cap like any record, but is no output. One that finds no
        room (the cap, a full disk) is left out, and the log is as it was:
        the output's next record meets the full disk for itself."""
        if self.error is None:
            record = pack([STREAM_MARKER, now_ns(), marker])
            if self.size + len(record) <= self.limit - MARKER_RESERVE:
                self._write(record)

    def loss(self) -> str | None:
        """What output was dropped and why, in a few words; None if none was."""
        if self.error is not None:
            return f"output from byte {self.error_at} on was dropped: {self.error}"
        if self.dropped:
            return (
                f"{self.dropped} bytes of output were dropped: "
                f"the log reached its size cap of {self.limit} bytes"
            )
        return None

    def close(self) -> None:
        """Append a marker of what was dropped, if anything, and give back
        the blocks allocated ahead. The marker has its room under the cap;
        on a full filesystem, it needs the room the job's reserve gave back
        (another writer may take that first: then there is no marker, and
        the job's status alone counts what was dropped)."""
        if self.dropped:
            marker: dict[str, Any] = {"dropped_bytes": self.dropped}
            if self.error:
                marker["error"] = self.error
            record = pack([STREAM_MARKER, now_ns(), marker])
            if self.size + len(record) <= self.limit:
                self._write(record)
        if self.allocated > self.size:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # the same size, and no blocks past it
        os.close(self.fd)

    def _write(self, record: bytes) -> str | None:
        """Append a whole record; on failure, why (the log is left as it was)."""
        try:
            self._allocate(len(record))
            written = os.write(self.fd, record)
        except OSError as exc:
            return exc.strerror or str(exc)
        if written == len(record):
            self.size += written
            return None
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, self.size)
        self.allocated = self.size
        return "short write"

    def _allocate(self, length: int) -> None:
        """Blocks for `length` more bytes past the end; OSError if there are none."""
        end = self.size + length
        if not self.can_allocate or end <= self.allocated:
            return
        ahead = max(end, min(self.size + ALLOCATE_AHEAD, self.limit))
        try:
            _allocate_past_end(self.fd, self.size, ahead - self.size)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:  # EOPNOTSUPP and the like
                self.can_allocate = False  # plain writes, whose errors tell
                return
            if ahead == end:
                raise
            _allocate_past_end(self.fd, self.size, length)
            ahead = end
        self.allocated = ahead

"""A job's output, read by any number of readers at once, from any offset.

Theory of operation. The shim appends msgpack records to `output.log`;
corrald never holds output in memory. Each reader has its own descriptor
and offset and reads the file in bounded chunks, so memory grows neither
with the log nor with the readers, and a slow reader delays nobody.

New output is discovered with inotify, never by polling: one inotify
instance (`OutputWatcher`, one descriptor awaited with trio) holds a watch
on the directory of each job that has readers, added with its first reader
and removed with its last. An event there (output.log written or created)
bumps that job's version and wakes its readers. The job's end wakes them
too: the manager learns of it when the shim has exited, after its last
write, so a reader that saw the end *before* a read that found nothing has
read everything. That order (note the version and the end, then read, then
wait for a version change) is what makes the end exact.

Reads try `preadv2(RWF_NOWAIT)` first: served from the page cache without
blocking, or EAGAIN, and only then a thread does the blocking read. A slow
disk stalls that reader, not the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import trio

from corral.records import MAX_RECORD
from corral.shim import libc
from corral.store import OUTPUT_FILE

log = logging.getLogger(__name__)

# The most one read returns: bounded work per read and per wake-up.
CHUNK = 256 * 1024
# Enough for a burst of events; the kernel keeps the rest queued.
EVENTS_BUFFER = 64 * 1024
WATCH_MASK = libc.IN_MODIFY | libc.IN_CREATE


@dataclass(eq=False)
class _Watch:
    """The readers of one job: a version their wake-ups are counted by."""

    job_id: str
    wd: int
    readers: int = 0
    version: int = 0
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def bump(self) -> None:
        self.version += 1
        self.lot.unpark_all()

    async def wait_past(self, version: int) -> None:
        while self.version == version:
            await self.lot.park()


class OutputWatcher:
    """One inotify instance for every job with readers. `run()` is its task."""

    def __init__(self) -> None:
        self._fd = libc.inotify_init()
        self._by_job: dict[str, _Watch] = {}
        self._by_wd: dict[int, _Watch] = {}

    @property
    def watched(self) -> int:
        """How many jobs have a watch (that is, live readers)."""
        return len(self._by_job)

    def watches(self, job_id: str) -> bool:
        """Whether the job has readers now."""
        return job_id in self._by_job

    def subscribe(self, job_id: str, directory: Path) -> _Watch:
        watch = self._by_job.get(job_id)
        if watch is None:
            wd = libc.inotify_add_watch(self._fd, os.fspath(directory), WATCH_MASK)
            # The kernel gives the same wd for the same inode: a job directory
            # removed and made again cannot collide with a live one (ids are unique).
            watch = self._by_job[job_id] = self._by_wd[wd] = _Watch(job_id, wd)
        watch.readers += 1
        return watch

    def unsubscribe(self, watch: _Watch) -> None:
        watch.readers -= 1
        if watch.readers == 0:
            del self._by_job[watch.job_id]
            if self._by_wd.pop(watch.wd, None) is not None:
                with contextlib.suppress(OSError):  # the directory may be gone already
                    libc.inotify_rm_watch(self._fd, watch.wd)

    def notify(self, job_id: str) -> None:
        """Wake the job's readers (its end, which inotify does not see)."""
        if watch := self._by_job.get(job_id):
            watch.bump()

    async def run(self) -> None:
        """Route inotify events to the jobs' readers until cancelled."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    events = os.read(self._fd, EVENTS_BUFFER)
                except BlockingIOError:
                    continue
                self._dispatch(events)
        finally:
            self.close()

    def _dispatch(self, events: bytes) -> None:
        woken: set[int] = set()
        position = 0
        while position + libc.INOTIFY_EVENT.size <= len(events):
            wd, mask, _, length = libc.INOTIFY_EVENT.unpack_from(events, position)
            name_at = position + libc.INOTIFY_EVENT.size
            name = events[name_at : name_at + length].rstrip(b"\0")
            position = name_at + length
            if mask & libc.IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: waking every reader")
                woken.update(self._by_wd)
            elif mask & libc.IN_IGNORED:  # the directory went (job removed)
                if (watch := self._by_wd.pop(wd, None)) is not None:
                    watch.bump()
            elif name == OUTPUT_FILE.encode():
                woken.add(wd)
        for wd in woken:
            if (watch := self._by_wd.get(wd)) is not None:
                watch.bump()

    def close(self) -> None:
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1


class OutputReader:
    """One reader of one job's output.log, from `offset` on.

    `ended` tells whether the job has ended (no more output will come).
    Close it (it is a context manager) to release its descriptor and watch.
    """

    def __init__(
        self,
        watcher: OutputWatcher,
        job_id: str,
        directory: Path,
        offset: int,
        ended: trio.Event,
    ) -> None:
        self.offset = offset
        self._path = directory / OUTPUT_FILE
        self._ended = ended
        self._watcher = watcher
        self._watch = watcher.subscribe(job_id, directory)
        self._fd: int | None = None
        self._nowait = True
        self._closed = False

    def __enter__(self) -> OutputReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._watcher.unsubscribe(self._watch)

    async def read(self, size: int = CHUNK, *, follow: bool = True) -> bytes:
        """Up to `size` bytes from the offset on (advancing it); b"" at the end.

        The end is the end of what is written now, without `follow`; with it,
        the end of the output once the job has ended and all of it was read.
        """
        size = max(1, min(size, CHUNK))
        while True:
            version = self._watch.version
            ended = self._ended.is_set()
            data = await self._read_now(size)
            if data:
                self.offset += len(data)
                return data
            if ended or not follow:
                return b""
            await self._watch.wait_past(version)

    async def _read_now(self, size: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # the shim has not created it yet (or never will)
                return b""
        # The log only grows: its size says how much there is to read, so a
        # small write costs a small buffer, and no new output costs no read.
        size = min(size, os.fstat(self._fd).st_size - self.offset)
        if size <= 0:
            return b""
        if self._nowait:
            buffer = bytearray(size)
            try:
                count = os.preadv(self._fd, [buffer], self.offset, os.RWF_NOWAIT)
            except BlockingIOError:  # not in the page cache: a thread waits for the disk
                pass
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False  # a filesystem without it: every read in a thread
            else:
                del buffer[count:]
                return bytes(buffer)
        return await trio.to_thread.run_sync(os.pread, self._fd, size, self.offset)


# Bytes of the log read at a time while looking for record starts.
SCAN_READ = 1 << 20


def misplaced_offset(path: Path, offset: int) -> tuple[int, int | None] | None:
    """None if a record of the log at `path` begins at `offset` (0 and the
    end of the complete records included); otherwise the record starts
    nearest below and above it (above: None when no complete record
    follows).

    Reads the log from its start, skipping each record without decoding
    its bytes (blocking: call it from a thread). A log that is not yet there
    has one start, 0.
    """
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=MAX_RECORD + SCAN_READ)
    below = 0
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, read in a loop
    except FileNotFoundError:
        return None if offset == 0 else (0, None)
    with file:
        while below < offset:
            data = file.read(SCAN_READ)
            if not data:
                return (below, None)
            unpacker.feed(data)
            while True:
                try:
                    unpacker.skip()
                except msgpack.OutOfData:
                    break
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                    return (below, None)  # damaged from here: nothing above to offer
                start = unpacker.tell()
                if start == offset:
                    return None
                if start > offset:
                    return (below, start)
                below = start
    return None if below == offset else (below, None)

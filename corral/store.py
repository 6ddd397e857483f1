"""A job's files in the state directory: `spec.msgpack` (written once,
before the shim starts), `status.msgpack` (replaced atomically by whoever
knows more), `output.log`, the shim's socket, and while a shim runs its
job, `reserve`: room for the job's end (see `Reserve`).

Plain Python (the shim uses it): imports neither trio nor anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from corral.job import ResolvedSpec, Status

# A job's reserve (see Reserve): a block for its final status, the rest for
# the log's last record and a directory block, in blocks of 4 KiB or more.
RESERVE_SIZE = 32 << 10
RESERVE_BLOCKS = 8
RESERVE_MAX = 1 << 20  # a filesystem claiming huge blocks (NFS) gets no more

SPEC_FILE = "spec.msgpack"
STATUS_FILE = "status.msgpack"
OUTPUT_FILE = "output.log"
SOCKET_FILE = "shim.sock"
RESERVE_FILE = "reserve"

# A full filesystem, or the writer's quota used up: no new blocks to be had.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` (0600) so readers see the old or the new, never half.

    `durable` also flushes it to disk before the rename (a few ms on a real
    disk): for records that must survive a power cut, like a job's end. A
    lost intermediate record (starting, running) costs nothing: the shim
    that wrote it is gone after a power cut too.
    """
    # A name no other writer picks (O_EXCL makes sure): tempfile's would do,
    # but importing it costs every shim fork (see spawner.py).
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(value, dict):
        raise TypeError(f"expected a map, not {type(value).__name__}")
    return value


# sun_path holds 108 bytes; longer job paths are reached through /proc.
MAX_SOCKET_PATH = 100


@contextlib.contextmanager
def socket_path(job_dir: Path) -> Iterator[str]:
    """A path for the job's shim.sock that fits in a unix socket address.

    A deep state directory makes `job_dir/shim.sock` too long to bind or
    connect; then it is named through an O_PATH descriptor of the
    directory, /proc/self/fd/N/shim.sock, valid while the block runs.
    """
    path = job_dir / SOCKET_FILE
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(job_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_FILE}"
    finally:
        os.close(fd)


def read_status(job_dir: Path) -> Status | None:
    """The recorded status, or None if the job has none yet."""
    try:
        return Status.from_wire(unpack((job_dir / STATUS_FILE).read_bytes()))
    except FileNotFoundError:
        return None


def write_status(job_dir: Path, status: Status) -> None:
    """Record `status`; durably once the job has ended.

    An end is recorded on a full filesystem too, if the status file has the
    room: written over it in place (see `_overwrite`). Raises OSError when
    it cannot be recorded.
    """
    path, data, durable = job_dir / STATUS_FILE, pack(status.to_wire()), status.state.finished
    try:
        write_atomically(path, data, durable=durable)
    except OSError as exc:
        if not durable or exc.errno not in FULL_ERRNOS or not _overwrite(path, data):
            raise


def _overwrite(path: Path, data: bytes) -> bool:
    """Write `data` over the file at `path` in the blocks it has; False if
    they are too few (or there is no file), so no new block is needed.

    Not atomic: a reader at that moment may find a mix of the two. Only for
    an end that could not be recorded otherwise; whoever writes an end does
    so as the job's last act, and corrald reads it once the writer is gone.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if len(data) > os.fstat(fd).st_blocks * 512:
            return False
        _write_at(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _write_at(fd: int, data: bytes) -> None:
    """All of `data` at the start of the file."""
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], done)


class Reserve:
    """Room kept in a job directory, so the job's end is recorded however
    full its filesystem gets.

    Theory of operation. The shim makes the reserve, a file of a few blocks
    allocated up front, before the job runs; at the end it puts the final
    status in the reserve's own blocks (`hold`), which frees the rest for
    the log's last record, then renames the reserve over status.msgpack
    (`commit`). Neither step needs a new block: the end is recorded on a
    full filesystem even when other jobs take every block as soon as it is
    freed (those then take the room meant for the marker: the status still
    counts the dropped output). Guaranteed where blocks allocated to a file
    stay its own until it is truncated (tmpfs, ext4 and XFS, whose
    conversion of preallocated blocks draws on the filesystem's own
    reserve); not on copy-on-write filesystems (btrfs, ZFS), which need new
    blocks for every write. A status larger than the reserve (a very long
    reason) needs new blocks too; write_status is then the fallback.
    """

    def __init__(self, job_dir: Path) -> None:
        """Allocate the room; OSError if it cannot (errno in FULL_ERRNOS: no room)."""
        self.path = job_dir / RESERVE_FILE
        self.held = False
        self.fd: int | None = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            # Blocks of the filesystem's unit of allocation (a page on tmpfs).
            size = max(RESERVE_SIZE, RESERVE_BLOCKS * os.fstatvfs(self.fd).f_frsize)
            os.posix_fallocate(self.fd, 0, min(size, RESERVE_MAX))
        except BaseException:
            self.discard()
            raise

    def hold(self, status: Status) -> bool:
        """Write `status` into the reserve and free the rest of its room;
        False (and the reserve is gone) if that needed more room than it had."""
        if self.fd is None:
            return False
        data = pack(status.to_wire())
        try:
            _write_at(self.fd, data)
            os.ftruncate(self.fd, len(data))
        except OSError:
            self.discard()
            return False
        self.held = True
        return True

    def commit(self, job_dir: Path) -> bool:
        """Make the status held the job's status.msgpack, flushed to disk
        first (it is an end); False (and the reserve is gone) if nothing was
        held or that failed."""
        if self.fd is None or not self.held:
            self.discard()
            return False
        try:
            os.fsync(self.fd)
            os.replace(self.path, job_dir / STATUS_FILE)
        except OSError:
            self.discard()
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def discard(self) -> None:
        """Give the room back. Safe to call more than once."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def read_spec(job_dir: Path) -> ResolvedSpec:
    return ResolvedSpec.from_wire(unpack((job_dir / SPEC_FILE).read_bytes()))

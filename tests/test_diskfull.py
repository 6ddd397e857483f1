"""A full disk under the state directory: jobs go on, their ends are recorded,
followers get a clean log, corrald and other jobs are unaffected.

The state directory is a small tmpfs of its own, filled for real: by a
job's output, or by a file the test writes. Real shims, namespaces and
cgroups, as root.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from corral.errors import OperationError
from corral.job import JobSpec, State
from corral.protocol import ErrorCode
from corral.records import STREAM_MARKER, STREAM_STDOUT
from corral.store import OUTPUT_FILE, read_status
from corral.worker.manager import JobManager

from .conftest import SMALL_DISK_SIZE, managed_jobs, until

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

DISK_SIZE = SMALL_DISK_SIZE
# Twice the disk: whatever else is on it, this fills it.
PATTERN_SIZE = 8 << 20
FULL = os.strerror(errno.ENOSPC)
# What a job directory may hold once its job has ended: the reserve is gone
# (shim.log is there if a sandbox built ahead took the job).
ENDED_FILES = {"output.log", "shim.log", "spec.msgpack", "status.msgpack"}


@pytest.fixture
async def jobs(small_disk: Path) -> AsyncIterator[JobManager]:
    """A JobManager whose state directory is on `small_disk`; afterwards every
    job has ended and no cgroup of ours is left."""
    async with managed_jobs(small_disk / "state") as manager:
        yield manager


def fill(disk: Path, *, leave: int = 0) -> Path:
    """Fill the filesystem with a file, then give `leave` blocks of it back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(bytes(1 << 20)):
                pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    # Every write but the last was whole blocks, and that one stopped at a
    # block's end: the filler is whole blocks.
    os.truncate(filler, filler.stat().st_size - leave * os.statvfs(disk).f_frsize)
    assert os.statvfs(disk).f_bavail == leave
    return filler


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    path.chmod(0o666)
    return path


def _write_if_read(gate: Path) -> bool:
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nobody has it open for reading yet
            return False
        raise
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)
    return True


async def release(gate: Path) -> None:
    """A line to a job waiting on the fifo `gate`, once it is waiting there."""
    await until(lambda: _write_if_read(gate))


def decode(data: bytes) -> list[list[object]]:
    """The records of output.log bytes, which must all be whole."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    records = list(unpacker)
    assert unpacker.tell() == len(data), "output.log ends in a torn record"
    return records


def cut_log(log: bytes) -> tuple[bytes, object]:
    """The stdout a cut log kept, and the marker that must end it."""
    *output, (stream, _, marker) = decode(log)
    assert stream == STREAM_MARKER
    assert {record[0] for record in output} <= {STREAM_STDOUT}
    return b"".join(record[2] for record in output), marker  # type: ignore[misc]


async def follow(jobs: JobManager, job_id: str, into: list[bytes]) -> None:
    into.append(b"".join([chunk async for chunk in jobs.output(job_id, follow=True)]))


async def test_a_job_that_fills_the_disk_runs_on_and_its_end_is_recorded(
    jobs: JobManager, small_disk: Path, shared_dir: Path
) -> None:
    pattern = os.urandom(PATTERN_SIZE)
    source = shared_dir / "pattern"
    source.write_bytes(pattern)
    source.chmod(0o644)
    start, end, other_gate = (fifo(shared_dir / name) for name in ("start", "end", "other"))
    other = await jobs.start(JobSpec(argv=["sh", "-c", f"read x < {other_gate}; echo two"]))
    script = f"read x < {start}; cat {source}; echo final; read x < {end}; exit 3"
    job = await jobs.start(JobSpec(argv=["sh", "-c", script]))
    got: list[bytes] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, jobs, job.id, got)
            await trio.testing.wait_all_tasks_blocked()
            await release(start)
            # The disk fills; the job runs on, and its live status says so.
            while not (live := (await jobs.status(job.id))[1]).dropped_bytes:
                await trio.sleep(0.005)
            assert live.state is State.RUNNING
            assert live.reason.startswith("running; output from byte ")
            # The job reads `end` once cat and echo are done: the shim kept
            # draining the pipe (8 MiB) though the disk filled at 4.
            await release(end)
            status = await jobs.wait(job.id)
            # The other job, started before the fill, ends while nothing is free.
            fill(small_disk)
            await release(other_gate)
            other_status = await jobs.wait(other.id)

    assert status.state is State.EXITED
    assert status.exit_code == 3
    log = (job.directory / OUTPUT_FILE).read_bytes()
    assert got == [log]
    kept, marker = cut_log(log)
    assert 0 < len(kept) < DISK_SIZE
    assert kept == pattern[: len(kept)]
    dropped = PATTERN_SIZE + len(b"final\n") - len(kept)
    assert marker == {"dropped_bytes": dropped, "error": FULL}
    assert status.dropped_bytes == dropped
    lost = f"output from byte {len(kept)} on was dropped: {FULL}"
    assert status.reason == f"exited with code 3; {lost}"
    assert set(os.listdir(job.directory)) <= ENDED_FILES

    assert other_status.state is State.EXITED
    assert other_status.exit_code == 0
    assert other_status.dropped_bytes == len(b"two\n")
    assert other_status.reason == f"exited with code 0; output from byte 0 on was dropped: {FULL}"
    assert read_status(other.directory) == other_status
    assert cut_log((other.directory / OUTPUT_FILE).read_bytes()) == (
        b"",
        {"dropped_bytes": 4, "error": FULL},
    )
    assert set(os.listdir(other.directory)) <= ENDED_FILES

    # Room again: a new job's output is kept whole.
    await jobs.remove(job.id)
    after = await jobs.start(JobSpec(argv=["head", "-c", str(1 << 20), str(source)]))
    status = await jobs.wait(after.id)
    assert (status.reason, status.dropped_bytes) == ("exited with code 0", 0)
    records = decode((after.directory / OUTPUT_FILE).read_bytes())
    assert b"".join(record[2] for record in records) == pattern[: 1 << 20]  # type: ignore[misc]


async def test_a_start_on_a_full_disk_fails_saying_so_and_leaves_nothing(
    jobs: JobManager, small_disk: Path
) -> None:
    filler = fill(small_disk)
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(argv=["echo", "hello"]))
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert FULL in str(caught.value)
    assert jobs.jobs() == []
    assert list((small_disk / "state" / "jobs").iterdir()) == []

    filler.unlink()
    job = await jobs.start(JobSpec(argv=["echo", "hello"]))
    status = await jobs.wait(job.id)
    assert status.reason == "exited with code 0"
    assert decode((job.directory / OUTPUT_FILE).read_bytes())[0][2] == b"hello\n"


async def test_a_start_without_room_for_the_jobs_output_fails_and_is_recorded(
    jobs: JobManager, small_disk: Path
) -> None:
    # Room for what corrald writes (the spec and the first status, a block
    # each) and nothing more: the shim cannot keep room for the job's end.
    fill(small_disk, leave=2)
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(argv=["echo", "hello"]))
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert str(caught.value) == f"no room for the job's output in corrald's state directory: {FULL}"
    (job,) = jobs.jobs()
    # Recorded though no new file fits: over the status file, in place.
    assert read_status(job.directory) == job.status
    assert job.status.state is State.FAILED
    assert job.status.failed_step == "output"
    assert job.status.reason == str(caught.value)
    assert set(os.listdir(job.directory)) <= ENDED_FILES

"""A job's output, streamed: from the first byte, to many readers at once,
binary-exact, within the credit each grants, woken by inotify.

Real jobs, a real corrald over mutual TLS where the wire is the point.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from corral.client.client import connect
from corral.client.errors import ServerError
from corral.job import STREAM_MARKER, STREAM_STDERR, STREAM_STDOUT, JobSpec, RecordDecoder
from corral.protocol import ErrorCode
from corral.worker.manager import JobManager

from .conftest import TEST_CGROUP_PARENT, Daemon, identity, live_tasks, open_fds, until

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with JobManager(tmp_path / "state", cgroup_parent=TEST_CGROUP_PARENT) as manager:
        try:
            yield manager
        finally:
            for job in manager.jobs():
                if not job.done.is_set():
                    await manager.stop(job.id, grace=0)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the job (as nobody) and the test can both reach."""
    directory = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/var/tmp"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def split(data: bytes) -> tuple[bytes, bytes, list[dict[str, Any]]]:
    """stdout, stderr and the markers in output.log bytes."""
    out: list[bytes] = []
    err: list[bytes] = []
    markers: list[dict[str, Any]] = []
    for record in RecordDecoder().feed(data):
        if isinstance(record.data, dict):
            assert record.stream == STREAM_MARKER
            markers.append(record.data)
        elif record.stream == STREAM_STDOUT:
            out.append(record.data)
        else:
            assert record.stream == STREAM_STDERR
            err.append(record.data)
    return b"".join(out), b"".join(err), markers


async def read_all(jobs: JobManager, job_id: str, **options: object) -> bytes:
    return b"".join([chunk async for chunk in jobs.output(job_id, **options)])  # type: ignore[arg-type]


# -- the library ----------------------------------------------------------------------


async def test_a_follower_from_before_the_first_byte_gets_everything(
    jobs: JobManager, shared_dir: Path
) -> None:
    gate = shared_dir / "gate"
    os.mkfifo(gate)
    gate.chmod(0o666)
    # The job waits on the fifo, so the follower is attached before any output.
    job = await jobs.start(
        JobSpec(argv=["sh", "-c", f"read x < {gate}; echo one; echo two >&2; echo three"])
    )
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def follow() -> None:
            got.append(await read_all(jobs, job.id))

        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await trio.to_thread.run_sync(gate.write_bytes, b"go\n")
    out, err, markers = split(got[0])
    assert (out, err, markers) == (b"one\nthree\n", b"two\n", [])
    assert (job.directory / "output.log").read_bytes() == got[0]


async def test_without_follow_the_stream_ends_at_the_current_end(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["sh", "-c", "echo ready; exec sleep 1000"]))
    await until(lambda: (job.directory / "output.log").stat().st_size > 0)
    data = await read_all(jobs, job.id, follow=False)
    assert split(data)[0] == b"ready\n"
    assert not job.done.is_set()


async def test_binary_output_is_byte_exact_for_every_reader(
    jobs: JobManager, shared_dir: Path
) -> None:
    # 20 MB of random bytes (NULs and all) on stdout, interleaved with stderr.
    payload = shared_dir / "payload"
    payload.write_bytes(os.urandom(20 << 20))
    payload.chmod(0o644)
    script = (
        f"for i in 0 1 2 3 4 5 6 7 8 9; do "
        f"dd if={payload} bs=1M skip=$((i*2)) count=2 status=none; echo chunk $i >&2; done"
    )
    job = await jobs.start(JobSpec(argv=["sh", "-c", script]))
    results: list[bytes] = []

    async def follow(delay_until: int) -> None:
        # Attach at different moments: before, during, after.
        await until(lambda: job.done.is_set() or output_size(job.directory) >= delay_until)
        results.append(await read_all(jobs, job.id))

    async with trio.open_nursery() as nursery:
        for start_at in (0, 0, 5 << 20, 15 << 20):
            nursery.start_soon(follow, start_at)
    await jobs.wait(job.id)
    results.append(await read_all(jobs, job.id))
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    for data in results:
        out, err, _ = split(data)
        assert hashlib.sha256(out).hexdigest() == want
        assert err == b"".join(f"chunk {i}\n".encode() for i in range(10))


def output_size(directory: Path) -> int:
    try:
        return (directory / "output.log").stat().st_size
    except FileNotFoundError:
        return 0


async def test_a_reader_holds_its_descriptor_and_watch_only_while_it_reads(
    jobs: JobManager,
) -> None:
    job = await jobs.start(JobSpec(argv=["sleep", "1000"]))
    await trio.testing.wait_all_tasks_blocked()
    fds, tasks = open_fds(), live_tasks()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(read_all, jobs, job.id)
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.followed == 1  # one inotify watch for the job, whatever the readers
        nursery.cancel_scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert jobs.followed == 0
    assert (open_fds(), live_tasks()) == (fds, tasks)


async def test_a_negative_offset_is_refused(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["true"]))
    with pytest.raises(Exception, match="offset: must be zero or more"):
        await read_all(jobs, job.id, offset=-1)


# -- over TLS -------------------------------------------------------------------------


async def test_logs_over_tls_decodes_records_and_ends_with_the_final_state(
    corrald: Daemon, pki_dir: Path
) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["sh", "-c", "printf 'a\\0b'; echo err >&2; exit 3"])
        async with alice.logs(job.id, follow=True) as stream:
            records = [record async for record in stream]
        # Two pipes: their relative order is the kernel's; each one's is kept.
        assert sorted((r.stream, r.data) for r in records) == [(1, b"a\0b"), (2, b"err\n")]
        assert all(r.time_ns > 0 for r in records)
        assert stream.job is not None
        assert (stream.job.state, stream.job.exit_code) == ("exited", 3)
        log = corrald.state_dir / "jobs" / job.id / "output.log"
        assert stream.offset == log.stat().st_size
        # Resuming from where it ended gives nothing more, and the same end.
        async with alice.logs(job.id, follow=True, offset=stream.offset) as again:
            assert [chunk async for chunk in again.chunks()] == []
        assert again.offset == stream.offset


async def test_another_users_job_cannot_be_streamed(corrald: Daemon, pki_dir: Path) -> None:
    async with (
        connect(corrald.tcp, identity(pki_dir, "alice")) as alice,
        connect(corrald.tcp, identity(pki_dir, "bob")) as bob,
    ):
        job = await alice.start(["echo", "secret"])
        with pytest.raises(ServerError) as caught:
            async with bob.logs(job.id) as stream:
                [chunk async for chunk in stream.chunks()]
        assert caught.value.code is ErrorCode.NOT_FOUND


async def test_a_reader_that_grants_no_credit_stalls_nobody(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(
            ["sh", "-c", "head -c 30000000 /dev/zero; echo done >&2"], limits={}
        )
        # A stream with a 64 KiB window that is never read: corrald may send
        # it 64 KiB and no more, and the job and the other reader go on.
        async with (
            alice.logs(job.id, follow=True, window=64 << 10),
            alice.logs(job.id, follow=True) as reader,
        ):
            total = sum([len(chunk.data) async for chunk in reader.chunks()])
        assert reader.job is not None
        assert reader.job.state == "exited"
        assert total == reader.offset
        assert total > 30_000_000

"""A job's output, streamed: from the first byte, to many readers at once,
binary-exact, within the credit each grants, woken by inotify.

Real jobs, a real corrald over mutual TLS where the wire is the point.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.job import JobSpec
from corral.protocol import ErrorCode
from corral.records import STREAM_MARKER, STREAM_STDERR, STREAM_STDOUT, RecordDecoder
from corral.supervisor.heartbeat import live_tasks
from corral.worker.manager import JobManager

from .conftest import (
    Daemon,
    identity,
    managed_jobs,
    open_fds,
    running_corrald,
    until,
    until_async,
)
from .test_cli import CORRAL

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with managed_jobs(tmp_path / "state") as manager:
        yield manager


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
    corrald: Daemon, pki_dir: Path, shared_dir: Path
) -> None:
    # 50 MB of random bytes (NULs and all) on stdout, interleaved with stderr.
    payload = shared_dir / "payload"
    payload.write_bytes(os.urandom(50 << 20))
    payload.chmod(0o644)
    script = (
        f"for i in 0 1 2 3 4 5 6 7 8 9; do "
        f"dd if={payload} bs=1M skip=$((i*5)) count=5 status=none; echo chunk $i >&2; done"
    )
    want_out = hashlib.sha256(payload.read_bytes()).hexdigest()
    want_err = hashlib.sha256(b"".join(f"chunk {i}\n".encode() for i in range(10))).hexdigest()
    digests: list[tuple[str, str]] = []

    async def follow(client: Client, job_id: str, attach_at: int) -> None:
        # Attach at different moments: before the first byte, during, after.
        log = corrald.state_dir / "jobs" / job_id / "output.log"
        await until(lambda: attach_at == 0 or output_size(log.parent) >= attach_at, timeout=60)
        out, err = hashlib.sha256(), hashlib.sha256()
        async with client.logs(job_id, follow=True) as stream:
            async for record in stream:  # the client's own record decoder
                assert isinstance(record.data, bytes)
                (out if record.stream == STREAM_STDOUT else err).update(record.data)
        digests.append((out.hexdigest(), err.hexdigest()))

    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["sh", "-c", script])
        async with trio.open_nursery() as nursery:
            for attach_at in (0, 0, 10 << 20, 30 << 20):
                nursery.start_soon(follow, alice, job.id, attach_at)
        assert (await alice.wait(job.id)).exit_code == 0
        await follow(alice, job.id, 0)
    assert digests == [(want_out, want_err)] * 5


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


# -- corral logs and corral run ---------------------------------------------------------


@pytest.fixture
def as_admin(corrald: Daemon, pki_dir: Path) -> dict[str, str]:
    """The environment for the CLI, as admin, against the test corrald."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    environment.update(CORRAL_ADDR=corrald.tcp, CORRAL_IDENTITY=str(identity(pki_dir, "admin")))
    return environment


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CORRAL, *args], capture_output=True, env=env, timeout=60, check=False)


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("printf 'out\\0put'; echo err >&2", 0),
        ("exit 3", 3),
        ("kill -SEGV $$", 128 + signal.SIGSEGV),
    ],
)
def test_run_writes_the_output_and_exits_with_the_jobs_status(
    as_admin: dict[str, str], script: str, status: int
) -> None:
    result = cli(as_admin, "run", "--", "sh", "-c", script)
    assert result.returncode == status, result.stderr
    if status == 0:
        assert (result.stdout, result.stderr) == (b"out\0put", b"err\n")


def test_run_says_when_the_job_ran_out_of_memory(as_admin: dict[str, str]) -> None:
    grab = "x = bytearray(200 << 20)"
    result = cli(as_admin, "run", "--memory", "32M", "--", "python3", "-c", grab)
    assert result.returncode == 137
    assert result.stderr.decode().endswith("was killed: out of memory (memory limit 32M)\n")


def test_run_of_a_missing_command_exits_127(as_admin: dict[str, str]) -> None:
    result = cli(as_admin, "run", "--", "no-such-command")
    assert result.returncode == 127
    assert b"cannot run 'no-such-command': not found in PATH=" in result.stderr


def interrupted_run(env: dict[str, str], script: str, presses: int) -> tuple[int, str]:
    """`corral run` of a job that prints "ready", Ctrl+C'd `presses` times."""
    process = subprocess.Popen(
        [*CORRAL, "run", "--grace", "30s", "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        notes = [process.stderr.readline()]
        if presses == 2:
            process.send_signal(signal.SIGINT)
        notes.append(process.stderr.read())
        return process.wait(timeout=30), "".join(notes)
    finally:
        process.kill()
        process.wait()


def test_ctrl_c_stops_the_remote_job_with_its_grace(as_admin: dict[str, str]) -> None:
    script = "trap 'echo bye >&2; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    status, notes = interrupted_run(as_admin, script, presses=1)
    assert status == 5
    assert "stopping job" in notes
    assert "bye" in notes


def test_a_second_ctrl_c_kills_the_remote_job_at_once(as_admin: dict[str, str]) -> None:
    status, notes = interrupted_run(as_admin, "trap '' TERM; echo ready; sleep 1000", presses=2)
    assert status == 128 + signal.SIGKILL
    assert "killing job" in notes


def test_logs_writes_each_stream_to_its_own_and_can_pick_one(
    as_admin: dict[str, str],
) -> None:
    started = cli(as_admin, "start", "--", "sh", "-c", "printf 'a\\0'; printf 'b' >&2")
    job_id = started.stdout.decode().strip()
    whole = cli(as_admin, "logs", "-f", job_id)
    assert (whole.returncode, whole.stdout, whole.stderr) == (0, b"a\0", b"b")
    only_err = cli(as_admin, "logs", "-f", "--stderr", job_id)
    assert (only_err.stdout, only_err.stderr) == (b"", b"b")
    stamped = cli(as_admin, "logs", "-f", "--timestamps", "--stdout", job_id)
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z a\0", stamped.stdout)


# -- many readers, slow readers, idle readers ------------------------------------------


def proc_stat(pid: int) -> tuple[int, int]:
    """(CPU clock ticks used, resident KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return ticks, rss


def gated(gate: Path, before: str, after: str) -> list[str]:
    """sh: run `before`, wait for a line on the fifo `gate`, run `after`."""
    os.mkfifo(gate)
    gate.chmod(0o666)
    return ["sh", "-c", f"{before}; read x < {gate}; {after}"]


async def test_fifty_followers_attached_at_any_moment_get_the_same_whole_output(
    corrald: Daemon, pki_dir: Path, shared_dir: Path
) -> None:
    first, second = shared_dir / "first", shared_dir / "second"
    os.mkfifo(first)
    first.chmod(0o666)
    argv = gated(
        second,
        f"read x < {first}; head -c 3000000 /dev/urandom",
        "head -c 3000000 /dev/urandom; exit 4",
    )
    results: list[tuple[bytes, str | None, int | None]] = []
    attached = 0

    async def follow() -> None:
        nonlocal attached
        pieces: list[bytes] = []
        async with (
            connect(corrald.tcp, identity(pki_dir, "alice")) as client,
            client.logs(job_id, follow=True) as stream,
        ):
            async for chunk in stream.chunks():
                if not pieces:
                    attached += 1
                pieces.append(chunk.data)
        assert stream.job is not None
        results.append((b"".join(pieces), stream.job.state, stream.job.exit_code))

    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(argv)
        job_id = job.id
        async with trio.open_nursery() as nursery:
            for _ in range(10):  # before the first byte
                nursery.start_soon(follow)
            await until_async(alice.info, lambda info: info.followed_jobs == 1)
            await trio.to_thread.run_sync(first.write_bytes, b"go\n")
            await until(lambda: attached == 10)
            for _ in range(20):  # once the first half is written
                nursery.start_soon(follow)
            await until(lambda: attached == 30)  # all have some output; the job waits
            await trio.to_thread.run_sync(second.write_bytes, b"go\n")
            for _ in range(10):  # while the second half is written
                nursery.start_soon(follow)
        await alice.wait(job_id)
        async with trio.open_nursery() as nursery:
            for _ in range(10):  # after the end
                nursery.start_soon(follow)
    log = (corrald.state_dir / "jobs" / job_id / "output.log").read_bytes()
    assert len(results) == 50
    assert {(hashlib.sha256(data).hexdigest(), state, code) for data, state, code in results} == {
        (hashlib.sha256(log).hexdigest(), "exited", 4)
    }
    out, _, _ = split(log)
    assert len(out) == 6_000_000


async def test_a_reader_that_stops_reading_costs_corrald_no_memory(
    corrald: Daemon, pki_dir: Path
) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        _, rss_before = proc_stat(corrald.process.pid)
        job = await alice.start(["head", "-c", "500000000", "/dev/zero"])
        # Three streams that never read past their first window, on their
        # own connections and on this one: the job does not wait for them.
        async with (
            connect(corrald.tcp, identity(pki_dir, "alice")) as other,
            other.logs(job.id, follow=True),
            alice.logs(job.id, follow=True, window=1 << 20),
            alice.logs(job.id, follow=True, window=1 << 20),
        ):
            final = await alice.wait(job.id)
            _, rss_after = proc_stat(corrald.process.pid)
        assert (final.state, final.exit_code) == ("exited", 0)
        assert rss_after - rss_before < 30 * 1024, (rss_before, rss_after)  # KiB


async def test_an_idle_follower_costs_no_cpu_and_wakes_on_the_next_byte(
    corrald: Daemon, pki_dir: Path, shared_dir: Path
) -> None:
    gate = shared_dir / "gate"
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(gated(gate, "echo first", "echo second"))
        async with alice.logs(job.id, follow=True) as stream:
            records = aiter(stream)
            assert (await anext(records)).data == b"first\n"
            ticks_before, _ = proc_stat(corrald.process.pid)
            # The measured window: corrald has a follower and nothing to send.
            await trio.sleep(2)
            ticks_after, _ = proc_stat(corrald.process.pid)
            await trio.to_thread.run_sync(gate.write_bytes, b"go\n")
            assert (await anext(records)).data == b"second\n"
    # A poller waking every 10 ms would use 200 wake-ups' worth; a tick is 10 ms.
    assert ticks_after - ticks_before <= 2


async def test_a_cancelled_or_disconnected_follower_frees_what_it_held(
    pki_dir: Path, short_dir: Path
) -> None:
    # No warm sandbox: one built in the background would open descriptors.
    with running_corrald(pki_dir, short_dir, "--warm", "0") as corrald:
        await _follow_then_leave(corrald, pki_dir)


async def _follow_then_leave(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        job = await admin.start(["sh", "-c", "echo hi; exec sleep 1000"])
        fds = len(os.listdir(f"/proc/{corrald.process.pid}/fd"))
        # Cancelled: the stream is left mid-way (after its first record).
        async with admin.logs(job.id, follow=True) as stream:
            assert (await anext(aiter(stream))).data == b"hi\n"
            assert (await admin.info()).followed_jobs == 1
        await until_async(admin.info, lambda info: info.followed_jobs == 0)
        # Disconnected: the connection goes away under a live stream.
        async with (
            connect(corrald.tcp, identity(pki_dir, "admin")) as gone,
            gone.logs(job.id, follow=True) as stream,
        ):
            assert (await anext(aiter(stream))).data == b"hi\n"
            await gone._tls.aclose()
        await until_async(admin.info, lambda info: info.followed_jobs == 0)
        # The stream's reader is gone; the session's socket closes a moment later.
        await until(lambda: len(os.listdir(f"/proc/{corrald.process.pid}/fd")) == fds)
        await admin.stop(job.id, grace=0)


async def test_output_still_unread_when_the_job_ends_is_all_delivered(
    corrald: Daemon, pki_dir: Path
) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["head", "-c", "5000000", "/dev/urandom"])
        async with alice.logs(job.id, follow=True, window=64 << 10) as stream:
            chunks = stream.chunks()
            first = await anext(chunks)
            await alice.wait(job.id)  # the job has ended; we have read 64 KiB at most
            rest = b"".join([chunk.data async for chunk in chunks])
        log = (corrald.state_dir / "jobs" / job.id / "output.log").read_bytes()
        assert first.data + rest == log
        assert stream.job is not None
        assert stream.job.state == "exited"


def test_run_that_loses_corrald_says_so_in_one_line(
    corrald: Daemon, as_admin: dict[str, str]
) -> None:
    process = subprocess.Popen(
        [*CORRAL, "run", "--reconnect-for", "0", "--", "sh", "-c", "echo ready; exec sleep 1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=as_admin,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        corrald.process.kill()
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 69
    assert stderr.startswith("corral: error: ")
    assert stderr.count("\n") == 1, stderr

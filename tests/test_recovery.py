"""Jobs survive corrald: a crash, a restart that adopts them again, a clean
shutdown that stops them (or keeps them with --keep-jobs), one corrald per
state directory.

Real corrald processes on one state directory, one after the other.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
from corral.job import JobSpec, State
from corral.shim.cgroup import detect_flavour, open_cgroup
from corral.store import read_status, write_status
from corral.worker.manager import JobManager, Retention, open_job_manager

from .conftest import (
    TEST_CGROUP_PARENT,
    Daemon,
    end_jobs,
    identity,
    running_corrald,
    start_corrald,
    until,
    until_async,
)
from .test_cli import CORRAL

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

# One numbered line every 5 ms, forever: gaps or repeats show in the numbers.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.005; done"


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def numbers_until(client: Client, job_id: str, last: int) -> list[int]:
    """The counter job's numbers from byte 0 until `last` has been printed."""
    numbers: list[int] = []
    text = b""
    async with client.logs(job_id, follow=True) as stream:
        async for record in stream:
            assert isinstance(record.data, bytes)
            text += record.data
            *lines, text = text.split(b"\n")
            numbers += [int(line) for line in lines]
            if numbers and numbers[-1] >= last:
                return numbers
    raise AssertionError(f"the stream ended at {numbers[-1:]}, before {last}")


async def test_jobs_survive_a_crash_and_the_next_corrald_adopts_them(
    pki_dir: Path, short_dir: Path, shared_dir: Path
) -> None:
    gate = shared_dir / "gate"
    os.mkfifo(gate)
    gate.chmod(0o666)
    admin_id = identity(pki_dir, "admin")
    try:
        with running_corrald(pki_dir, short_dir, end_its_jobs=False) as first:
            async with connect(first.tcp, admin_id) as admin:
                counter = await admin.start(["sh", "-c", COUNTER])
                sleeper = await admin.start(["sleep", "1000"])
                ends_meanwhile = await admin.start(["sh", "-c", f"read x < {gate}; exit 7"])
                loses_its_shim = await admin.start(["sleep", "1000"])
                before = await numbers_until(admin, counter.id, 20)  # a follower mid-stream
                first.process.kill()  # SIGKILL: no goodbye, no cleanup
                await trio.to_thread.run_sync(first.process.wait)
        # corrald is down: the jobs' limits stay (their cgroups are the kernel's);
        # one job ends, one loses its shim; the others go on.
        flavour = detect_flavour()
        slice = "owner-admin-admin"
        limited = open_cgroup(flavour, counter.id, parent=TEST_CGROUP_PARENT, slice=slice)
        assert all(path.exists() for path in limited.paths())
        assert len(limited.procs()) >= 2  # init and the job's shell
        await trio.to_thread.run_sync(gate.write_bytes, b"go\n")
        ended = first.state_dir / "jobs" / ends_meanwhile.id
        await until(lambda: getattr(read_status(ended), "state", None) is State.EXITED)
        lost_status = read_status(first.state_dir / "jobs" / loses_its_shim.id)
        assert lost_status is not None
        os.kill(lost_status.shim_pid or 0, signal.SIGKILL)
        await until(lambda: not alive(lost_status.shim_pid))

        with running_corrald(pki_dir, short_dir) as second:
            adopted = "adopted 2 running jobs; 1 job lost (shim gone without recording an end)"
            assert adopted in second.log.read_text()
            async with connect(second.tcp, admin_id) as admin:
                jobs = {job.id: job for job in await admin.list(everyone=True)}
                assert jobs[counter.id].state == "running"
                assert jobs[sleeper.id].state == "running"
                assert (jobs[ends_meanwhile.id].state, jobs[ends_meanwhile.id].exit_code) == (
                    "exited",
                    7,
                )
                lost = jobs[loses_its_shim.id]
                assert lost.state == "lost"
                assert lost.reason.startswith("lost: its shim ended")
                cgroup = open_cgroup(
                    detect_flavour(), lost.id, parent=TEST_CGROUP_PARENT, slice="owner-admin-admin"
                )
                assert not any(path.exists() for path in cgroup.paths())
                # A new follower: the whole output from byte 0, live on, nothing
                # missing or doubled across the crash.
                after = await numbers_until(admin, counter.id, before[-1] + 20)
                assert after == list(range(1, len(after) + 1))
                assert after[: len(before)] == before
                final = await admin.stop(counter.id, grace=5)
                assert (final.state, final.signal) == ("stopped", "SIGTERM")
                assert (await admin.stop(sleeper.id, grace=5)).state == "stopped"
    finally:
        end_jobs(short_dir / "state")


async def test_shutdown_stops_running_jobs_with_their_grace(corrald: Daemon, pki_dir: Path) -> None:
    trapping = "trap 'echo bye; exit 4' TERM; echo ready; while :; do sleep 0.05; done"
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        job = await admin.start(["sh", "-c", trapping])
        finished = await admin.start(["true"])
        await admin.wait(finished.id)
        async with admin.logs(job.id, follow=True) as stream:
            assert (await anext(aiter(stream))).data == b"ready\n"
    corrald.process.terminate()
    stderr = await trio.to_thread.run_sync(corrald.wait)
    assert corrald.process.returncode == 0, stderr
    assert "stopping 1 running jobs" in stderr
    status = read_status(corrald.state_dir / "jobs" / job.id)
    assert status is not None
    assert (status.state, status.exit_code) == (State.STOPPED, 4)
    assert status.reason.startswith("stopped by corrald shutting down")
    assert read_status(corrald.state_dir / "jobs" / finished.id).state is State.EXITED  # type: ignore[union-attr]


async def test_keep_jobs_leaves_them_for_the_next_corrald(pki_dir: Path, short_dir: Path) -> None:
    admin_id = identity(pki_dir, "admin")
    try:
        with running_corrald(pki_dir, short_dir, "--keep-jobs", end_its_jobs=False) as first:
            async with connect(first.tcp, admin_id) as admin:
                job = await admin.start(["sleep", "1000"])
            first.process.terminate()
            stderr = await trio.to_thread.run_sync(first.wait)
            assert first.process.returncode == 0, stderr
            assert "leaving 1 running jobs to the next corrald" in stderr
        status = read_status(first.state_dir / "jobs" / job.id)
        assert status is not None
        assert status.state is State.RUNNING
        assert alive(status.shim_pid)
        with running_corrald(pki_dir, short_dir) as second:
            assert "corrald INFO adopted 1 running jobs\n" in second.log.read_text()
            async with connect(second.tcp, admin_id) as admin:
                assert (await admin.status(job.id)).state == "running"
                assert (await admin.stop(job.id, grace=0)).state == "stopped"
    finally:
        end_jobs(short_dir / "state")


def test_a_second_corrald_on_the_same_state_directory_is_refused(
    corrald: Daemon, pki_dir: Path
) -> None:
    second = start_corrald("--state-dir", str(corrald.state_dir), "--pki", str(pki_dir),
                           "--listen", "127.0.0.1:0")  # fmt: skip
    _, stderr = second.communicate(timeout=30)
    assert second.returncode == 69
    assert stderr == (
        f"corrald: error: state directory {corrald.state_dir} is in use by another corrald "
        f"(pid {corrald.process.pid}); stop it first, or give this one its own --state-dir\n"
    )
    assert corrald.process.poll() is None  # the first one goes on


def test_the_lock_goes_with_the_corrald_that_held_it(pki_dir: Path, short_dir: Path) -> None:
    with running_corrald(pki_dir, short_dir) as first:
        first.process.kill()
        first.process.wait()
    with running_corrald(pki_dir, short_dir) as second:
        assert second.process.poll() is None
        lock = (short_dir / "state" / "corrald.lock").read_text()
        assert lock == f"{second.process.pid}\n"


# -- retention ------------------------------------------------------------------------


@pytest.fixture
async def retained(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobManager]:
    retention: Retention = request.param
    async with open_job_manager(
        tmp_path / "state", cgroup_parent=TEST_CGROUP_PARENT, retention=retention
    ) as manager:
        yield manager
        for job in manager.jobs():
            if not job.done.is_set():
                await manager.stop(job.id, grace=0)


async def run_to_end(jobs: JobManager, argv: list[str]) -> str:
    job = await jobs.start(JobSpec(argv=argv))
    await jobs.wait(job.id)
    return job.id


def kept(jobs: JobManager) -> list[str]:
    return [job.id for job in jobs.jobs()]


@pytest.mark.parametrize("retained", [Retention(count=2)], indirect=True)
async def test_beyond_the_count_the_oldest_finished_go_and_running_ones_stay(
    retained: JobManager,
) -> None:
    running = await retained.start(JobSpec(argv=["sleep", "1000"]))  # the oldest of all
    ended = [await run_to_end(retained, ["true"]) for _ in range(4)]
    # Forgotten at once, their files removed in a thread just after.
    await until(lambda: kept(retained) == [running.id, *ended[2:]])
    await until(lambda: not any((retained.jobs_dir / job).exists() for job in ended[:2]))
    assert all((retained.jobs_dir / job).exists() for job in [running.id, *ended[2:]])


async def run_as(jobs: JobManager, owner: str, argv: list[str]) -> str:
    job = await jobs.start(JobSpec(argv=argv, owner=owner))
    await jobs.wait(job.id)
    return job.id


@pytest.mark.parametrize("retained", [Retention(count=2)], indirect=True)
async def test_one_owners_jobs_push_out_only_that_owners_history(retained: JobManager) -> None:
    bobs = await run_as(retained, "bob", ["true"])  # the oldest finished job of all
    alices = [await run_as(retained, "alice", ["true"]) for _ in range(4)]
    await until(lambda: kept(retained) == [bobs, *alices[2:]])


@pytest.mark.parametrize("retained", [Retention(log_bytes=150_000)], indirect=True)
async def test_the_log_size_bound_is_each_owners(retained: JobManager) -> None:
    bobs = await run_as(retained, "bob", ["head", "-c", "100000", "/dev/zero"])
    alices = [
        await run_as(retained, "alice", ["head", "-c", "100000", "/dev/zero"]) for _ in range(3)
    ]
    await until(lambda: kept(retained) == [bobs, alices[-1]])


@pytest.mark.parametrize("retained", [Retention(count=5, total_count=3)], indirect=True)
async def test_the_totals_are_a_last_resort_over_every_owner(retained: JobManager) -> None:
    bobs = await run_as(retained, "bob", ["true"])
    alices = [await run_as(retained, "alice", ["true"]) for _ in range(3)]
    # Within alice's own bound of 5, the total of 3 takes the oldest of anyone's.
    await until(lambda: kept(retained) == alices)
    assert bobs not in kept(retained)


@pytest.mark.parametrize("retained", [Retention(age=0.5)], indirect=True)
async def test_a_finished_job_goes_when_it_is_older_than_the_age(retained: JobManager) -> None:
    running = await retained.start(JobSpec(argv=["sleep", "1000"]))
    ended = await run_to_end(retained, ["true"])
    assert ended in kept(retained)  # not before its time
    await until(lambda: kept(retained) == [running.id])  # about 0.5 s later


@pytest.mark.parametrize("retained", [Retention(log_bytes=250_000)], indirect=True)
async def test_beyond_the_log_size_the_oldest_finished_go(retained: JobManager) -> None:
    ended = [await run_to_end(retained, ["head", "-c", "100000", "/dev/zero"]) for _ in range(4)]
    await until(lambda: kept(retained) == ended[2:])


async def test_corrald_keeps_what_its_flags_say(pki_dir: Path, short_dir: Path) -> None:
    with running_corrald(pki_dir, short_dir, "--keep-finished", "1") as daemon:
        async with connect(daemon.tcp, identity(pki_dir, "alice")) as alice:
            first = await alice.start(["true"])
            await alice.wait(first.id)
            second = await alice.start(["true"])
            await alice.wait(second.id)
            # corrald removes the first right after the second ends.
            await until_async(alice.list, lambda jobs: [job.id for job in jobs] == [second.id])


async def test_run_reconnects_and_resumes_across_a_corrald_restart(
    pki_dir: Path, short_dir: Path
) -> None:
    admin_id = identity(pki_dir, "admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_IDENTITY"] = str(admin_id)
    try:
        with running_corrald(pki_dir, short_dir, end_its_jobs=False) as first:
            env["CORRAL_ADDR"] = first.unix  # the next corrald listens on the same path
            cli = subprocess.Popen(
                [*CORRAL, "run", "--reconnect-for", "30s", "--", "sh", "-c", COUNTER],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            )  # fmt: skip
            assert cli.stdout is not None
            assert cli.stderr is not None
            seen = b""
            while seen.count(b"\n") < 20:  # the job runs and its output flows
                seen += await trio.to_thread.run_sync(cli.stdout.read1)  # type: ignore[attr-defined]
            first.process.kill()
            await trio.to_thread.run_sync(first.process.wait)
        note = await trio.to_thread.run_sync(cli.stderr.readline)
        assert b"reconnecting (for up to 30 s)" in note
        with running_corrald(pki_dir, short_dir) as second:
            note = await trio.to_thread.run_sync(cli.stderr.readline)
            assert b"reconnected; resuming job" in note
            async with connect(second.unix, admin_id) as admin:
                (job,) = await admin.list()
                while seen.count(b"\n") < 200:  # output after the restart reaches it
                    seen += await trio.to_thread.run_sync(cli.stdout.read1)  # type: ignore[attr-defined]
                await admin.stop(job.id, grace=5)
            rest, errors = await trio.to_thread.run_sync(cli.communicate)
        assert cli.returncode == 128 + signal.SIGTERM, errors
        numbers = [int(line) for line in (seen + rest).split()]
        assert numbers == list(range(1, len(numbers) + 1))  # none lost, none twice
    finally:
        end_jobs(short_dir / "state")


async def test_a_shim_whose_pid_was_never_recorded_is_found(pki_dir: Path, short_dir: Path) -> None:
    admin_id = identity(pki_dir, "admin")
    try:
        with running_corrald(pki_dir, short_dir, end_its_jobs=False) as first:
            async with connect(first.tcp, admin_id) as admin:
                job = await admin.start(["sleep", "1000"])
            first.process.kill()
            await trio.to_thread.run_sync(first.process.wait)
        # As if corrald died between writing "starting" and the shim writing its pid.
        directory = first.state_dir / "jobs" / job.id
        status = read_status(directory)
        assert status is not None
        write_status(directory, replace(status, state=State.STARTING, shim_pid=None))
        with running_corrald(pki_dir, short_dir) as second:
            async with connect(second.tcp, admin_id) as admin:
                assert (await admin.status(job.id)).state == "running"
                final = await admin.stop(job.id, grace=0)
                assert (final.state, final.signal) == ("stopped", "SIGKILL")
    finally:
        end_jobs(short_dir / "state")

"""Quotas that keep one tenant from starving another: the output logs a
user's finished jobs keep on disk, and the descriptors kept for admins
(with the cap on all sessions, which no longer keeps an admin out)."""

from __future__ import annotations

import os
import resource
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.errors import OperationError
from corral.identity import Identity
from corral.job import JobSpec
from corral.protocol import ErrorCode
from corral.shim import libc
from corral.store import OUTPUT_FILE
from corral.supervisor.descriptors import MIN_RESERVE, Descriptors, default_reserve
from corral.supervisor.flags import build_parser
from corral.units import format_size
from corral.worker.admission import MAX_LOG_BYTES_PER_OWNER, Admission, log_quota
from corral.worker.manager import Job, JobManager, open_job_manager

from .conftest import TEST_CGROUP_PARENT, identity, running_corrald

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

WRITE_100K = ["head", "-c", "100000", "/dev/zero"]

ALICE = Identity("alice", "user")


async def run_as(jobs: JobManager, owner: str, argv: list[str]) -> Job:
    job = await jobs.start(JobSpec(argv=argv, owner=owner))
    await jobs.wait(job.id)
    return job


def log_size(job: Job) -> int:
    return (job.directory / OUTPUT_FILE).stat().st_size


# -- the output logs a user's finished jobs keep -------------------------------------


async def test_a_user_over_the_log_quota_is_refused_until_they_remove_some(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    admission = Admission(max_log_bytes_per_owner=150_000)
    async with open_job_manager(
        state, cgroup_parent=TEST_CGROUP_PARENT, warm=0, admission=admission
    ) as jobs:
        first = await run_as(jobs, "alice", WRITE_100K)
        second = await run_as(jobs, "alice", WRITE_100K)  # under the quota when it started
        kept = log_size(first) + log_size(second)
        with pytest.raises(OperationError) as caught:
            await run_as(jobs, "alice", ["true"])
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert str(caught.value) == (
            f"alice's finished jobs keep {format_size(kept)} of output logs, the most one "
            "user may keep (150000B); remove some (`corral rm --finished`) to start more"
        )
        assert len(jobs.jobs(owner=ALICE)) == 2  # the refused start left nothing
        await run_as(jobs, "bob", WRITE_100K)  # another user's logs are theirs
        await jobs.remove(first.id)
        await run_as(jobs, "alice", ["true"])

    # A restarted manager counts what the state directory holds.
    async with open_job_manager(
        state, cgroup_parent=TEST_CGROUP_PARENT, warm=0, admission=admission
    ) as jobs:
        await run_as(jobs, "alice", WRITE_100K)
        with pytest.raises(OperationError) as caught:
            await run_as(jobs, "alice", ["true"])
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED


async def test_corrald_refuses_a_user_over_the_log_quota_an_admin_too(
    pki_dir: Path, short_dir: Path
) -> None:
    with running_corrald(pki_dir, short_dir, "--max-log-size-per-user", "64K") as daemon:
        for name in ("alice", "admin"):
            async with connect(daemon.tcp, identity(pki_dir, name)) as client:
                job = await client.start(WRITE_100K)
                await client.wait(job.id)
                with pytest.raises(ServerError) as refused:
                    await client.start(["true"])
                assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
                assert "the most one user may keep (64K)" in str(refused.value)
                await client.remove(job.id)
                await client.wait((await client.start(["true"])).id)


def test_the_log_quota_flag_takes_a_size() -> None:
    assert build_parser().parse_args([]).max_log_size_per_user is None  # the default
    args = build_parser().parse_args(["--max-log-size-per-user", "20G"])
    assert args.max_log_size_per_user == 20 << 30


def test_the_default_log_quota_is_a_quarter_of_a_small_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    libc.mount("tmpfs", str(disk), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=4M")
    try:
        assert log_quota(disk) == 1 << 20
    finally:
        libc.umount(str(disk), libc.MNT_DETACH)
    big = os.statvfs(tmp_path)
    assert log_quota(tmp_path) == min(MAX_LOG_BYTES_PER_OWNER, big.f_blocks * big.f_frsize // 4)


# -- descriptors: the reserve kept for admins ------------------------------------------

# corrald's open-file limit in these tests: the reserve is then MIN_RESERVE.
LOW_LIMIT = 256


async def until_refused(attempt: Callable[[], Awaitable[object]], most: int) -> ServerError:
    """Call `attempt` until corrald refuses it (at most `most` times)."""
    for _ in range(most):
        try:
            await attempt()
        except ServerError as exc:
            return exc
    raise AssertionError(f"{most} attempts and none refused")


async def connect_until_refused(
    stack: AsyncExitStack, address: str, who: Path, most: int
) -> tuple[list[Client], ServerError]:
    """Connect as `who` until corrald refuses (at most `most` times)."""
    held: list[Client] = []
    for _ in range(most):
        try:
            held.append(await stack.enter_async_context(connect(address, who)))
        except ServerError as exc:
            return held, exc
    raise AssertionError(f"{most} connections and none refused")


async def test_users_cannot_take_the_admins_reserve_of_descriptors(
    pki_dir: Path, short_dir: Path
) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        # As a hard limit would be, had corrald been started under it.
        resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (LOW_LIMIT, LOW_LIMIT))
        async with AsyncExitStack() as alices_stack:
            alices, refused = await connect_until_refused(
                alices_stack, daemon.tcp, identity(pki_dir, "alice"), LOW_LIMIT
            )
            assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
            assert f"keeps the last {MIN_RESERVE} for admins" in str(refused)
            assert "no more connections from users" in str(refused)
            assert len(alices) > LOW_LIMIT // 2  # her own cap was not what stopped her
            with pytest.raises(ServerError) as also:
                async with connect(daemon.tcp, identity(pki_dir, "bob")):
                    pass
            assert also.value.code is ErrorCode.RESOURCE_EXHAUSTED
            # Nor may she take them with jobs (a running one holds a pidfd)
            # through a session she holds, past the last one before the reserve.
            no_job = await until_refused(lambda: alices[0].start(["sleep", "1000"]), 3)
            assert no_job.code is ErrorCode.RESOURCE_EXHAUSTED
            assert "no more jobs from users" in str(no_job)

            # An admin still gets in, for a few sessions, and may start a
            # job and follow it.
            async with AsyncExitStack() as admins_stack:
                admins = [
                    await admins_stack.enter_async_context(
                        connect(daemon.tcp, identity(pki_dir, "admin"))
                    )
                    for _ in range(4)
                ]
                descriptors = (await admins[0].info()).raw["process"]["descriptors"]
                assert (descriptors["limit"], descriptors["reserve"]) == (LOW_LIMIT, MIN_RESERVE)
                assert descriptors["open"] >= LOW_LIMIT - MIN_RESERVE
                job = await admins[1].start(["sh", "-c", "echo hi; exec sleep 1000"])
                async with admins[2].logs(job.id, follow=True) as stream:
                    async for chunk in stream.chunks():
                        assert b"hi\n" in chunk.data
                        break
                await admins[1].stop(job.id, grace=0)

            # What her connections held is free again once she closes them.
            await alices_stack.aclose()
            async with connect(daemon.tcp, identity(pki_dir, "bob")) as bob:
                await bob.wait((await bob.start(["true"])).id)


async def test_a_users_output_streams_cannot_take_the_admins_reserve(
    pki_dir: Path, short_dir: Path
) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        async with AsyncExitStack() as stack:
            # Four connections: each carries at most 64 requests (streams) at once.
            alices = [
                await stack.enter_async_context(connect(daemon.tcp, identity(pki_dir, "alice")))
                for _ in range(4)
            ]
            job = await alices[0].start(["sh", "-c", "echo hi; exec sleep 1000"])
            followed = 0

            async def follow() -> None:
                nonlocal followed
                client = alices[followed % len(alices)]
                stream = await stack.enter_async_context(client.logs(job.id, follow=True))
                async for _ in stream.chunks():  # open, and counted, once data comes
                    break
                followed += 1

            # Her connections are in; now corrald is near its limit.
            resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (LOW_LIMIT, LOW_LIMIT))
            refused = await until_refused(follow, LOW_LIMIT)
            assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
            assert "no more output streams from users" in str(refused)
            assert followed > LOW_LIMIT // 2
            async with connect(daemon.tcp, identity(pki_dir, "admin")) as admin:
                await admin.stop(job.id, grace=0)


def test_the_reserve_is_a_share_of_the_limit_with_a_floor() -> None:
    assert default_reserve(20_000) == 1000
    assert default_reserve(256) == MIN_RESERVE
    assert default_reserve(100) == 50  # never more than half


def test_without_a_sized_fd_directory_the_count_is_a_listing_moved_by_what_is_held() -> None:
    """Kernels before 6.2 give /proc/self/fd no size; fdinfo has none on any."""
    held = [0]
    descriptors = Descriptors(fd_dir=Path("/proc/self/fdinfo"), held=lambda: held[0])
    exact = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd")) - 1
    assert descriptors.count() == exact
    pipes = [os.pipe() for _ in range(5)]
    try:
        held[0] = 10  # what the server took meanwhile, without a new listing
        assert descriptors.count() == exact + 10
    finally:
        for read, write in pipes:
            os.close(read)
            os.close(write)


# -- the cap on all sessions -----------------------------------------------------------


async def test_the_cap_on_all_sessions_does_not_keep_an_admin_out(
    pki_dir: Path, short_dir: Path
) -> None:
    caps = ("--max-connections", "3", "--max-connections-per-user", "2")
    with running_corrald(pki_dir, short_dir, *caps) as daemon:
        async with AsyncExitStack() as stack:
            for name in ("alice", "alice", "bob"):
                await stack.enter_async_context(connect(daemon.tcp, identity(pki_dir, name)))
            with pytest.raises(ServerError) as refused:
                await stack.enter_async_context(connect(daemon.tcp, identity(pki_dir, "bob")))
            assert "its maximum of 3 connections" in str(refused.value)
            async with connect(daemon.tcp, identity(pki_dir, "admin")) as admin:
                assert (await admin.info()).raw["connections"] == 4

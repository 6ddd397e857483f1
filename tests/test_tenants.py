"""Tenants apart: what one user's jobs can take from another's, against a
real corrald with no configuration at all, and real jobs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.protocol import ErrorCode
from corral.supervisor.policy import USER_PIDS, builtin_user_caps

from .conftest import Daemon, identity, job_output, running_corrald

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

# Forks until the kernel refuses, then says how many it made, and waits.
FORK_BOMB = """
import os, time
forked = 0
try:
    while forked < 5000:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        forked += 1
except OSError as exc:
    print("forked", forked, exc.strerror, flush=True)
time.sleep(1000)
"""


@pytest.fixture
def bare(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    """corrald as `make run` starts it: no config file, no policy flags."""
    with running_corrald(pki_dir, short_dir) as daemon:
        yield daemon


@pytest.fixture
async def alice(bare: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(bare.tcp, identity(pki_dir, "alice")) as client:
        yield client


async def test_with_no_configuration_a_users_job_is_bounded_and_an_admins_is_not(
    bare: Daemon, pki_dir: Path, alice: Client
) -> None:
    job = await alice.start(["true"])
    assert job.limits == builtin_user_caps()  # a process count and a share of the RAM
    async with connect(bare.tcp, identity(pki_dir, "admin")) as admin:
        assert (await admin.start(["true"])).limits == {}
        shown = (await alice.info()).raw["policy"]["caps"]
        assert shown == builtin_user_caps()


async def test_a_fork_bomb_under_the_default_policy_is_contained(alice: Client) -> None:
    bomb = await alice.start(["python3", "-c", FORK_BOMB])
    said = b""
    async with alice.logs(bomb.id, follow=True) as stream:
        async for chunk in stream.chunks():
            said += chunk.data
            if b"forked" in said:
                break
    assert b"Resource temporarily unavailable" in said  # EAGAIN: the pids cap
    forked = int(said.split(b"forked ")[1].split()[0])
    # init and the shell count too: the kernel refused the rest.
    assert forked <= USER_PIDS - 2
    # The host, and the user, go on: the next job starts and runs normally.
    with trio.fail_after(30):
        after = await alice.start(["echo", "fine"])
        assert (await alice.wait(after.id)).exit_code == 0
    assert await job_output(alice, after.id) == b"fine\n"
    stopped = await alice.stop(bomb.id, grace=0)
    assert stopped.state == "stopped"


async def follow_to_end(client: Client, job_id: str) -> None:
    async with client.logs(job_id, follow=True) as stream:
        async for _ in stream.chunks():
            pass


async def test_one_user_cannot_hold_every_stream_and_an_admin_still_can(
    pki_dir: Path, short_dir: Path
) -> None:
    """Each open `logs -f` or `attach` holds a descriptor of corrald's: a
    user's are capped on all their connections together; an admin's not."""
    with running_corrald(pki_dir, short_dir, "--max-streams-per-user", "2") as daemon:
        async with (
            connect(daemon.tcp, identity(pki_dir, "alice")) as first,
            connect(daemon.tcp, identity(pki_dir, "alice")) as second,
            connect(daemon.tcp, identity(pki_dir, "admin")) as admin,
        ):
            job = await first.start(["sh", "-c", "echo hi; exec sleep 1000"], stdin=True)
            async with (
                first.logs(job.id, follow=True) as following,
                second.attach(job.id) as attached,
            ):
                # Each is inside corrald's count once it moves: output came on
                # the one, input credit for the other.
                await anext(aiter(following.chunks()))
                await attached.send(b"x")
                with pytest.raises(ServerError) as refused:
                    await follow_to_end(second, job.id)
                assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
                assert "alice has 2 output streams open" in str(refused.value)
                async with admin.logs(job.id, follow=True) as watching:
                    await admin.stop(job.id, grace=0)
                    async for _ in watching.chunks():
                        pass
            assert (await first.status(job.id)).state == "stopped"
            # Closed streams are free again.
            async with first.logs(job.id) as again:
                async for _ in again.chunks():
                    pass


async def forked_by(client: Client, job_id: str) -> int:
    """How many processes a FORK_BOMB job made before the kernel refused."""
    said = b""
    async with client.logs(job_id, follow=True) as stream:
        async for record in stream:
            said += record.data if isinstance(record.data, bytes) else b""
            if b"forked" in said:
                break
    assert b"Resource temporarily unavailable" in said, said
    return int(said.split(b"forked ")[1].split()[0])


async def host_cgroup(client: Client, job_id: str) -> str:
    """The cgroup of the job's init as the host sees it (the job itself sees
    its own cgroup as /, in a cgroup namespace of its own)."""
    pid = (await client.status(job_id)).raw["pid"]
    return Path(f"/proc/{pid}/cgroup").read_text()


@pytest.mark.cgroup  # the v2 lane too
async def test_a_users_jobs_together_are_held_to_the_users_quota(
    pki_dir: Path, short_dir: Path
) -> None:
    """Each job may fork USER_PIDS processes; a user's jobs together, only
    the quota. Another user's slice is their own: their jobs start as usual.
    (50 jobs of one user fare the same: the slice counts every process in it.)"""
    with running_corrald(pki_dir, short_dir, "--user-quota", "pids=40") as daemon:
        async with (
            connect(daemon.tcp, identity(pki_dir, "alice")) as alice,
            connect(daemon.tcp, identity(pki_dir, "bob")) as bob,
            connect(daemon.tcp, identity(pki_dir, "admin")) as admin,
        ):
            assert (await alice.info()).raw["policy"]["quota"]["pids"] == 40
            bomb = await alice.start(["python3", "-c", FORK_BOMB])
            # Its own cap is USER_PIDS; its init and python count too, and
            # the init of the sandbox built ahead for alice's next job if it
            # was there first: the slice held them to 40 in all.
            assert 40 - 3 <= await forked_by(alice, bomb.id) <= 40 - 2
            with pytest.raises(ServerError) as full:  # nor can another job of hers fork
                await alice.start(["true"])
            assert "Resource temporarily unavailable" in str(full.value)
            seen = await bob.start(["sleep", "60"])
            assert "/owner-user-bob/" in await host_cgroup(bob, seen.id)
            await bob.stop(seen.id, grace=0)
            await admin.stop(bomb.id, grace=0)
            with trio.fail_after(30):  # alice's slice is free again: her next job runs
                again = await alice.start(["sleep", "60"])
                assert "/owner-user-alice/" in await host_cgroup(alice, again.id)
            await alice.stop(again.id, grace=0)

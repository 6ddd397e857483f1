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

from .conftest import Daemon, identity, running_corrald

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


async def output_of(client: Client, job_id: str) -> bytes:
    async with client.logs(job_id, follow=True) as stream:
        return b"".join([r.data async for r in stream if isinstance(r.data, bytes)])


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
    assert await output_of(alice, after.id) == b"fine\n"
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

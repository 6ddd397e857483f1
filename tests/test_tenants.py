"""Tenants apart: what one user's jobs can take from another's, against a
real corrald with no configuration at all, and real jobs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
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

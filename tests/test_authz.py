"""Authorization end to end: every job operation x {admin, the owner, another
user} x {the owner's job, the admin's job, a missing job}, over mutual TLS
against a real corrald with user caps.

An allowed call does what it does (stopping a job that has ended included:
it is stopped already); a refused one is `not_found` with the very message
a missing job gets.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from corral import pki
from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.protocol import ErrorCode
from corral.supervisor.policy import USER_PIDS, builtin_user_quota

from .conftest import Daemon, identity, running_corrald

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

MISSING = "0123456789abcdef0123456789abcdef"  # a well-formed id no job has


@pytest.fixture
def capped(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(
        pki_dir, short_dir,
        "--user-cap", "memory=256M", "--user-cap", "max_runtime=1h", "--default", "pids=64",
    ) as daemon:  # fmt: skip
        yield daemon


@pytest.fixture
async def clients(capped: Daemon, pki_dir: Path) -> AsyncIterator[dict[str, Client]]:
    async with AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(connect(capped.tcp, identity(pki_dir, name)))
            for name in ("admin", "alice", "bob")
        }


async def outcome(call: Awaitable[object]) -> str:
    """'ok', or the error code and message of a refusal."""
    try:
        await call
    except ServerError as exc:
        return f"{exc.code}: {exc}"
    return "ok"


async def read_logs(client: Client, job_id: str) -> None:
    async with client.logs(job_id, follow=True) as stream:
        async for _ in stream.chunks():
            pass


async def attach(client: Client, job_id: str) -> None:
    async with client.attach(job_id) as attached:
        async for _ in attached.chunks():
            pass


OPERATIONS: dict[str, Callable[[Client, str], Awaitable[object]]] = {
    "status": lambda client, job_id: client.status(job_id),
    "wait": lambda client, job_id: client.wait(job_id),
    "logs": read_logs,
    "stop": lambda client, job_id: client.stop(job_id, grace=0),
    "remove": lambda client, job_id: client.remove(job_id),
    "attach": attach,
    "resize": lambda client, job_id: client.resize(job_id, 80, 24),
}
# What an allowed call answers for a job that has ended: all succeed (a
# stop of an ended job is stopped already, as `docker stop` has it) but
# what needs a running job.
ALLOWED = dict.fromkeys(OPERATIONS, "ok") | {
    "attach": "failed_precondition: job {id} has ended (exited with code 0); "
    "`corral logs {id}` shows its output",
    "resize": "failed_precondition: job {id} has no terminal: it was started without -t",
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_every_operation_by_every_caller_on_every_job(
    clients: dict[str, Client], operation: str
) -> None:
    call = OPERATIONS[operation]
    for caller in ("admin", "alice", "bob"):
        for owner in ("alice", "admin", None):
            job_id = MISSING
            if owner is not None:  # a fresh, ended job, so that remove can succeed
                job = await clients[owner].start(["true"])
                await clients[owner].wait(job.id)
                job_id = job.id
            result = await outcome(call(clients[caller], job_id))
            if owner is not None and caller in ("admin", owner):
                assert result == ALLOWED[operation].format(id=job_id[:12]), (caller, owner)
            else:  # missing, or another's: the same answer, word for word
                assert result == f"not_found: no job {job_id!r}", (caller, owner)


async def test_listing_shows_a_user_their_own_jobs_even_with_all(
    clients: dict[str, Client],
) -> None:
    mine = await clients["alice"].start(["true"])
    theirs = await clients["admin"].start(["true"])
    for everyone in (False, True):
        assert [job.id for job in await clients["alice"].list(everyone=everyone)] == [mine.id]
        assert await clients["bob"].list(everyone=everyone) == []
    assert {job.id for job in await clients["admin"].list(everyone=True)} == {mine.id, theirs.id}
    assert [job.id for job in await clients["admin"].list()] == [theirs.id]
    assert (await clients["alice"].info()).jobs == 1  # counts are of one's own jobs
    assert (await clients["admin"].info()).jobs == 2


async def test_a_user_asking_for_root_or_over_a_cap_is_refused_and_an_admin_is_not(
    clients: dict[str, Client],
) -> None:
    alice, admin = clients["alice"], clients["admin"]
    refusals = [
        await outcome(alice.start(["id", "-u"], user="root")),
        await outcome(alice.start(["true"], limits={"memory": 512 << 20})),
        await outcome(alice.start(["true"], max_runtime=7200)),
    ]
    assert refusals == [
        "permission_denied: only an admin may choose the user a job runs as; "
        "yours run as a uid of their own (dynamic)",
        "permission_denied: limits.memory: 512M is over the user cap of 256M",
        "permission_denied: max_runtime: 2h is over the user cap of 1h",
    ]
    assert await alice.list() == []  # refused starts leave nothing behind
    job = await alice.start(["true"])  # unset limits: the default and the caps
    assert job.limits == {"memory": 256 << 20, "pids": 64}
    assert job.raw["max_runtime"] == 3600
    big = await admin.start(["id", "-u"], user="root", limits={"memory": 512 << 20})
    assert (await admin.wait(big.id)).exit_code == 0
    assert big.limits == {"memory": 512 << 20, "pids": 64}
    policy = (await alice.info()).raw["policy"]
    assert policy == {
        "default_user": "dynamic",
        "host_root": False,  # never a user's to ask for
        "seccomp": "default",
        "seccomp_unconfined": False,  # nor going without the syscall filter
        "defaults": {"pids": 64},
        # The built-in pids cap stays under what the flags set.
        "caps": {"memory": 256 << 20, "pids": USER_PIDS, "max_runtime": 3600.0},
        "quota": builtin_user_quota(),  # all of alice's jobs together
        "writable": [],
    }
    # No writable paths for users' jobs unless configured.
    with pytest.raises(ServerError) as caught:
        await alice.start(["true"], writable=["/var/tmp"])
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    assert str(caught.value) == (
        "writable: '/var/tmp' is outside where a user's jobs may write (allowed: none)"
    )
    admins = await admin.start(["true"], writable=["/var/tmp"])
    assert (await admin.wait(admins.id)).exit_code == 0


async def test_a_user_streaming_another_users_job_gets_not_found(
    clients: dict[str, Client],
) -> None:
    job = await clients["admin"].start(["echo", "secret"])
    with pytest.raises(ServerError) as caught:
        await read_logs(clients["bob"], job.id)
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert str(caught.value) == f"no job {job.id!r}"


async def test_a_user_certificate_named_admin_owns_none_of_the_admins_jobs(
    capped: Daemon, clients: dict[str, Client], pki_dir: Path, tmp_path: Path
) -> None:
    """An owner is a name and a role: CN admin with OU user is another owner."""
    ca_key, ca_cert = pki.load_ca(pki_dir)
    key, cert = pki.make_client_cert(ca_key, ca_cert, "admin", "user")
    impostor_dir = tmp_path / "impostor"
    pki.write_identity(impostor_dir, ca_cert, key, cert)
    admin = clients["admin"]
    theirs = await admin.start(["sleep", "60"])
    async with connect(capped.tcp, impostor_dir) as impostor:
        assert (await impostor.info()).identity.role == "user"
        for name, call in OPERATIONS.items():
            assert await outcome(call(impostor, theirs.id)) == (
                f"not_found: no job {theirs.id!r}"
            ), name
        assert await impostor.list(everyone=True) == []
        assert (await impostor.info()).jobs == 0
        mine = await impostor.start(["true"])
        assert (await impostor.wait(mine.id)).exit_code == 0
        assert (mine.owner, mine.owner_role) == ("admin", "user")
        assert [job.id for job in await impostor.list()] == [mine.id]
    # The admin's job ran on, untouched; the admin sees both, apart.
    assert (await admin.status(theirs.id)).state == "running"
    owners = {job.id: (job.owner, job.owner_role) for job in await admin.list(everyone=True)}
    assert owners == {theirs.id: ("admin", "admin"), mine.id: ("admin", "user")}
    await admin.stop(theirs.id, grace=0)

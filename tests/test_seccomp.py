"""The syscall filter every job runs under: real jobs, real system calls
through ctypes, against a real corrald."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.protocol import ErrorCode

from .conftest import Daemon, identity, job_output, running_corrald

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

# x86_64 numbers; each call is made with arguments it would fail on anyway
# (EINVAL, EFAULT, EBADF) if the filter let it through, so the errno says
# who refused it.
CALLS = {
    "keyctl": (250, [0, 0, 0, 0]),
    "add_key": (248, [0, 0, 0, 0, 0]),
    "bpf": (321, [0, 0, 0]),
    "userfaultfd": (323, [0]),
    "perf_event_open": (298, [0, 0, 0, 0, 0]),
    "kexec_load": (246, [0, 0, 0, 0]),
    "init_module": (175, [0, 0, 0]),
    "mount": (165, [0, 0, 0, 0, 0]),
    "setns": (308, [-1, 0]),
    "open_by_handle_at": (304, [-1, 0, 0]),
    "unshare(CLONE_NEWUSER)": (272, [0x10000000]),
    "unshare(CLONE_NEWNS)": (272, [0x00020000]),
    "io_uring_setup": (425, [1, 0]),
    "clone3": (435, [0, 0]),
}
PROBE = """
import ctypes, errno, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
calls = json.loads(sys.argv[1])
seen = {}
for name, (number, args) in calls.items():
    result = libc.syscall(number, *[ctypes.c_long(a) for a in args])
    seen[name] = "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(seen))
"""
EXPECTED = {name: "EPERM" for name in CALLS} | {"io_uring_setup": "ENOSYS", "clone3": "ENOSYS"}
# A call of the x32 ABI (its bit set on an allowed call, getpid): another
# architecture's, which the filter kills.
X32 = "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('survived')"
# What ordinary programs do still works: threads, subprocesses (glibc's
# posix_spawn tries clone3 first, then clone), a shell pipeline, tar.
ORDINARY = (
    "python3 -c 'import threading, subprocess; t = threading.Thread(target=print, args=(1,)); "
    't.start(); t.join(); print(subprocess.run(["echo", "2"], capture_output=True, text=True)'
    ".stdout.strip())' && cd /tmp && echo data > f && tar cf f.tar f && tar tf f.tar | wc -l"
)


@pytest.fixture
def daemon(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(pki_dir, short_dir) as started:
        yield started


@pytest.fixture
async def admin(daemon: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(daemon.unix, identity(pki_dir, "admin")) as client:
        yield client


@pytest.fixture
async def alice(daemon: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(daemon.unix, identity(pki_dir, "alice")) as client:
        yield client


async def output_of(client: Client, job_id: str) -> str:
    return (await job_output(client, job_id)).decode()


async def probe(client: Client, **options: object) -> dict[str, str]:
    job = await client.start(["python3", "-c", PROBE, json.dumps(CALLS)], **options)  # type: ignore[arg-type]
    assert job.seccomp == options.get("seccomp", "default")
    result: dict[str, str] = json.loads(await output_of(client, job.id))
    return result


@pytest.mark.cgroup  # the v2 lane too: another kernel
@pytest.mark.parametrize("user", ["dynamic", "root"])
async def test_the_dangerous_calls_are_refused(admin: Client, user: str) -> None:
    assert await probe(admin, user=user) == EXPECTED


async def test_a_call_of_another_abi_kills_the_process(alice: Client) -> None:
    job = await alice.start(["python3", "-c", X32])
    status = await alice.wait(job.id)
    assert (status.state, status.signal) == ("exited", signal.Signals.SIGSYS.name)
    assert "survived" not in await output_of(alice, job.id)


async def test_ordinary_programs_run_under_the_filter(alice: Client) -> None:
    job = await alice.start(["sh", "-c", ORDINARY])
    assert await output_of(alice, job.id) == "1\n2\n1\n"
    assert (await alice.wait(job.id)).exit_code == 0


async def test_only_an_admin_may_go_unconfined(admin: Client, alice: Client) -> None:
    with pytest.raises(ServerError) as refused:
        await alice.start(["true"], seccomp="unconfined")
    assert refused.value.code is ErrorCode.PERMISSION_DENIED
    assert "only an admin" in str(refused.value)
    assert (await alice.info()).raw["policy"]["seccomp_unconfined"] is False
    unconfined = await probe(admin, user="root", seccomp="unconfined")
    # The kernel's own answers now: keyctl(0) is EINVAL, bpf a bad pointer...
    assert unconfined["keyctl"] != "EPERM"
    assert unconfined["io_uring_setup"] != "ENOSYS"

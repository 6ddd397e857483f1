"""A uid of its own for every job, and root that is root only inside: real
corralds, real jobs in real user namespaces.

What one tenant's job could take from another's when every job ran as
one host uid (`nobody`): the kernel's per-uid keyrings and counts. Each
test here fails against that corrald.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.protocol import ErrorCode
from corral.shim.userns import ROOT_CAPABILITIES
from corral.worker.uid_pool import UidRange

from .conftest import Daemon, end_jobs, identity, job_output, running_corrald, start_corrald

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

# A small range of the test's own: a leak shows within a few jobs.
SMALL = UidRange(0x70100000, 3)

# keyctl(2) through ctypes: a key in the caller's user keyring, found by
# the caller; another uid's search of its own user keyring finds nothing.
KEYRING = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_add_key, SYS_keyctl, KEYCTL_SEARCH, USER_KEYRING = 248, 250, 10, -4
if sys.argv[1] == "add":
    serial = libc.syscall(SYS_add_key, b"user", b"corral-test", b"secret", 6, USER_KEYRING)
    print("added", serial, flush=True)
    sys.stdin.read()
else:
    found = libc.syscall(SYS_keyctl, KEYCTL_SEARCH, USER_KEYRING, b"user", b"corral-test", 0)
    print("found" if found > 0 else os.strerror(ctypes.get_errno()), flush=True)
"""

# Takes every inotify instance its uid may have, says how many, and waits.
INOTIFY_HOG = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
held = []
while libc.inotify_init() >= 0:
    held.append(1)
print("held", len(held), os.strerror(ctypes.get_errno()), flush=True)
sys.stdin.read()
"""
INOTIFY_ONE = "import ctypes; print('inotify', ctypes.CDLL(None).inotify_init() >= 0)"

# POSIX message queues through ctypes: RLIMIT_MSGQUEUE is a budget of bytes
# per uid. Opens 64 KiB queues until the budget is spent (EMFILE), says how
# many, and waits; or opens one and says whether it could.
MQUEUES = """
import ctypes, os, sys
rt = ctypes.CDLL("librt.so.1", use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
attr = Attr(0, 8, 8192, 0)
opened = 0
while opened < 1000:
    if rt.mq_open(b"/corral-%d" % opened, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(attr)) < 0:
        break
    opened += 1
    if sys.argv[1] == "one":
        break
print("opened", opened, os.strerror(ctypes.get_errno()) if opened < 1000 else "", flush=True)
if sys.argv[1] == "all":
    sys.stdin.read()
"""


@pytest.fixture
def small(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(pki_dir, short_dir, "--uid-range", str(SMALL)) as daemon:
        yield daemon


@pytest.fixture
async def admin(small: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(small.tcp, identity(pki_dir, "admin")) as client:
        yield client


@pytest.fixture
async def alice(small: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(small.tcp, identity(pki_dir, "alice")) as client:
        yield client


@pytest.fixture
async def bob(small: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(small.tcp, identity(pki_dir, "bob")) as client:
        yield client


async def output_of(client: Client, job_id: str) -> str:
    return (await job_output(client, job_id)).decode()


async def first_line(client: Client, job_id: str) -> str:
    said = b""
    async with client.logs(job_id, follow=True) as stream:
        async for record in stream:
            said += record.data if isinstance(record.data, bytes) else b""
            if b"\n" in said:
                return said.decode().splitlines()[0]
    raise AssertionError(f"the job ended saying only {said!r}")


async def run(client: Client, argv: list[str], **options: object) -> tuple[str, int | None]:
    job = await client.start(argv, **options)  # type: ignore[arg-type]
    text = await output_of(client, job.id)
    return text, (await client.status(job.id)).exit_code


def capabilities(text: str, name: str) -> set[int]:
    line = next(line for line in text.splitlines() if line.startswith(f"{name}:"))
    mask = int(line.split()[1], 16)
    return {bit for bit in range(64) if mask >> bit & 1}


@pytest.mark.cgroup  # the v2 lane too: its kernel is another
async def test_a_job_is_a_uid_of_its_own_mapped_to_itself_alone(alice: Client) -> None:
    job = await alice.start(
        ["sh", "-c", "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; "
                     "grep -E '^Cap(Eff|Bnd|Amb)' /proc/self/status"]
    )  # fmt: skip
    text = await output_of(alice, job.id)
    assert job.uid in SMALL
    assert (job.user, job.runs_as) == ("dynamic", f"dynamic (uid {job.uid})")
    lines = text.splitlines()
    assert lines[:2] == [str(job.uid), str(job.uid)]
    # One mapping each: the job's uid to itself; every other id is nobody.
    assert lines[2].split() == [str(job.uid), str(job.uid), "1"]
    assert lines[3].split() == [str(job.uid), str(job.uid), "1"]
    for name in ("CapEff", "CapBnd", "CapAmb"):
        assert capabilities(text, name) == set(), name


@pytest.mark.cgroup  # the v2 lane too: its kernel is another
async def test_programs_that_look_their_user_up_find_one(alice: Client) -> None:
    text, code = await run(
        alice,
        ["sh", "-c", 'whoami; id -un; id -gn; echo "$HOME"; touch "$HOME/x" && echo home ok; '
                     "python3 -c 'import getpass, pwd, os; "
                     "print(getpass.getuser(), pwd.getpwuid(os.getuid()).pw_dir)'"],
    )  # fmt: skip
    assert code == 0, text
    assert text.splitlines() == ["job", "job", "job", "/tmp", "home ok", "job /tmp"]


@pytest.mark.cgroup  # the v2 lane too: its kernel is another
async def test_two_jobs_have_two_uids_and_two_keyrings(admin: Client) -> None:
    """The syscall filter refuses keyrings to users' jobs altogether (see
    test_seccomp.py); without it, as an admin may run jobs, the uids still
    keep two jobs' keyrings apart."""
    holder = await admin.start(["python3", "-c", KEYRING, "add"], stdin=True, seccomp="unconfined")
    said = await first_line(admin, holder.id)
    assert said.startswith("added "), said
    assert not said.startswith("added -"), said  # a serial, not an error
    searcher = await admin.start(["python3", "-c", KEYRING, "search"], seccomp="unconfined")
    assert searcher.uid != holder.uid
    text = await output_of(admin, searcher.id)
    assert text.strip() == "Required key not available"  # ENOKEY: not its key
    await admin.stop(holder.id, grace=0)


@pytest.mark.cgroup  # the v2 lane too: its kernel is another
async def test_one_users_job_cannot_take_anothers_inotify_instances(
    alice: Client, bob: Client
) -> None:
    hog = await alice.start(["python3", "-c", INOTIFY_HOG], stdin=True)
    said = await first_line(alice, hog.id)
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert said == f"held {limit} Too many open files"
    text, code = await run(bob, ["python3", "-c", INOTIFY_ONE])
    assert (text, code) == ("inotify True\n", 0)
    await alice.stop(hog.id, grace=0)


async def test_one_users_job_cannot_take_anothers_message_queue_bytes(
    alice: Client, bob: Client
) -> None:
    hog = await alice.start(["python3", "-c", MQUEUES, "all"], stdin=True)
    said = await first_line(alice, hog.id)
    assert said.startswith("opened "), said
    assert said.endswith("Too many open files"), said  # EMFILE: the bytes ran out
    assert 0 < int(said.split()[1]) < 1000  # its uid's RLIMIT_MSGQUEUE ran out
    text, code = await run(bob, ["python3", "-c", MQUEUES, "one"])
    assert (text.split()[:2], code) == (["opened", "1"], 0)
    await alice.stop(hog.id, grace=0)


@pytest.mark.cgroup  # the v2 lane too: its kernel is another
async def test_root_is_root_inside_with_dockers_capabilities_and_a_user_on_the_host(
    admin: Client, short_dir: Path
) -> None:
    root_only = short_dir / "root-only"
    root_only.mkdir(mode=0o755)  # root's; writable by root alone
    script = (
        "id -u; cat /proc/self/uid_map; grep -E '^Cap(Eff|Bnd|Inh)' /proc/self/status; "
        "touch /tmp/f && chown 0:0 /tmp/f && chmod 0 /tmp/f && cat /tmp/f && echo chowned; "
        'python3 -c \'import socket; socket.socket().bind(("127.0.0.1", 80)); print("port 80")\'; '
        f"touch {root_only}/x 2>&1; echo $?"
    )
    job = await admin.start(["sh", "-c", script], user="root", writable=[str(root_only)])
    text = await output_of(admin, job.id)
    lines = text.splitlines()
    assert job.uid in SMALL
    assert job.runs_as == f"root (uid 0 in its user namespace, {job.uid} on the host)"
    assert lines[0] == "0"
    assert lines[1].split() == ["0", str(job.uid), "1"]
    assert capabilities(text, "CapEff") == ROOT_CAPABILITIES
    assert capabilities(text, "CapBnd") == ROOT_CAPABILITIES
    assert capabilities(text, "CapInh") == set()
    assert "chowned" in lines  # DAC_OVERRIDE over its own file: it read a mode-0 file
    assert "port 80" in lines
    assert "Permission denied" in lines[-2]  # the host's root-only directory, even with --rw
    assert lines[-1] == "1"
    assert list(root_only.iterdir()) == []


async def test_host_root_is_for_admins_and_shows(admin: Client, alice: Client) -> None:
    with pytest.raises(ServerError) as refused:
        await alice.start(["true"], host_root=True)
    assert refused.value.code is ErrorCode.PERMISSION_DENIED
    assert "only an admin" in str(refused.value)
    job = await admin.start(["sh", "-c", "id -u; cat /proc/self/uid_map"], host_root=True)
    text = await output_of(admin, job.id)
    assert (job.host_root, job.uid, job.user, job.runs_as) == (
        True,
        None,
        "root",
        "root on the host",
    )
    assert text.split() == ["0", "0", "0", "4294967295"]  # the host's own user namespace


async def test_a_policy_may_allow_no_host_root(pki_dir: Path, short_dir: Path) -> None:
    config = short_dir / "policy.toml"
    config.write_text("allow_host_root = false\n")
    with running_corrald(pki_dir, short_dir, "--config", str(config)) as daemon:
        async with connect(daemon.tcp, identity(pki_dir, "admin")) as admin:
            assert (await admin.info()).raw["policy"]["host_root"] is False
            with pytest.raises(ServerError) as refused:
                await admin.start(["true"], host_root=True)
            assert refused.value.code is ErrorCode.PERMISSION_DENIED
            assert "allow_host_root = false" in str(refused.value)
            root = await admin.start(["id", "-u"], user="root")  # root inside: still allowed
            assert (await output_of(admin, root.id)) == "0\n"


async def test_uids_come_back_when_jobs_end_however_they_end(alice: Client, admin: Client) -> None:
    for i in range(4):  # 12 jobs through a pool of 3
        await run(alice, ["true"])
        with pytest.raises(ServerError):
            await alice.start(["/nonexistent"])  # failed to start: its uid comes back too
        sleeper = await alice.start(["sleep", "1000"])
        await alice.stop(sleeper.id, grace=0 if i % 2 else 1)
    held = [await alice.start(["sleep", "1000"]) for _ in range(SMALL.count)]
    assert {job.uid for job in held} == set(range(SMALL.start, SMALL.end))
    assert (await admin.info()).raw["uids"] == {
        "start": SMALL.start, "count": SMALL.count, "in_use": SMALL.count
    }  # fmt: skip
    with pytest.raises(ServerError) as refused:
        await alice.start(["true"])
    assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "--uid-range" in str(refused.value)
    await alice.stop(held[0].id, grace=0)
    assert (await alice.start(["true"])).uid == held[0].uid


async def test_a_restart_keeps_running_jobs_uids_from_new_jobs(
    pki_dir: Path, short_dir: Path
) -> None:
    flags = ("--uid-range", str(SMALL), "--keep-jobs")
    admin_id = identity(pki_dir, "admin")
    try:
        with running_corrald(pki_dir, short_dir, *flags, end_its_jobs=False) as first:
            async with connect(first.tcp, admin_id) as admin:
                kept = [await admin.start(["sleep", "1000"]) for _ in range(2)]
            first.process.send_signal(signal.SIGKILL)  # a crash: no goodbye
            await trio.to_thread.run_sync(first.process.wait)
        with running_corrald(pki_dir, short_dir, *flags) as second:
            async with connect(second.tcp, admin_id) as admin:
                new = await admin.start(["sleep", "1000"])
                assert new.uid not in {job.uid for job in kept}
                with pytest.raises(ServerError) as refused:
                    await admin.start(["true"])
                assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
    finally:
        end_jobs(short_dir / "state")


def test_corrald_refuses_a_range_that_holds_a_host_user(pki_dir: Path, short_dir: Path) -> None:
    process = start_corrald(
        "--state-dir", str(short_dir / "state"), "--pki", str(pki_dir),
        "--listen", "127.0.0.1:0", "--uid-range", "0:100",
    )  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2  # argparse: 0 is root
    assert "--uid-range" in stderr
    process = start_corrald(
        "--state-dir", str(short_dir / "state"), "--pki", str(pki_dir),
        "--listen", "127.0.0.1:0", "--uid-range", "1:100",
    )  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 78  # EX_CONFIG, as every configuration error
    assert stderr.startswith("corrald: error: --uid-range 1:100 holds user daemon (uid 1)")

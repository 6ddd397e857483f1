"""Jobs through the worker library: real shims, namespaces and cgroups, as root.

Every test here starts real processes in real namespaces and cgroups. They
need root and a cgroup hierarchy; CI runs them (CORRAL_STRICT_SKIPS=1 makes
a skip fail the run).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from corral import ipc
from corral.errors import OperationError
from corral.identity import Identity
from corral.job import JobSpec, Limits, State, Status, new_job_id
from corral.protocol import ErrorCode
from corral.shim import libc
from corral.shim.cgroup import (
    ROOT,
    CgroupError,
    Flavour,
    detect_flavour,
    open_cgroup,
    orphans,
    slice_name,
)
from corral.shim.launch import WARM_NICENESS
from corral.store import OUTPUT_FILE
from corral.supervisor.heartbeat import live_tasks
from corral.worker import spawner_pool
from corral.worker.manager import Admission, Job, JobManager, open_job_manager
from corral.worker.sandboxes import SandboxRecords
from corral.worker.spawner import Spawner

from .conftest import TEST_CGROUP_PARENT, managed_jobs, open_fds, until

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

FLAVOUR = detect_flavour()
PARENT = TEST_CGROUP_PARENT
MS_BIND = 4096
MS_SHARED = 1 << 20

ALICE, BOB = Identity("alice", "user"), Identity("bob", "user")
NOBODY = Identity("", "user")  # the owner of a JobSpec that names none


def records(job_dir: Path) -> list[list[object]]:
    """The msgpack records of a job's output.log."""
    return list(msgpack.Unpacker(open(job_dir / OUTPUT_FILE, "rb"), raw=False))


def output(job_dir: Path, stream: int = 1) -> bytes:
    return b"".join(r[2] for r in records(job_dir) if r[0] == stream)  # type: ignore[misc]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory jobs running as nobody can read and write, on the real disk
    (not /tmp, which each job gets its own of)."""
    directory = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/var/tmp"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=[1, 0], ids=["warm", "cold"])
async def jobs(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobManager]:
    """A JobManager on a fresh state directory, under a cgroup parent of its own,
    with a sandbox built ahead of each start (warm) or none (cold): the two
    halves of a start run apart or back to back, and both must work.

    Afterwards: every job has ended and no cgroup of ours is left.
    """
    async with managed_jobs(tmp_path / "state", warm=request.param) as manager:
        yield manager


async def start_ready(jobs: JobManager, script: str) -> Job:
    """Start `sh -c script` and return once it has printed "ready" (its traps are set)."""
    job = await jobs.start(JobSpec(argv=["sh", "-c", script]))
    await until(lambda: b"ready" in output(job.directory))
    return job


async def run(jobs: JobManager, *argv: str | bytes, **spec: object) -> tuple[Status, Path]:
    job = await jobs.start(JobSpec(argv=list(argv), **spec))  # type: ignore[arg-type]
    return await jobs.wait(job.id), job.directory


# -- exit status ------------------------------------------------------------------


@pytest.mark.cgroup
@pytest.mark.parametrize("code", [0, 3, 255])
async def test_exit_codes(jobs: JobManager, code: int) -> None:
    status, _ = await run(jobs, "sh", "-c", f"exit {code}")
    assert status.state is State.EXITED
    assert (status.exit_code, status.signal, status.oom_killed) == (code, None, False)
    assert status.reason == f"exited with code {code}"
    assert status.started_at
    assert status.finished_at
    assert status.finished_at >= status.started_at


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGKILL])
async def test_death_by_signal_is_named(jobs: JobManager, signum: signal.Signals) -> None:
    status, _ = await run(jobs, "sh", "-c", f"kill -{signum.name.removeprefix('SIG')} $$")
    assert status.state is State.EXITED
    assert (status.exit_code, status.signal) == (None, signum.name)
    assert status.reason == f"killed by {signum.name}"


async def test_output_lands_in_the_log(jobs: JobManager) -> None:
    status, directory = await run(jobs, "sh", "-c", "echo out; echo err >&2")
    assert status.exit_code == 0
    assert output(directory, 1) == b"out\n"
    assert output(directory, 2) == b"err\n"


# -- start failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "code", "step", "words"),
    [
        ({"argv": ["no-such-program-xyz"]}, ErrorCode.INVALID_ARGUMENT, "exec",
         "cannot run 'no-such-program-xyz': not found in PATH="),
        ({"argv": ["/etc/shadow"]}, ErrorCode.FAILED_PRECONDITION, "exec",
         "cannot run '/etc/shadow': Permission denied"),
        ({"argv": ["true"], "cwd": "/no/such/dir"}, ErrorCode.INVALID_ARGUMENT, "cwd",
         "cannot change to directory '/no/such/dir'"),
        ({"argv": ["true"], "user": "no-such-user-xyz"}, ErrorCode.INVALID_ARGUMENT, "user",
         "unknown user 'no-such-user-xyz'"),
        ({"argv": ["true"], "writable": ["/no/such/dir"]}, ErrorCode.INVALID_ARGUMENT,
         "writable", "cannot make a path writable: open(/no/such/dir): No such file"),
        ({"argv": ["true"], "writable": ["/bin"]}, ErrorCode.INVALID_ARGUMENT,
         "writable", "cannot make a path writable: /bin passes through a symbolic link; "
         "give the path it leads to"),
    ],
)  # fmt: skip
async def test_start_failures_are_clear_and_recorded(
    jobs: JobManager, spec: dict[str, object], code: ErrorCode, step: str, words: str
) -> None:
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(**spec))  # type: ignore[arg-type]
    assert caught.value.code is code
    assert words in str(caught.value)
    (job,) = jobs.jobs()
    assert caught.value.job_id == job.id  # the failed job's row, for the client
    assert job.status.state is State.FAILED
    assert job.status.failed_step == step
    assert words in job.status.reason


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"argv": []}, "argv"),
        ({"argv": ["a\0b"]}, "argv[0]"),
        ({"argv": ["true"], "cwd": "relative"}, "cwd"),
        ({"argv": ["true"], "limits": Limits(memory=0)}, "limits.memory"),
        ({"argv": ["true"], "limits": Limits(cpu=-1)}, "limits.cpu"),
        ({"argv": ["true"], "limits": Limits(pids=10**9)}, "limits.pids"),
        ({"argv": ["true"], "limits": Limits(memory="1G")}, "limits.memory"),  # type: ignore[arg-type]
        ({"argv": ["true"], "max_runtime": 0}, "max_runtime"),
        ({"argv": ["true"], "writable": "/var"}, "writable"),
        ({"argv": ["true"], "writable": ["var"]}, "writable[0]"),
        ({"argv": ["true"], "writable": ["/", "/a\0b"]}, "writable[1]"),
        ({"argv": ["true"], "writable": [f"/{i}" for i in range(65)]}, "writable"),
    ],
)
async def test_invalid_specs_change_nothing(
    jobs: JobManager, spec: dict[str, object], field: str
) -> None:
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(**spec))  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.job_id is None  # nothing was recorded
    assert jobs.jobs() == []
    assert list(jobs.jobs_dir.iterdir()) == []


# -- arguments, environment, directory ----------------------------------------------------


async def test_long_and_binary_arguments_env_and_cwd(jobs: JobManager) -> None:
    long_arg = "x" * 20_000
    binary = bytes(range(1, 256))
    status, directory = await run(
        jobs,
        b"sh",
        b"-c",
        b'printf "%s|%s|%s|%s" "${#1}" "$2" "$GREETING" "$(pwd)"',
        b"sh",
        long_arg.encode(),
        binary,
        env={"GREETING": "hi", "PATH": "/usr/bin:/bin"},
        cwd="/usr",
    )
    assert status.exit_code == 0, output(directory, 2)
    assert output(directory) == b"20000|" + binary + b"|hi|/usr"


async def test_only_stdio_is_open_and_stdin_is_dev_null(jobs: JobManager) -> None:
    status, directory = await run(jobs, "sh", "-c", "ls /proc/$$/fd; readlink /proc/$$/fd/0")
    assert status.exit_code == 0, output(directory, 2)
    assert output(directory).split() == [b"0", b"1", b"2", b"/dev/null"]


async def test_init_forwards_sigint_to_the_command(jobs: JobManager) -> None:
    job = await start_ready(
        jobs, "trap 'echo int; exit 5' INT; echo ready; while :; do sleep 0.05; done"
    )
    assert job.status.pid is not None
    os.kill(job.status.pid, signal.SIGINT)  # to init, from outside its namespace
    status = await jobs.wait(job.id)
    assert (status.state, status.exit_code) == (State.EXITED, 5)
    assert output(job.directory) == b"ready\nint\n"


async def test_default_environment_is_small_and_clean(jobs: JobManager) -> None:
    os.environ["CORRAL_TEST_SECRET"] = "leak"
    try:
        _status, directory = await run(jobs, "env")
    finally:
        del os.environ["CORRAL_TEST_SECRET"]
    names = {line.split(b"=", 1)[0] for line in output(directory).splitlines()}
    assert names == {b"PATH", b"HOME", b"LANG", b"TERM"}


# -- isolation --------------------------------------------------------------------------------


async def test_pid_namespace(jobs: JobManager) -> None:
    _status, directory = await run(jobs, "sh", "-c", "echo $$ $PPID; ps -e -o pid=,comm=")
    lines = output(directory).decode().splitlines()
    assert lines[0].split()[1] == "1"  # the command's parent is PID 1 (init)
    processes = {tuple(line.split()) for line in lines[1:]}
    assert ("1", "corral-init") in processes
    assert {comm for _, comm in processes} <= {"corral-init", "sh", "ps"}


async def test_network_namespace_has_only_loopback_and_cannot_reach_the_host(
    jobs: JobManager,
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        script = (
            "import os, socket\n"
            "print(sorted(os.listdir('/sys/class/net')))\n"
            "print(open('/sys/class/net/lo/operstate').read().strip(),"
            " int(open('/sys/class/net/lo/flags').read(), 16) & 1)\n"
            "s = socket.socket()\n"
            f"print(s.connect_ex(('127.0.0.1', {port})))\n"
        )
        status, directory = await run(jobs, "/usr/bin/python3", "-c", script)
    assert status.exit_code == 0, output(directory, 2)
    interfaces, lo, refused = output(directory).decode().splitlines()
    assert interfaces == "['lo']"
    assert lo.endswith(" 1")  # IFF_UP
    assert int(refused) != 0  # the host's 127.0.0.1 is not this 127.0.0.1


@pytest.fixture
def shared_mount(shared_dir: Path) -> Iterator[Path]:
    """`shared_dir` as a mount with shared propagation, as / is on systemd
    hosts: a mount a job makes under it would show on the host unless the
    job's mounts are private."""
    libc.mount(str(shared_dir), str(shared_dir), None, MS_BIND, None)
    try:
        libc.mount("none", str(shared_dir), None, MS_SHARED, None)
        (shared_dir / "sub").mkdir()
        yield shared_dir
    finally:
        libc.umount(str(shared_dir), libc.MNT_DETACH)


async def test_uts_ipc_mount_and_tmp_are_private(jobs: JobManager, shared_mount: Path) -> None:
    marker = Path("/tmp") / f"corral-host-{os.getpid()}"
    marker.write_text("host")
    try:
        status, directory = await run(
            jobs,
            "sh",
            "-c",
            "hostname; readlink /proc/self/ns/ipc; ls -A /tmp; "
            f"mount -t tmpfs none {shared_mount}/sub && echo mounted",
            host_root=True,  # root in its own user namespace may mount nothing at all
            seccomp="unconfined",  # and the filter refuses mount(2)
        )
    finally:
        marker.unlink()
    assert status.exit_code == 0, output(directory, 2)
    hostname, ipc, *rest = output(directory).decode().splitlines()
    job = jobs.jobs()[0]
    assert hostname == job.short_id
    assert hostname != socket.gethostname()
    assert ipc != os.readlink("/proc/self/ns/ipc")
    assert rest == ["mounted"]  # the host's /tmp marker is not there
    assert not os.path.ismount(shared_mount / "sub")  # the job's mount stayed inside


# 1 if /sys (the mount point itself) is read-only, else 0.
SYS_READ_ONLY = """awk '$5 == "/sys" && $6 ~ /^ro/' /proc/self/mountinfo | wc -l"""
# Each line: try to create a file; say "wrote" or the error's words.
TRY_WRITE = 'for f; do if true > "$f"; then echo "$f wrote"; rm -f "$f"; fi; done 2>&1'


async def test_the_host_is_read_only_to_a_job_but_its_own_tmp(
    jobs: JobManager, shared_dir: Path
) -> None:
    targets = ["/etc/corral-probe", f"{shared_dir}/probe", "/tmp/probe", "/dev/shm/probe"]
    status, directory = await run(jobs, "sh", "-c", TRY_WRITE, "sh", *targets, user="root")
    assert status.exit_code == 0, output(directory, 2)
    lines = output(directory).decode().splitlines()
    # Even root, with every capability, cannot write the host by accident.
    assert lines[0].endswith(": Read-only file system"), lines
    assert lines[1].endswith(": Read-only file system"), lines
    assert lines[2:] == ["/tmp/probe wrote", "/dev/shm/probe wrote"]
    assert not Path("/etc/corral-probe").exists()
    assert list(shared_dir.iterdir()) == []
    # Devices and fifos on the read-only host are theirs to use as before.
    status, directory = await run(jobs, "sh", "-c", "echo x > /dev/null && echo ok")
    assert output(directory) == b"ok\n"


async def test_writable_paths_are_writable_and_nothing_else(
    jobs: JobManager, shared_dir: Path
) -> None:
    inner = shared_dir / "inner"
    inner.mkdir(mode=0o777)
    inner.chmod(0o777)
    targets = [f"{inner}/probe", f"{shared_dir}/probe", "/etc/probe", "/var/probe"]
    status, directory = await run(
        jobs, "sh", "-c", TRY_WRITE, "sh", *targets, writable=[str(inner), "/etc"]
    )
    assert status.exit_code == 0, output(directory, 2)
    lines = output(directory).decode().splitlines()
    assert lines[0] == f"{inner}/probe wrote"
    assert lines[1].endswith(": Read-only file system"), lines
    # Writable is not a permission: nobody still cannot write root's /etc.
    assert lines[2].endswith(": Permission denied"), lines
    assert lines[3].endswith(": Read-only file system"), lines
    # The whole host, on request (an admin's job installing packages, say).
    status, directory = await run(
        jobs, "sh", "-c", f"{TRY_WRITE}; {SYS_READ_ONLY}",
        "sh", f"{shared_dir}/probe", "/tmp/probe", user="root", writable=["/"],
    )  # fmt: skip
    assert output(directory).decode().splitlines() == [
        f"{shared_dir}/probe wrote",
        "/tmp/probe wrote",
        "1",  # sysfs stays read-only
    ]


async def test_mounts_are_made_read_only_one_by_one_without_mount_setattr(
    shared_mount: Path,
) -> None:
    """The fallback for kernels before 5.12, run here on purpose: a child in
    a mount namespace of its own remounts its view read-only, keeping each
    mount's flags, then one subtree writable again."""
    (shared_mount / "sub").mkdir(exist_ok=True)
    script = f"""
import os, sys
from corral.shim import libc
from corral.shim.init import remount_each
libc.unshare(libc.CLONE_NEWNS)
libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
libc.mount("tmpfs", "{shared_mount}/sub", "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, None)
remount_each(b"/", True)
remount_each(b"{shared_mount}/sub", False)
for path in ("/", "/usr", "{shared_mount}", "{shared_mount}/sub"):
    flags = os.statvfs(path).f_flag
    print(path, bool(flags & os.ST_RDONLY), bool(flags & os.ST_NOSUID), bool(flags & os.ST_NOEXEC))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/ True False False",
        "/usr True False False",
        f"{shared_mount} True False False",
        f"{shared_mount}/sub False True True",
    ]
    # The host's own mounts did not change.
    assert not os.statvfs("/").f_flag & os.ST_RDONLY
    assert not os.path.ismount(shared_mount / "sub")


async def test_unprivileged_job_cannot_regain_privileges(
    jobs: JobManager, shared_dir: Path
) -> None:
    """The job's uid is its own (dynamic): the setuid copy of id is root's."""
    setuid_id = shared_dir / "id"
    shutil.copy("/usr/bin/id", setuid_id)
    setuid_id.chmod(0o4755)
    _status, directory = await run(
        jobs,
        "sh",
        "-c",
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; id -u; "
        f"{setuid_id} -u; cat /etc/shadow || echo denied; "
        # init runs as the job's user, but undumpable: its memory is not the job's.
        "cat /proc/1/environ > /dev/null 2>&1 && echo init-open || echo init-protected",
    )
    lines = output(directory).decode().split()
    assert lines.pop() == "init-protected"
    assert lines[:4] == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    uid = str(jobs.jobs()[0].spec.uid)
    assert lines[4:6] == [uid, uid]  # the setuid bit gave nothing
    assert lines[-1] == "denied"


# -- cgroups and limits ----------------------------------------------------------------------


@pytest.mark.cgroup
async def test_job_is_in_its_cgroup_with_its_limits_and_the_cgroup_goes(
    jobs: JobManager,
) -> None:
    limits = Limits(cpu=0.5, memory=64 << 20, pids=50, io_read_bps=1 << 20, io_write_iops=100)
    job = await jobs.start(JobSpec(argv=["sh", "-c", "cat /proc/self/cgroup; exec sleep 1000"],
                                   limits=limits))  # fmt: skip
    cgroup = open_cgroup(FLAVOUR, job.id, parent=PARENT, slice=job.spec.slice)
    paths = cgroup.paths()
    if FLAVOUR is Flavour.V1:
        root = paths[0].parent.parent.parent.parent
        assert (
            root / "cpu" / PARENT / job.spec.slice / job.id / "cpu.cfs_quota_us"
        ).read_text().strip() == "50000"
        memory = root / "memory" / PARENT / job.spec.slice / job.id
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert (
            root / "pids" / PARENT / job.spec.slice / job.id / "pids.max"
        ).read_text().strip() == "50"
        blkio = root / "blkio" / PARENT / job.spec.slice / job.id
        read_bps = (blkio / "blkio.throttle.read_bps_device").read_text().split("\n")
        write_iops = (blkio / "blkio.throttle.write_iops_device").read_text().split("\n")
        assert jobs.devices, "the state directory sits on a disk on our v1 hosts"
        for major, minor in jobs.devices:
            assert f"{major}:{minor} {1 << 20}" in read_bps
            assert f"{major}:{minor} 100" in write_iops
    else:
        (path,) = paths
        assert (path / "cpu.max").read_text().split()[0] == "50000"
        assert (path / "memory.max").read_text().strip() == str(64 << 20)
        assert (path / "memory.swap.max").read_text().strip() == "0"
        assert (path / "pids.max").read_text().strip() == "50"
        io_max = (path / "io.max").read_text()
        for major, minor in jobs.devices:  # none in the v2 VM: / is an overlay there
            assert f"{major}:{minor} rbps={1 << 20} wbps=max riops=max wiops=100" in io_max
    # The job sees its own cgroup as / (a cgroup namespace of its own); the
    # host sees where it is.
    await until(lambda: output(job.directory).endswith(b"\n"))
    said = output(job.directory).decode().splitlines()
    assert said
    assert all(line.endswith(":/") for line in said), said
    # Once cat has gone (it may still be exiting after its output): init and
    # the command, each where the host says.
    await until(lambda: len(cgroup.procs()) == 2)
    own = f"/{PARENT}/{job.spec.slice}/{job.id}"
    for pid in cgroup.procs():
        assert own in Path(f"/proc/{pid}/cgroup").read_text()
    status = await jobs.stop(job.id, grace=1, by="test")
    assert status.state is State.STOPPED
    assert not any(path.exists() for path in paths)


@pytest.mark.cgroup
async def test_out_of_memory_is_reported(jobs: JobManager) -> None:
    status, _directory = await run(
        jobs,
        "/usr/bin/python3",
        "-c",
        "x = b'x' * (200 << 20)",
        limits=Limits(memory=32 << 20),
    )
    assert status.oom_killed, status
    assert status.signal == "SIGKILL"
    assert status.reason == "killed by SIGKILL: out of memory"


@pytest.mark.cgroup
async def test_cpu_limit_throttles_a_busy_loop(jobs: JobManager) -> None:
    # The loop measures its own share: the cgroup's total would also count
    # the interpreter's start, and a warm init's, spent before the limit bit.
    loop = (
        "import time\n"
        "wall, cpu = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - wall < 1: pass\n"
        "print((time.process_time() - cpu) / (time.monotonic() - wall))\n"
    )
    status, directory = await run(jobs, "/usr/bin/python3", "-c", loop, limits=Limits(cpu=0.2))
    assert status.exit_code == 0, status
    share = float(output(directory))
    assert 0.05 < share < 0.3, share


async def test_io_limit_throttles_direct_writes(jobs: JobManager, shared_dir: Path) -> None:
    target = shared_dir / "written"
    status, directory = await run(
        jobs,
        "dd", "if=/dev/zero", f"of={target}", "bs=64k", "count=24", "oflag=direct",
        limits=Limits(io_write_bps=1 << 20),
        writable=[str(shared_dir)],
    )  # fmt: skip
    assert status.exit_code == 0, output(directory, 2)
    assert status.started_at is not None
    assert status.finished_at is not None
    wall = (status.finished_at - status.started_at) / 1e9
    # 1.5 MiB at 1 MiB/s: the first second's budget is spent at once, the rest waits.
    assert wall > 0.4, wall
    assert status.usage.io_write_bytes >= 24 * 64 * 1024


@pytest.mark.cgroup
async def test_pids_limit_stops_a_fork_bomb(jobs: JobManager) -> None:
    _status, directory = await run(
        jobs,
        "sh",
        "-c",
        "i=0; while [ $i -lt 100 ]; do sleep 2 & i=$((i+1)); done; wait",
        limits=Limits(pids=20),
    )
    assert b"fork" in output(directory, 2).lower() or b"resource" in output(directory, 2).lower()


# -- stopping ------------------------------------------------------------------------------


@pytest.mark.cgroup
async def test_stop_kills_the_whole_tree(jobs: JobManager) -> None:
    job = await jobs.start(
        JobSpec(
            argv=[
                "sh",
                "-c",
                "sleep 1000 & setsid sleep 1000 & (setsid sh -c 'sleep 1000 &' &); wait",
            ]
        )
    )
    cgroup = open_cgroup(FLAVOUR, job.id, parent=PARENT, slice=job.spec.slice)
    await until(lambda: len(cgroup.procs()) >= 5)
    pids = cgroup.procs()
    status = await jobs.stop(job.id, grace=5, by="alice")
    assert status.state is State.STOPPED
    assert status.stopped_by == "alice"
    assert not any(alive(pid) for pid in pids)


async def test_stop_kills_a_tree_that_ignores_sigterm(jobs: JobManager) -> None:
    # Ignored signals stay ignored across fork and exec: no process here dies of TERM.
    script = "trap '' TERM; sleep 1000 & setsid sh -c 'sleep 1000 & wait' & echo ready; wait"
    job = await start_ready(jobs, script)
    cgroup = open_cgroup(FLAVOUR, job.id, parent=PARENT, slice=job.spec.slice)
    await until(lambda: len(cgroup.procs()) >= 5)
    pids = cgroup.procs()
    status = await jobs.stop(job.id, grace=0.2, by="alice")
    assert (status.state, status.signal) == (State.STOPPED, "SIGKILL")
    assert not any(alive(pid) for pid in pids)


async def test_a_second_stop_with_a_shorter_grace_kills_sooner(jobs: JobManager) -> None:
    job = await start_ready(jobs, "trap 'echo term' TERM; echo ready; while :; do sleep 0.05; done")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(jobs.stop, job.id, grace=30, by="alice"))
        await until(lambda: b"term" in output(job.directory))  # the first stop's TERM arrived
        status = await jobs.stop(job.id, grace=0, by="bob")
    assert (status.state, status.signal, status.stopped_by) == (State.STOPPED, "SIGKILL", "alice")
    grace = float(status.reason.split(" after ")[1].split(" s grace")[0])
    assert 0 < grace < 30, status.reason


async def test_a_job_handling_sigterm_ends_gracefully(jobs: JobManager) -> None:
    job = await start_ready(
        jobs, "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
    )
    status = await jobs.stop(job.id, grace=30, by="alice")
    assert (status.state, status.exit_code, status.signal) == (State.STOPPED, 7, None)
    assert status.reason == "stopped by alice; exited with code 7"
    assert b"bye" in output(job.directory)


async def test_a_job_ignoring_sigterm_is_killed_after_the_grace(jobs: JobManager) -> None:
    job = await start_ready(jobs, "trap '' TERM; echo ready; sleep 1000")
    status = await jobs.stop(job.id, grace=0.2, by="alice")
    assert (status.state, status.signal) == (State.STOPPED, "SIGKILL")
    assert status.reason == "stopped by alice; killed by SIGKILL after 0.2 s grace"


async def test_stopping_twice_and_after_the_end(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["sleep", "1000"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(jobs.stop, job.id, 0.5)
        nursery.start_soon(jobs.stop, job.id, 0)
    with pytest.raises(OperationError, match="has already ended") as caught:
        await jobs.stop(job.id)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION


async def test_max_runtime_stops_the_job(jobs: JobManager) -> None:
    status, _ = await run(jobs, "sleep", "1000", max_runtime=0.2)
    assert status.state is State.STOPPED
    assert status.reason.startswith("stopped: max runtime 0.2 s reached; killed by SIGTERM")


# -- output -----------------------------------------------------------------------------------


async def test_binary_output_is_byte_exact(jobs: JobManager, shared_dir: Path) -> None:
    data = os.urandom(3 << 20) + b"\0" * 1000 + os.urandom(1000)
    source = shared_dir / "data"
    source.write_bytes(data)
    source.chmod(0o644)
    status, directory = await run(jobs, "sh", "-c", f"cat {source}; cat {source} >&2")
    assert status.exit_code == 0
    expected = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(output(directory, 1)).hexdigest() == expected
    assert hashlib.sha256(output(directory, 2)).hexdigest() == expected


async def test_log_size_cap_holds_and_says_what_it_dropped(jobs: JobManager) -> None:
    status, directory = await run(jobs, "sh", "-c", "head -c 100000 /dev/zero", log_limit=8192)
    assert status.exit_code == 0
    assert (directory / OUTPUT_FILE).stat().st_size <= 8192
    marker = [r for r in records(directory) if r[0] == 0]
    written = len(output(directory))
    assert marker == [[0, marker[0][1], {"dropped_bytes": 100000 - written}]]
    assert status.dropped_bytes == 100000 - written


# -- faults and leaks -----------------------------------------------------------------------


@pytest.mark.cgroup
async def test_a_killed_shim_takes_its_job_and_the_job_is_lost(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["sh", "-c", "sleep 1000 & sleep 1000"]))
    cgroup = open_cgroup(FLAVOUR, job.id, parent=PARENT, slice=job.spec.slice)
    await until(lambda: len(cgroup.procs()) >= 3)
    pids = cgroup.procs()
    status = (await jobs.status(job.id))[1]
    assert status.shim_pid is not None
    os.kill(status.shim_pid, signal.SIGKILL)
    final = await jobs.wait(job.id)
    assert final.state is State.LOST
    assert "shim" in final.reason
    assert not any(path.exists() for path in cgroup.paths())
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (a dead shim's init is
    re-parented to the host's PID 1, which reaps in its own time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_no_leaks_after_many_jobs(jobs: JobManager) -> None:
    await run(jobs, "true")
    await trio.testing.wait_all_tasks_blocked()
    fds, tasks = open_fds(), live_tasks()
    for _ in range(100):
        await run(jobs, "true")
    # The sandbox for the next start may still be being built (a task and
    # its deadline's, blocked on the spawner): a leak is what stays.
    await until(lambda: (open_fds(), live_tasks()) == (fds, tasks))
    # Only the sandbox built ahead of the next start has a cgroup.
    assert {name for _, name in orphans(FLAVOUR, parent=PARENT)} <= set(jobs.warm_ids)
    assert all(job.done.is_set() for job in jobs.jobs())
    for job in jobs.jobs():
        await jobs.remove(job.id)
    assert list(jobs.jobs_dir.iterdir()) == []


async def test_dev_shm_is_private(jobs: JobManager) -> None:
    name = f"corral-test-{os.getpid()}"
    _status, directory = await run(jobs, "sh", "-c", f"echo job > /dev/shm/{name} && echo wrote")
    assert output(directory) == b"wrote\n", output(directory, 2)
    assert not Path(f"/dev/shm/{name}").exists()


async def test_a_far_max_runtime_does_not_break_the_shim(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["sleep", "1000"], max_runtime=30 * 86400))
    status = await jobs.stop(job.id, grace=5, by="test")
    assert status.state is State.STOPPED
    assert status.reason == "stopped by test; killed by SIGTERM"


async def test_a_cancelled_start_leaves_the_next_job_alone(jobs: JobManager) -> None:
    with trio.move_on_after(0.001):
        await jobs.start(JobSpec(argv=["sh", "-c", "exit 0"]))
    second = await jobs.start(JobSpec(argv=["sleep", "1000"]))
    with trio.fail_after(20):
        for job in jobs.jobs():
            if job is not second:
                await job.started.wait()
                await jobs.wait(job.id)  # the cancelled one still ends: not stuck
    status = (await jobs.status(second.id))[1]
    assert status.state is State.RUNNING
    assert (await jobs.stop(second.id, grace=0)).state is State.STOPPED


# -- warm sandboxes -------------------------------------------------------------------

# A sandbox is built in milliseconds here; a fresh spawner's first one takes
# seconds in the cgroup v2 VM (software emulation, 15-40x slower).
SANDBOX_READY = 60.0


def sandbox_init(job_id: str, owner: Identity = NOBODY) -> int | None:
    """The pid of the init waiting in the sandbox built for `job_id` (in
    `owner`'s slice), once it is in its cgroup."""
    try:
        procs = open_cgroup(FLAVOUR, job_id, parent=PARENT, slice=slice_name(owner)).procs()
    except CgroupError:
        return None
    return procs[0] if len(procs) == 1 else None


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.cgroup
async def test_a_start_takes_the_sandbox_built_ahead_for_it(tmp_path: Path) -> None:
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=1) as jobs:
        await until(lambda: jobs.warm_ids and sandbox_init(jobs.warm_ids[0]), SANDBOX_READY)
        ahead = jobs.warm_ids[0]
        init = sandbox_init(ahead)
        assert SandboxRecords(jobs.state_dir).recorded() == [ahead]  # recorded: ours to sweep
        job = await jobs.start(JobSpec(argv=["sleep", "1000"]))
        assert (job.id, job.status.pid) == (ahead, init)
        assert ahead not in SandboxRecords(jobs.state_dir).recorded()  # a job's now
        # The next one is being built already, for another id.
        await until(lambda: jobs.warm_ids and jobs.warm_ids[0] != ahead, SANDBOX_READY)
        await jobs.stop(job.id, grace=0)
    assert orphans(FLAVOUR, parent=PARENT) == [], "a sandbox outlived its manager"


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.cgroup
async def test_a_sandbox_is_built_ahead_at_a_low_priority_and_its_job_runs_at_the_usual(
    tmp_path: Path,
) -> None:
    # Built for the next start, a sandbox yields the CPU to what is urgent
    # now; the job that takes it must not inherit that.
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=1) as jobs:
        await until(lambda: jobs.warm_ids and sandbox_init(jobs.warm_ids[0]), SANDBOX_READY)
        init = sandbox_init(jobs.warm_ids[0])
        assert init is not None
        spawner = jobs.spawner_pid
        assert spawner is not None
        usual = niceness(spawner)
        assert niceness(init) == niceness(parent_of(init)) == usual + WARM_NICENESS
        status, job_dir = await run(jobs, "sh", "-c", "cut -d' ' -f19 /proc/self/stat")
        assert status.exit_code == 0, status.reason
        assert int(output(job_dir)) == usual


@pytest.mark.cgroup
async def test_a_discarded_sandbox_is_gone_once_its_spawner_has_closed(tmp_path: Path) -> None:
    # A sandbox built for one owner is discarded when another starts; a
    # manager ending right after must not cut its going short (the spawner's
    # exit killed the shim mid-way, leaving its cgroup, and its record was
    # already dropped: nothing swept it).
    pool = spawner_pool.SpawnerPool(
        SandboxRecords(tmp_path / "state"),
        flavour=FLAVOUR,
        cgroup_root=ROOT,
        cgroup_parent=PARENT,
        devices=[],
        warm=0,
    )
    spawner = Spawner.start()
    try:
        job_id = new_job_id()
        await spawner.prepare(pool.request(job_id, slice_name(ALICE)))
        await until(lambda: sandbox_init(job_id, ALICE), SANDBOX_READY)
        await spawner.discard(ipc.Discard(id=job_id))
    finally:
        spawner.close()
    assert orphans(FLAVOUR, parent=PARENT) == [], "a discarded sandbox outlived its spawner"


@pytest.mark.cgroup
async def test_a_dead_warm_shim_means_a_cold_start_with_the_same_id(tmp_path: Path) -> None:
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=1) as jobs:
        await until(lambda: jobs.warm_ids and sandbox_init(jobs.warm_ids[0]), SANDBOX_READY)
        ahead = jobs.warm_ids[0]
        init = sandbox_init(ahead)
        assert init is not None
        os.kill(parent_of(init), signal.SIGKILL)  # the warm shim; init follows it
        await until(lambda: sandbox_init(ahead) is None)
        job = await jobs.start(JobSpec(argv=["sh", "-c", "exit 7"]))
        status = await jobs.wait(job.id)
        assert (job.id, status.state, status.exit_code) == (ahead, State.EXITED, 7)
    assert orphans(FLAVOUR, parent=PARENT) == []


@pytest.mark.cgroup
async def test_sandboxes_a_dead_spawner_left_are_removed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    left = open_cgroup(FLAVOUR, new_job_id(), parent=PARENT)
    SandboxRecords(state).record(left.name)  # as the manager does before building one
    left.create()
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        left.add(sleeper.pid)
        async with open_job_manager(state, cgroup_parent=PARENT, warm=0):
            assert orphans(FLAVOUR, parent=PARENT) == []
            assert SandboxRecords(state).recorded() == []
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        left.remove()


@pytest.mark.cgroup
async def test_a_cgroup_the_manager_did_not_record_is_left_alone(tmp_path: Path) -> None:
    # Another manager's job under the same parent: no record, no job directory here.
    stranger = open_cgroup(FLAVOUR, new_job_id(), parent=PARENT)
    stranger.create()
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        stranger.add(sleeper.pid)
        async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=0) as jobs:
            job = await jobs.start(JobSpec(argv=["true"]))
            await jobs.wait(job.id)
        assert stranger.procs() == [sleeper.pid]
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
        stranger.remove()


async def test_argv_and_env_larger_than_a_pipe_reach_the_command(jobs: JobManager) -> None:
    # The job goes to init through a pipe (64 KiB): this one takes several writes.
    args = [bytes([ord("a") + i]) * 80_000 for i in range(3)]
    env = {f"VAR{i}": "x" * 1000 for i in range(100)}
    script = 'printf %s "$@" | sha256sum; env | grep -c "^VAR"'
    status, job_dir = await run(jobs, "sh", "-c", script, "sh", *args, env=env)
    assert status.exit_code == 0, status.reason
    digest, count = output(job_dir).decode().split("\n")[:2]
    assert digest.split()[0] == hashlib.sha256(b"".join(args)).hexdigest()
    assert count == "100"


# -- admission ---------------------------------------------------------------------


async def test_starts_beyond_the_running_caps_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    admission = Admission(max_jobs=3, max_jobs_per_owner=2)
    async with open_job_manager(
        tmp_path / "state", cgroup_parent=PARENT, admission=admission
    ) as jobs:

        async def start(owner: str) -> Job:
            return await jobs.start(JobSpec(argv=["sleep", "1000"], owner=owner))

        alice = [await start("alice"), await start("alice")]
        with pytest.raises(OperationError) as caught:
            await start("alice")
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert str(caught.value) == (
            "alice has 2 jobs starting or running, the most one user may have; "
            "wait for one to end, or stop one"
        )
        await start("bob")
        with pytest.raises(OperationError) as caught:
            await start("bob")
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert str(caught.value) == (
            "corrald has 3 jobs starting or running, its maximum; try again when one has ended"
        )
        assert len(jobs.jobs()) == 3  # the refused starts left nothing behind
        assert len(list(jobs.jobs_dir.iterdir())) == 3
        assert (jobs.running(), jobs.running(ALICE), jobs.running(BOB)) == (3, 2, 1)
        # An ended job frees its slot, and a failed start does not take one.
        await jobs.stop(alice[0].id, grace=0)
        assert jobs.running(ALICE) == 1
        with pytest.raises(OperationError):
            await jobs.start(JobSpec(argv=["no-such-program-xyz"], owner="alice"))
        assert jobs.running(ALICE) == 1
        await start("alice")
        for job in jobs.jobs():
            if not job.done.is_set():
                await jobs.stop(job.id, grace=0)
        assert jobs.running() == 0


async def test_a_user_over_the_finished_jobs_quota_is_refused_until_they_remove_some(
    tmp_path: Path,
) -> None:
    admission = Admission(max_finished_per_owner=2)
    async with open_job_manager(
        tmp_path / "state", cgroup_parent=PARENT, admission=admission
    ) as jobs:

        async def run(owner: str) -> Job:
            job = await jobs.start(JobSpec(argv=["true"], owner=owner))
            await jobs.wait(job.id)
            return job

        first = await run("alice")
        await run("alice")
        with pytest.raises(OperationError) as caught:
            await run("alice")
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert str(caught.value) == (
            "alice has 2 jobs finished and kept, the most one user may keep (2); "
            "remove some (`corral rm --finished`) to start more"
        )
        assert len(jobs.jobs(owner=ALICE)) == 2  # the refused start left nothing
        await run("bob")  # another user's history is theirs
        await jobs.remove(first.id)
        await run("alice")


async def test_starts_refused_for_a_shutdown_say_why_and_change_nothing(tmp_path: Path) -> None:
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=0) as jobs:
        jobs.refuse_starts("corrald is shutting down; it starts no new jobs")
        with pytest.raises(OperationError) as caught:
            await jobs.start(JobSpec(argv=["true"]))
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert str(caught.value) == "corrald is shutting down; it starts no new jobs"
        assert (jobs.jobs(), list(jobs.jobs_dir.iterdir())) == ([], [])


async def test_a_burst_of_starts_is_admitted_up_to_the_cap(tmp_path: Path) -> None:
    admission = Admission(max_jobs=4, max_jobs_per_owner=None)
    state = tmp_path / "state"
    # No sandbox built ahead: every cgroup under the parent is a job's.
    async with open_job_manager(state, cgroup_parent=PARENT, admission=admission, warm=0) as jobs:
        outcomes: list[str] = []

        async def start() -> None:
            try:
                await jobs.start(JobSpec(argv=["sleep", "1000"], owner="alice"))
                outcomes.append("started")
            except OperationError as exc:
                outcomes.append(exc.code.value)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(start)
        assert sorted(outcomes) == ["resource_exhausted"] * 16 + ["started"] * 4
        assert len(orphans(FLAVOUR, parent=PARENT)) == 4  # never more jobs than the cap
        assert len(list(jobs.jobs_dir.iterdir())) == 4
        for job in jobs.jobs():
            await jobs.stop(job.id, grace=0)
    assert orphans(FLAVOUR, parent=PARENT) == []


async def test_jobs_adopted_at_a_restart_count_against_the_caps(tmp_path: Path) -> None:
    state = tmp_path / "state"
    admission = Admission(max_jobs=None, max_jobs_per_owner=1)
    async with open_job_manager(state, cgroup_parent=PARENT, admission=admission) as jobs:
        # Leaving the manager leaves its jobs running (corrald stops them itself).
        job = await jobs.start(JobSpec(argv=["sleep", "1000"], owner="alice"))
    async with open_job_manager(state, cgroup_parent=PARENT, admission=admission) as jobs:
        with pytest.raises(OperationError) as caught:
            await jobs.start(JobSpec(argv=["sleep", "1000"], owner="alice"))
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        await jobs.stop(job.id, grace=0)
        await jobs.start(JobSpec(argv=["true"], owner="alice"))


# -- the spawner ---------------------------------------------------------------------


async def test_a_dead_spawner_is_replaced_and_running_jobs_never_notice(tmp_path: Path) -> None:
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=1) as jobs:
        runner = await jobs.start(JobSpec(argv=["sh", "-c", "echo before; exec sleep 1000"]))
        await until(lambda: jobs.warm_ids and sandbox_init(jobs.warm_ids[0]), SANDBOX_READY)
        ahead = jobs.warm_ids[0]
        first = jobs.spawner_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: jobs.spawner_restarts == 1)
        assert jobs.spawner_pid not in (None, first)
        assert not os.path.exists(f"/proc/{first}")  # reaped, not a zombie
        # The sandbox it had built ahead died with it; its cgroup is gone.
        assert not any(name == ahead for _, name in orphans(FLAVOUR, parent=PARENT))
        # Running jobs are untouched; new starts work (a new sandbox is built too).
        assert (await jobs.status(runner.id))[1].state is State.RUNNING
        job = await jobs.start(JobSpec(argv=["sh", "-c", "exit 5"]))
        assert (await jobs.wait(job.id)).exit_code == 5
        await until(lambda: jobs.warm_ids and jobs.warm_ids[0] != ahead, SANDBOX_READY)
        assert output(runner.directory) == b"before\n"
        assert (await jobs.stop(runner.id, grace=0)).signal == "SIGKILL"
    assert orphans(FLAVOUR, parent=PARENT) == []


async def test_a_hung_spawner_fails_the_start_within_its_deadline_and_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spawner_pool, "SPAWN_TIMEOUT", 0.5)
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=0) as jobs:
        hung = jobs.spawner_pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive, and answering nobody
        with trio.fail_after(20), pytest.raises(OperationError) as caught:
            await jobs.start(JobSpec(argv=["true"]))
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert "did not answer in 0.5 s" in str(caught.value)
        failed = jobs.resolve(caught.value.details["job"])
        assert failed.status.state is State.FAILED
        await until(lambda: jobs.spawner_pid not in (None, hung))  # killed, replaced
        monkeypatch.undo()  # the new spawner's first start has the usual deadline
        job = await jobs.start(JobSpec(argv=["sh", "-c", "exit 4"]))
        assert (await jobs.wait(job.id)).exit_code == 4
    assert orphans(FLAVOUR, parent=PARENT) == []


async def test_a_spawner_that_keeps_dying_is_restarted_less_often(tmp_path: Path) -> None:
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT, warm=0) as jobs:
        restarts: list[float] = []
        for _ in range(4):
            pid = jobs.spawner_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await until(lambda pid=pid: jobs.spawner_pid != pid)  # type: ignore[misc]
            restarts.append(trio.current_time())
        gaps = [b - a for a, b in itertools.pairwise(restarts)]
        # 0.05 s, then 0.1, 0.2, 0.4: each wait doubles the last.
        assert gaps[-1] > 0.3, gaps
        job = await jobs.start(JobSpec(argv=["true"]))
        assert (await jobs.wait(job.id)).exit_code == 0


async def test_a_job_has_a_dev_of_its_own(jobs: JobManager) -> None:
    script = (
        "import os, pty\n"
        "print(sorted(os.listdir('/dev')))\n"
        "leader, follower = os.openpty()\n"  # through the job's own devpts
        "os.write(leader, b'hi\\n'); print(os.read(follower, 10), os.ttyname(follower))\n"
        "print(open('/proc/self/mountinfo').read().count(' /dev/mqueue '))\n"
        "open('/dev/null', 'w').write('x')\n"
    )
    status, directory = await run(jobs, "/usr/bin/python3", "-c", script, user="root")
    assert status.exit_code == 0, output(directory, 2)
    listing, echoed, mqueue = output(directory).decode().splitlines()
    assert listing == str(sorted(
        ["fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
         "stdout", "tty", "urandom", "zero"]
    ))  # fmt: skip
    assert echoed == "b'hi\\n' /dev/pts/0"  # the first pty of a devpts of its own
    assert mqueue == "1"
    # Not even root's job reaches the host's disks: they are not there.
    status, directory = await run(jobs, "sh", "-c", "mknod /dev/sda b 8 0", user="root")
    assert status.exit_code != 0
    assert b"Read-only file system" in output(directory, 2)


# -- status order ------------------------------------------------------------------


def test_a_job_status_never_goes_back(tmp_path: Path) -> None:
    spec = JobSpec(argv=["true"]).validate()
    job = Job(spec, Status(state=State.STARTING), tmp_path)
    running = Status(state=State.RUNNING, reason="running")
    ended = Status(state=State.EXITED, exit_code=0, reason="exited with code 0")
    assert job.advance(running)
    assert not job.advance(Status(state=State.STARTING))  # running never starts again
    assert job.advance(ended)
    for later in (running, Status(state=State.LOST), ended):
        assert not job.advance(later)  # an end is never replaced, not even by another
    assert job.status is ended


async def test_a_burst_of_short_jobs_all_end_exited_none_stays_running(tmp_path: Path) -> None:
    # `true` ends while its start is still being answered: the start's
    # "running" must not replace the end the watcher recorded meanwhile.
    async with open_job_manager(tmp_path / "state", cgroup_parent=PARENT) as jobs:
        limit = trio.CapacityLimiter(50)
        started: list[Job] = []

        async def start() -> None:
            async with limit:
                started.append(await jobs.start(JobSpec(argv=["true"])))

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(start)
        with trio.fail_after(30):
            ends = [await jobs.wait(job.id) for job in started]
        wrong = [(end.state, end.exit_code) for end in ends if end.state is not State.EXITED]
        assert wrong == [], f"{len(wrong)} of {len(ends)} jobs did not end exited"
        assert all(end.exit_code == 0 for end in ends)
        assert jobs.running() == 0

"""What a job is given: host paths it may write under its private /tmp and
/dev/shm, its environment, and the bounds of what a spec may ask for.

The jobs here are real (root, namespaces, cgroups), as in tests/test_jobs.py;
the spec checks at the end need none of that.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest

from corral.errors import OperationError
from corral.job import (
    JobSpec,
    Limits,
    ResolvedSpec,
    SpecError,
    State,
    Status,
    default_env,
    host_cpus,
)
from corral.protocol import ErrorCode
from corral.shim.cgroup import detect_flavour
from corral.shim.oom import oom_score_pinned
from corral.store import OUTPUT_FILE
from corral.worker.manager import JobManager

from .conftest import identity, managed_jobs, running_corrald
from .test_cli import corral

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")
FLAVOUR = detect_flavour()


def output(job_dir: Path, stream: int = 1) -> bytes:
    """What the job wrote on `stream`, from its output.log."""
    with open(job_dir / OUTPUT_FILE, "rb") as log:
        return b"".join(r[2] for r in msgpack.Unpacker(log, raw=False) if r[0] == stream)


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobManager]:
    """A JobManager (a sandbox built ahead of each start: the jail is built
    before the job is known, as it is in corrald); every job ended and no
    cgroup of ours left afterwards."""
    async with managed_jobs(tmp_path / "state") as manager:
        yield manager


async def run(jobs: JobManager, *argv: str, **spec: object) -> tuple[Status, Path]:
    job = await jobs.start(JobSpec(argv=list(argv), **spec))  # type: ignore[arg-type]
    return await jobs.wait(job.id), job.directory


def host_dir(parent: str) -> Iterator[Path]:
    """A directory under `parent` on the host that the job's user (nobody) may write."""
    directory = Path(tempfile.mkdtemp(prefix="corral-rw-", dir=parent))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def in_tmp() -> Iterator[Path]:
    yield from host_dir("/tmp")


@pytest.fixture
def in_shm() -> Iterator[Path]:
    yield from host_dir("/dev/shm")


# -- writable host paths under the job's own /tmp and /dev/shm -----------------------------


@needs_root
async def test_a_writable_path_under_tmp_is_the_hosts_and_the_rest_of_tmp_stays_private(
    jobs: JobManager, in_tmp: Path
) -> None:
    secret = Path("/tmp") / f"corral-host-{os.getpid()}"
    secret.write_text("host")
    own = f"/tmp/corral-own-{os.getpid()}"
    try:
        status, job_dir = await run(
            jobs,
            "sh",
            "-c",
            # Its cwd is the host's directory too (a /tmp path is in the job's
            # private /tmp otherwise, and would not exist there).
            f"echo through > out && pwd && ls -A /tmp && echo mine > {own} && cat {own}",
            writable=[str(in_tmp)],
            cwd=str(in_tmp),
        )
    finally:
        secret.unlink()
    assert status.exit_code == 0, output(job_dir, 2)
    assert (in_tmp / "out").read_text() == "through\n"
    cwd, listing, private = output(job_dir).decode().splitlines()
    assert cwd == str(in_tmp)
    assert listing == in_tmp.name  # the host's other files in /tmp are not there
    assert private == "mine"
    assert not Path(own).exists()  # its own /tmp is still its own


@needs_root
async def test_writable_files_and_nested_paths_under_tmp_and_dev_shm(
    jobs: JobManager, in_tmp: Path, in_shm: Path
) -> None:
    inner = in_tmp / "a" / "b"
    inner.mkdir(parents=True, mode=0o777)
    inner.chmod(0o777)
    log = in_tmp / "job.log"
    log.write_text("host\n")
    log.chmod(0o666)
    script = (
        'echo job >> "$1" && echo deep > "$2/deep" && echo shared > "$3/shm" && ls -A /tmp /dev/shm'
    )
    status, job_dir = await run(
        jobs, "sh", "-c", script, "sh", str(log), str(inner), str(in_shm),
        # A path inside another writable one is the same host directory.
        writable=[str(inner), str(log), str(in_tmp / "a"), str(in_shm)],
    )  # fmt: skip
    assert status.exit_code == 0, output(job_dir, 2)
    assert log.read_text() == "host\njob\n"
    assert (inner / "deep").read_text() == "deep\n"
    assert (in_shm / "shm").read_text() == "shared\n"
    listing = output(job_dir).decode().split()
    assert listing == ["/dev/shm:", in_shm.name, "/tmp:", in_tmp.name]


@needs_root
async def test_all_of_the_hosts_tmp_and_dev_shm_on_request(
    jobs: JobManager, in_tmp: Path, in_shm: Path
) -> None:
    script = f"echo whole > {in_tmp}/whole && echo whole > {in_shm}/whole"
    status, job_dir = await run(jobs, "sh", "-c", script, writable=["/tmp", "/dev/shm"])
    assert status.exit_code == 0, output(job_dir, 2)
    assert (in_tmp / "whole").read_text() == "whole\n"
    assert (in_shm / "whole").read_text() == "whole\n"


@needs_root
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("missing", "open(/tmp/{name}): No such file or directory"),
        ("link", "/tmp/{name} passes through a symbolic link; give the path it leads to"),
    ],
)
async def test_a_writable_path_under_tmp_that_is_missing_or_a_link_is_refused(
    jobs: JobManager, in_tmp: Path, name: str, words: str
) -> None:
    target = in_tmp / name
    if name == "link":
        target.symlink_to("/etc")
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(argv=["true"], writable=[str(target)]))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    expected = words.format(name=f"{in_tmp.name}/{name}")
    assert f"cannot make a path writable: {expected}" in str(caught.value)
    (job,) = jobs.jobs()
    assert (job.status.state, job.status.failed_step) == (State.FAILED, "writable")


# -- environment ------------------------------------------------------------------------------


def environment(job_dir: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output(job_dir).decode().splitlines())


@needs_root
async def test_env_adds_to_the_default_environment_and_overrides_its_names(
    jobs: JobManager,
) -> None:
    status, job_dir = await run(jobs, "env", env={"FOO": "bar", "HOME": "/srv"})
    assert status.exit_code == 0, output(job_dir, 2)
    expected = {k.decode(): v.decode() for k, v in default_env().items()}
    assert environment(job_dir) == {**expected, "FOO": "bar", "HOME": "/srv"}


@needs_root
async def test_env_clear_starts_from_an_empty_environment(jobs: JobManager) -> None:
    status, job_dir = await run(jobs, "/usr/bin/env", env={"FOO": "bar"}, env_clear=True)
    assert status.exit_code == 0, output(job_dir, 2)
    assert environment(job_dir) == {"FOO": "bar"}
    # Without PATH, the command is looked for where execvp would look.
    status, job_dir = await run(jobs, "env", env_clear=True)
    assert (status.exit_code, output(job_dir)) == (0, b"")


def test_the_environment_a_spec_resolves_to() -> None:
    assert JobSpec(argv=["true"]).validate().env == default_env()
    assert JobSpec(argv=["true"], env={}).validate().env == default_env()
    assert JobSpec(argv=["true"], env={"TERM": "xterm"}).validate().env[b"TERM"] == b"xterm"
    assert JobSpec(argv=["true"], env_clear=True).validate().env == {}
    with pytest.raises(SpecError, match=r"^env_clear: must be true or false, not 'yes'$"):
        JobSpec(argv=["true"], env_clear="yes").validate()  # type: ignore[arg-type]


def test_a_spec_written_before_env_clear_still_loads() -> None:
    """spec.msgpack of a job started by an older corrald: no writable, no env_clear."""
    old = {
        "argv": [b"true"], "env": {b"A": b"1"}, "cwd": b"/", "user": "nobody",
        "limits": {"memory": 1 << 30}, "max_runtime": None, "owner": "alice",
        "stop_grace": 10.0, "log_limit": 1 << 30, "tmp_size": 64 << 20,
        "id": "ab" * 16, "created_at": 1,
    }  # fmt: skip
    spec = ResolvedSpec.from_wire(old)
    assert (spec.env, spec.writable, spec.limits) == ({b"A": b"1"}, (), Limits(memory=1 << 30))
    assert ResolvedSpec.from_wire(spec.to_wire()) == spec


# -- the bounds of a spec, in words a person reads ----------------------------------------------


def test_cpu_beyond_the_hosts_is_refused_naming_the_hosts_count() -> None:
    cpus = host_cpus()
    assert cpus == len(os.sched_getaffinity(0))
    Limits(cpu=float(cpus)).validate()
    with pytest.raises(SpecError) as caught:
        JobSpec(argv=["true"], limits=Limits(cpu=1000)).validate()
    cores = "core" if cpus == 1 else "cores"
    assert str(caught.value) == (
        f"limits.cpu: must be at most {cpus} {cores}, this host's CPUs, not 1000"
    )
    assert caught.value.field == "limits.cpu"
    with pytest.raises(SpecError, match=r"^limits.cpu: must be at most 1 core, this host's"):
        Limits(cpu=1.5).validate(cpus=1)


@needs_root
async def test_a_start_asking_for_more_cpus_than_the_host_has_changes_nothing(
    jobs: JobManager,
) -> None:
    with pytest.raises(OperationError) as caught:
        await jobs.start(JobSpec(argv=["true"], limits=Limits(cpu=host_cpus() + 1)))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert str(caught.value).startswith("limits.cpu: must be at most ")
    assert jobs.jobs() == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"limits": Limits(memory=100)}, "limits.memory: must be between 8M and 1P, not 100B"),
        ({"limits": Limits(memory=1 << 51)}, "limits.memory: must be between 8M and 1P, not 2P"),
        ({"limits": Limits(io_write_bps=0)},
         "limits.io_write_bps: must be between 1B and 1P, not 0B"),
        ({"limits": Limits(memory="1G")},  # type: ignore[arg-type]
         "limits.memory: must be a whole number of bytes, not '1G'"),
        ({"limits": Limits(pids=1.5)},  # type: ignore[arg-type]
         "limits.pids: must be a whole number, not 1.5"),
        ({"limits": Limits(pids=1)}, "limits.pids: must be between 2 and 4194304, not 1"),
        ({"limits": Limits(cpu=0)}, "limits.cpu: must be at least 0.001 cores, not 0"),
        ({"limits": Limits(cpu=float("nan"))}, "limits.cpu: must be a number of cores, not nan"),
        ({"limits": Limits(cpu="2")},  # type: ignore[arg-type]
         "limits.cpu: must be a number of cores, not '2'"),
        ({"max_runtime": 0}, "max_runtime: must be between 1ms and 10y, not 0s"),
        ({"max_runtime": 4e8}, "max_runtime: must be between 1ms and 10y, not 400000000s"),
        ({"max_runtime": True}, "max_runtime: must be a number of seconds, not true"),
        ({"stop_grace": 7200}, "stop_grace: must be between 0s and 1h, not 2h"),
        ({"log_limit": 100}, "log_limit: must be between 4K and 1P, not 100B"),
        ({"tmp_size": 1536}, "tmp_size: must be between 1M and 1P, not 1.5K"),
        ({"cwd": b"relative/p\xffath"}, "cwd: must be an absolute path, not 'relative/p\\xffath'"),
        ({"writable": ["var"]}, "writable[0]: must be an absolute path, not 'var'"),
        ({"writable": "/var"}, "writable: must be a list of absolute paths, not '/var'"),
        ({"env": {"A=B": "x"}}, "env: invalid variable name 'A=B': it may not contain '='"),
        ({"env": {"": "x"}}, "env: invalid variable name '': it may not be empty"),
        ({"env": {"A": 3}}, "env[A]: must be a string, not 3"),
        ({"env": ["A=B"]}, "env: must be a map of names to values, not a list"),
        ({"argv": ["sh", None]}, "argv[1]: must be a string, not null"),
        ({"limits": {"cpu": 1}}, "limits: must be a Limits record, not a map"),
    ],
)  # fmt: skip
def test_a_wrong_spec_is_refused_in_words_not_python(spec: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        JobSpec(**{"argv": ["true"], **spec}).validate()  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_limits_from_the_wire_say_what_is_wrong_in_words() -> None:
    with pytest.raises(SpecError, match=r"^limits: unknown limit 'ram'; known: cpu, io_"):
        Limits.from_wire({"ram": 1})
    with pytest.raises(SpecError, match=r"^limits: must be a map of limit names to values, not 3$"):
        Limits.from_wire(3)


@needs_root
def test_corral_start_names_sizes_and_cpus_as_a_person_would(
    pki_dir: Path, short_dir: Path
) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        env = {"CORRAL_ADDR": daemon.tcp, "CORRAL_IDENTITY": str(identity(pki_dir, "alice"))}
        memory = corral("start", "--memory", "100", "--", "true", env=env)
        cpu = corral("start", "--cpu", "1000", "--", "true", env=env)
    assert memory.returncode == 1, memory.stderr
    assert "limits.memory: must be between 8M and 1P, not 100B" in memory.stderr
    assert cpu.returncode == 1, cpu.stderr
    cores = "core" if host_cpus() == 1 else "cores"
    assert f"limits.cpu: must be at most {host_cpus()} {cores}, this host's CPUs, not 1000" in (
        cpu.stderr
    )


# -- what a job may not see of the kernel, nor reach of the host's daemons -----------

KERNEL_PROBE = (
    "wc -c < /proc/keys; wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l; "
    "{ echo corral > /proc/sys/kernel/domainname; } 2>&1 || true"
)


@pytest.mark.cgroup  # the v2 lane too: its root has CAP_SYS_RESOURCE, this host's may not
@pytest.mark.parametrize("user", ["dynamic", "root"])
async def test_the_command_cannot_lower_its_oom_score(jobs: JobManager, user: str) -> None:
    lower = (
        "import errno, os\n"
        "fd = os.open('/proc/self/oom_score_adj', os.O_RDWR)\n"
        "try:\n"
        "    os.write(fd, b'0')\n"
        "    print('lowered')\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
        "print(os.pread(fd, 8, 0).decode().strip())\n"
    )
    status, directory = await run(jobs, "/usr/bin/python3", "-c", lower, user=user)
    assert status.exit_code == 0, output(directory, 2)
    if oom_score_pinned():
        assert output(directory) == b"EACCES\n1000\n"
    else:  # the kernel makes it a floor only when written with CAP_SYS_RESOURCE
        assert output(directory) == b"lowered\n0\n"


@pytest.mark.parametrize("writable", [(), ("/",)], ids=["host-read-only", "rw-everything"])
async def test_the_kernels_files_are_masked_and_read_only_even_to_host_root(
    jobs: JobManager, writable: tuple[str, ...]
) -> None:
    """Host root (every capability, no user namespace) is the strongest
    job: it still reads nothing of the host's keys and timers, and its
    sysctls are read-only, even with the whole host writable."""
    assert Path("/proc/keys").read_bytes()  # the host has some: the job sees none
    status, directory = await run(
        jobs, "sh", "-c", KERNEL_PROBE, host_root=True, writable=list(writable)
    )
    assert status.exit_code == 0, output(directory, 2)
    lines = output(directory).decode().splitlines()
    assert lines[:3] == ["0", "0", "0"]
    assert lines[3].endswith("Read-only file system"), lines


async def test_a_job_cannot_reach_the_hosts_daemons_sockets(jobs: JobManager) -> None:
    """/run, where daemons put their sockets, is an empty read-only mount:
    a socket there that anyone may connect to is out of the job's reach
    (a read-only mount would not stop a connect)."""
    path = Path("/run") / f"corral-test-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen()
        probe = (
            "import socket, os; s = socket.socket(socket.AF_UNIX); "
            f"print(os.listdir('/run')); s.connect({str(path)!r})"
        )
        for spec in ({}, {"host_root": True}):
            status, directory = await run(jobs, "python3", "-c", probe, **spec)
            assert status.exit_code == 1, spec
            assert output(directory) == b"[]\n"
            assert b"FileNotFoundError" in output(directory, 2)
    finally:
        listener.close()
        path.unlink(missing_ok=True)

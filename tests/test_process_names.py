"""Process names: the spawner, each shim and each init say what they are.

The shim and init never exec (they are forks of the spawner), so without
their own titles `ps` shows the spawner's command line for every one of
them, and a job sees the host's path to Python as its PID 1's. The job
tests start real jobs (root, namespaces, cgroups); the title tests run a
real interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

import corral
from corral.identity import Identity
from corral.job import JobSpec
from corral.shim import proctitle
from corral.shim.cgroup import CgroupError, detect_flavour, open_cgroup, slice_name
from corral.store import OUTPUT_FILE
from corral.worker.manager import JobManager

from .conftest import TEST_CGROUP_PARENT, managed_jobs, until

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")
# A fresh spawner's first sandbox takes seconds in the cgroup v2 VM
# (software emulation); here, milliseconds.
SANDBOX_READY = 60.0
# What a job may not learn about the host from its PID 1's command line.
HOST_PATHS = [
    b".venv",
    os.fsencode(sys.executable),
    os.fsencode(sys.prefix),
    os.fsencode(Path(corral.__file__).resolve().parent.parent),
    b"corral.shim.spawner",
]


def command_line(pid: int) -> bytes:
    """/proc/PID/cmdline, without the NULs that pad a title to its area."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def output(job_dir: Path) -> bytes:
    """What a job wrote on stdout."""
    with open(job_dir / OUTPUT_FILE, "rb") as log:
        records = list(msgpack.Unpacker(log, raw=False))
    return b"".join(record[2] for record in records if record[0] == 1)


@pytest.fixture(params=[1, 0], ids=["warm", "cold"])
async def jobs(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobManager]:
    """A JobManager whose starts take a sandbox built ahead (warm) or build one (cold)."""
    async with managed_jobs(tmp_path / "state", warm=request.param) as manager:
        yield manager


# -- on the host ------------------------------------------------------------------------


@pytest.mark.jobs
@NEEDS_ROOT
async def test_the_host_sees_each_shim_named_for_its_job(jobs: JobManager) -> None:
    job = await jobs.start(JobSpec(argv=["sleep", "1000"]))
    shim, init, spawner = job.status.shim_pid, job.status.pid, jobs.spawner_pid
    assert shim is not None
    assert init is not None
    assert spawner is not None
    try:
        assert command_line(shim) == f"corral-shim {job.id}".encode()
        assert comm(shim) == "corral-shim"
        assert command_line(init) == b"corral-init"
        assert comm(init) == "corral-init"
        assert command_line(spawner) == b"corral-spawner"
        assert comm(spawner) == "corral-spawner"
    finally:
        await jobs.stop(job.id, grace=0)


@pytest.mark.jobs
@pytest.mark.cgroup
@NEEDS_ROOT
async def test_a_warm_shim_is_named_for_the_job_it_waits_for(tmp_path: Path) -> None:
    async with managed_jobs(tmp_path / "state", warm=1) as jobs:

        def waiting_init() -> int | None:
            """init in the sandbox built ahead, once it is in its cgroup."""
            if not jobs.warm_ids:
                return None
            try:
                procs = open_cgroup(
                    detect_flavour(),
                    jobs.warm_ids[0],
                    parent=TEST_CGROUP_PARENT,
                    slice=slice_name(Identity("", "user")),
                ).procs()
            except CgroupError:
                return None
            return procs[0] if len(procs) == 1 else None

        await until(waiting_init, SANDBOX_READY)
        init = waiting_init()
        assert init is not None
        shim = int(Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[1])
        # init names itself as its first step, alongside the shim's cgroup join.
        await until(lambda: command_line(init) == b"corral-init")
        assert command_line(shim) == f"corral-shim {jobs.warm_ids[0]}".encode()
        assert comm(shim) == "corral-shim"


# -- in the job -------------------------------------------------------------------------


@pytest.mark.jobs
@NEEDS_ROOT
@pytest.mark.parametrize("user", ["nobody", "root"])
async def test_a_jobs_pid_1_is_corral_init_and_shows_no_host_path(
    jobs: JobManager, user: str
) -> None:
    job = await jobs.start(
        JobSpec(argv=["sh", "-c", "ps ax -o pid=,args=; cat /proc/1/cmdline"], user=user)
    )
    status = await jobs.wait(job.id)
    assert status.exit_code == 0, status.reason
    printed = output(job.directory)
    listing, _, pid_1_cmdline = printed.rpartition(b"\n")
    processes = {
        pid: args for pid, args in (line.split(maxsplit=1) for line in listing.splitlines())
    }
    assert processes[b"1"] == b"corral-init"
    assert pid_1_cmdline.rstrip(b"\0") == b"corral-init"
    for path in HOST_PATHS:
        assert path not in pid_1_cmdline
        assert path not in processes[b"1"]


# -- the title itself ---------------------------------------------------------------------

SET_LONG_TITLE = """\
import os, sys
from corral.shim import proctitle
before = open("/proc/self/environ", "rb").read()
proctitle.set_title("corral-test", "x" * 10_000)
sys.stdout.buffer.write(open("/proc/self/cmdline", "rb").read())
sys.stdout.flush()
assert open("/proc/self/environ", "rb").read() == before, "the environment changed"
assert open("/proc/self/comm").read() == "corral-test\\n"
"""


def test_a_title_longer_than_the_argv_area_is_cut_and_ends_in_nul() -> None:
    argv = [sys.executable, "-c", SET_LONG_TITLE]
    env = {**os.environ, "CORRAL_TEST_MARKER": "after the argv area"}
    result = subprocess.run(argv, env=env, capture_output=True, check=True)
    size = sum(len(os.fsencode(arg)) + 1 for arg in argv)  # each argument and its NUL
    assert result.stdout == b"corral-test " + b"x" * (size - len("corral-test ") - 1) + b"\0"


def test_a_short_title_is_padded_with_nuls() -> None:
    assert proctitle.fitted(b"corral-init", 16) == b"corral-init\0\0\0\0\0"
    assert proctitle.fitted(b"corral-init", 5) == b"corr\0"


def test_the_argument_area_is_read_after_the_last_parenthesis_of_comm() -> None:
    # A comm of ") 1 2 (" must not shift the fields: state (field 3), 44
    # more, then arg_start and arg_end (48, 49), env_start, env_end, exit_code.
    fields = " ".join(["S", *["7"] * 44, "4096", "4160", "4160", "4200"])
    stat = f"42 () 1 2 () {fields} 0\n".encode()
    assert proctitle.argument_area(stat) == (4096, 4160)


def test_a_process_without_an_argument_area_is_refused() -> None:
    stat = ("2 (kthreadd) S " + " ".join(["0"] * 49) + "\n").encode()
    with pytest.raises(OSError, match="no argument area"):
        proctitle.argument_area(stat)

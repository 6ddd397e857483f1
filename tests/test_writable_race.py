"""A writable path cannot be turned into another with a symbolic link
swapped in while the job starts.

The attack, as reproduced against corral before writable paths were bound
by descriptor: a job that may write a directory swaps a subdirectory `d`
and a symbolic link `l` (to a directory it may not write) with
renameat2(RENAME_EXCHANGE), over and over, while jobs start with `d`
writable. A check of the path and a bind of it as two lookups made the
link's target writable in 3 of 13 starts. Here a process of the test does
the swapping (a job's would be the same syscall) for CORRAL_RACE_SECONDS
(5 by default; CI runs it for a minute too) while real jobs start, each
trying to write into the link's target: not one may.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from corral.errors import OperationError
from corral.job import JobSpec
from corral.worker.manager import JobManager

from .conftest import managed_jobs

pytestmark = [pytest.mark.jobs, pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")]

RACE_SECONDS = float(os.environ.get("CORRAL_RACE_SECONDS", "5"))

# Swaps ARGV[1] and ARGV[2] until killed; says "ready" after the first swap.
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
os.nice(19)  # every spare cycle, and only those: the rest of the suite runs beside it
AT_FDCWD, RENAME_EXCHANGE = -100, 2
first = True
while True:
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
    if first:
        print("ready", flush=True)
        first = False
"""


@pytest.fixture
def race_dirs() -> Iterator[tuple[Path, Path]]:
    """(base, target): base holds `d`, a directory, and `l`, a link to
    target; both are world-writable, so only the job's read-only host keeps
    it from writing target."""
    made = [Path(tempfile.mkdtemp(prefix="corral-race-", dir="/var/tmp")) for _ in "bt"]
    base, target = made
    for directory in made:
        directory.chmod(0o777)
    (base / "d").mkdir(mode=0o777)
    (base / "l").symlink_to(target)
    try:
        yield base, target
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with managed_jobs(tmp_path / "state") as manager:
        yield manager


async def test_a_link_swapped_in_never_makes_its_target_writable(
    jobs: JobManager, race_dirs: tuple[Path, Path]
) -> None:
    base, target = race_dirs
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(base / "d"), str(base / "l")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == "ready\n"
        bound = 0
        refusals: list[str] = []
        with trio.move_on_after(RACE_SECONDS):
            while True:
                escape = f"echo escaped > {target}/$$ 2>/dev/null; exit 0"
                spec = JobSpec(argv=["sh", "-c", escape], writable=[str(base / "d")])
                try:
                    job = await jobs.start(spec)
                except OperationError as exc:
                    refusals.append(str(exc))
                    continue
                status = await jobs.wait(job.id)
                assert status.exit_code == 0, status
                bound += 1
        assert swapper.poll() is None, "the swapper stopped"
    finally:
        swapper.kill()
        swapper.wait()
    escapes = len(list(target.iterdir()))
    assert escapes == 0, f"escaped in {escapes} of {bound} starts"
    # Both sides of the race were met: the path was bound, and refused
    # because a link was on the way.
    assert bound > 0
    assert refusals
    link = f"{base / 'd'} passes through a symbolic link; give the path it leads to"
    assert set(refusals) == {f"cannot make a path writable: {link}"}

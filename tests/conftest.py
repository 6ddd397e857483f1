"""Shared fixtures: a dev PKI, short socket paths, a corrald in the test's trio run.

CORRAL_STRICT_SKIPS=1 (set by .ci/run) turns every skip into a failure: in
CI the isolation and cgroup tests must run, and a kernel that lacks what
they need has to be seen, not quietly skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import trio

from corral import pki, pki_layout
from corral.address import Address, TCPAddress, UnixAddress
from corral.client.client import Client
from corral.shim import libc
from corral.shim.cgroup import CGROUP_ROOT, Flavour, detect_flavour, open_cgroup, orphans
from corral.store import read_spec, read_status
from corral.supervisor.server import Server, ServerConfig
from corral.tls import server_context
from corral.worker.cgroup_parent import default_parent, remove_if_empty
from corral.worker.manager import JobManager, open_job_manager

STRICT_SKIPS = "CORRAL_STRICT_SKIPS"
T = TypeVar("T")

# Jobs started by tests get cgroups under a parent of their own, never a
# real corrald's.
TEST_CGROUP_PARENT = f"corral-test-{os.getpid()}"
CORRALD = [sys.executable, "-m", "corral.supervisor.main"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(STRICT_SKIPS) == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and {STRICT_SKIPS}=1 forbids skips: {reason}"


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI: CA, server certificate, clients admin, alice and bob."""
    directory = tmp_path_factory.mktemp("pki")
    pki.init_pki(directory)
    return directory


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the job (as nobody) and the test can both reach."""
    directory = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/var/tmp"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit in a unix socket address (108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="corral-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for a condition another process brings about (a job's output, a
    process appearing in a cgroup), checking every few ms, failing after
    `timeout`: what the kernel does not announce can only be looked at."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def until_async(
    ask: Callable[[], Awaitable[T]], condition: Callable[[T], object], timeout: float = 10.0
) -> T:
    """Ask corrald until its answer meets the condition (what it does in its
    own time, such as ending a session whose connection closed, cannot be
    awaited); return that answer."""
    with trio.fail_after(timeout):
        while not condition(answer := await ask()):
            await trio.sleep(0.01)
    return answer


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def job_output(client: Client, job_id: str) -> bytes:
    """A job's whole output (stdout and stderr, as written), once it has ended."""
    async with client.logs(job_id, follow=True) as stream:
        return b"".join([r.data async for r in stream if isinstance(r.data, bytes)])


SMALL_DISK_SIZE = 4 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards (lazily: a failed test may leave
    a file open on it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    libc.mount(
        "tmpfs", str(disk), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, f"size={SMALL_DISK_SIZE}"
    )
    try:
        yield disk
    finally:
        libc.umount(str(disk), libc.MNT_DETACH)


@contextlib.asynccontextmanager
async def managed_jobs(state_dir: Path, **options: Any) -> AsyncIterator[JobManager]:
    """A running JobManager on `state_dir`, under the tests' cgroup parent.
    Afterwards every job it started has ended and no cgroup it made is left
    (one another test left is that test's failure, and the run's: see
    no_cgroups_left_behind)."""
    flavour = detect_flavour()
    before = set(orphans(flavour, parent=TEST_CGROUP_PARENT))
    async with open_job_manager(state_dir, cgroup_parent=TEST_CGROUP_PARENT, **options) as manager:
        try:
            yield manager
        finally:
            for job in manager.jobs():
                if not job.done.is_set():
                    await manager.stop(job.id, grace=0)
    left = set(orphans(flavour, parent=TEST_CGROUP_PARENT)) - before
    assert not left, f"job cgroups left behind: {sorted(left)}"


def identity(pki_dir: Path, name: str) -> Path:
    return pki_dir / pki_layout.CLIENTS_DIR / name


def make_server(pki_dir: Path, directory: Path, **config: Any) -> Server:
    """A server for 127.0.0.1 on a free port and unix:DIRECTORY/corrald.sock."""
    listen: list[Address] = [
        TCPAddress("127.0.0.1", 0),
        UnixAddress(str(directory / "corrald.sock")),
    ]
    (directory / "state").mkdir(mode=0o700, exist_ok=True)  # the audit trail's place
    settings = ServerConfig(state_dir=directory / "state", pki_dir=pki_dir, listen=listen, **config)
    return Server(settings, server_context(pki_dir))


@pytest.fixture
async def server(nursery: trio.Nursery, pki_dir: Path, short_dir: Path) -> AsyncIterator[Server]:
    """A corrald serving in this test's trio run; shut down afterwards."""
    server = make_server(pki_dir, short_dir)
    await nursery.start(server.serve)
    yield server
    server.shutdown()


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    tcp: str
    unix: str
    state_dir: Path
    log: Path  # corrald's stderr

    def wait(self, timeout: float = 30) -> str:
        """Wait for corrald to exit; return what it wrote on stderr."""
        self.process.wait(timeout)
        return self.log.read_text()


def start_corrald(*args: str, stderr: int | IO[str] = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CORRALD, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


@contextlib.contextmanager
def running_corrald(
    pki_dir: Path,
    directory: Path,
    *flags: str,
    end_its_jobs: bool = True,
    cgroup_parent: str | None = TEST_CGROUP_PARENT,
) -> Iterator[Daemon]:
    """A real corrald process on a free port and a unix socket in `directory`;
    its jobs are ended afterwards unless the test hands them to another.
    `cgroup_parent` None: corrald's default (the test removes what it leaves)."""
    socket_path = directory / "corrald.sock"
    # A file, not a pipe: a pipe nobody reads fills at 64 KiB, and then
    # corrald's next log line blocks its event loop.
    log = directory / "corrald.log"
    parent = [] if cgroup_parent is None else ["--cgroup-parent", cgroup_parent]
    with log.open("w") as log_file:
        process = start_corrald(
            "--state-dir",
            str(directory / "state"),
            "--pki",
            str(pki_dir),
            "--listen",
            "127.0.0.1:0",
            "--listen",
            f"unix:{socket_path}",
            *parent,
            *flags,
            stderr=log_file,
        )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # "corrald V listening on A, B"
        assert "listening on" in first, log.read_text()
        tcp, unix = first.split("listening on ")[1].strip().split(", ")
        yield Daemon(process, tcp, unix, directory / "state", log)
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=30)
        if end_its_jobs:
            state = directory / "state"
            end_jobs(state, cgroup_parent or default_parent(state))


@pytest.fixture
def corrald(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    """A real corrald process on a free port and a unix socket."""
    with running_corrald(pki_dir, short_dir) as daemon:
        yield daemon


def end_jobs(state_dir: Path, parent: str = TEST_CGROUP_PARENT) -> None:
    """Kill what jobs a test left running (their shims outlive corrald) and
    remove their cgroups (under `parent`)."""
    flavour = detect_flavour()
    for job_dir in sorted((state_dir / "jobs").glob("*")):
        status = read_status(job_dir)
        if status is not None and status.shim_pid and not status.state.finished:
            with contextlib.suppress(ProcessLookupError):
                os.kill(status.shim_pid, signal.SIGKILL)
        slice = ""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            slice = read_spec(job_dir).slice
        open_cgroup(flavour, job_dir.name, parent=parent, slice=slice).remove()


def clear_cgroup_parent(flavour: Flavour, parent: str) -> list[str]:
    """Remove every cgroup left under a test parent, then the parent itself;
    return the names that were left (a test should have removed them)."""
    left = orphans(flavour, parent=parent)
    for slice, name in left:
        open_cgroup(flavour, name, parent=parent, slice=slice).remove()
    remove_if_empty(flavour, parent, Path(CGROUP_ROOT))
    return [f"{slice}/{name}" if slice else name for slice, name in left]


@pytest.fixture(scope="session", autouse=True)
def no_cgroups_left_behind() -> Iterator[None]:
    """After the whole run: no job cgroup of the tests is left; remove the parents."""
    yield
    flavour = detect_flavour()
    if flavour is Flavour.NONE:
        return
    left = clear_cgroup_parent(flavour, TEST_CGROUP_PARENT)
    assert not left, f"job cgroups left behind: {left}"

"""Shared fixtures: a dev PKI, short socket paths, a corrald in the test's trio run.

CORRAL_STRICT_SKIPS=1 (set by .ci/run) turns every skip into a failure: in
CI the isolation and cgroup tests must run, and a kernel that lacks what
they need has to be seen, not quietly skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from corral import pki
from corral.address import Address, TCPAddress, UnixAddress
from corral.supervisor.server import Server, ServerConfig
from corral.tls import server_context

STRICT_SKIPS = "CORRAL_STRICT_SKIPS"
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
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit in a unix socket address (108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="corral-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def identity(pki_dir: Path, name: str) -> Path:
    return pki_dir / pki.CLIENTS_DIR / name


def make_server(pki_dir: Path, directory: Path, **config: Any) -> Server:
    """A server for 127.0.0.1 on a free port and unix:DIRECTORY/corrald.sock."""
    listen: list[Address] = [
        TCPAddress("127.0.0.1", 0),
        UnixAddress(str(directory / "corrald.sock")),
    ]
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


def start_corrald(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CORRALD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def corrald(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    """A real corrald process on a free port and a unix socket."""
    socket_path = short_dir / "corrald.sock"
    process = start_corrald(
        "--state-dir",
        str(short_dir / "state"),
        "--pki",
        str(pki_dir),
        "--listen",
        "127.0.0.1:0",
        "--listen",
        f"unix:{socket_path}",
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # "corrald V listening on A, B"
        assert "listening on" in first, process.stderr.read() if process.stderr else first
        tcp, unix = first.split("listening on ")[1].strip().split(", ")
        yield Daemon(process, tcp, unix, short_dir / "state")
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=30)

"""What the benches share: a real corrald on a temporary state directory
and dev PKI, the TLS contexts of the plain pumps they measure corral
against, and a few measures.

Benches run as scripts (`python bench/NAME.py`), which puts this
directory first on the import path: they import this module as `benchlib`.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack

CORRALD = [sys.executable, "-m", "corral.supervisor.main"]
# The cgroup parent of this bench process's corralds: its own, removed after.
PARENT = f"corral-bench-{os.getpid()}"


@dataclass(frozen=True)
class Daemon:
    address: str
    state: Path
    pid: int

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def identity(self) -> Path:
        return self.pki / "clients" / "admin"


@contextmanager
def corrald(max_connections: int | None = None) -> Iterator[Daemon]:
    """A corrald on 127.0.0.1 with a fresh state directory and dev PKI;
    with `max_connections`, that many in all and for the bench's one
    identity (the per-user cap would otherwise refuse a bench's crowd)."""
    caps = []
    if max_connections is not None:
        caps = ["--max-connections", str(max_connections),
                "--max-connections-per-user", str(max_connections)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        state = Path(directory)
        daemon = subprocess.Popen(
            [*CORRALD, "--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0",
             "--log-level", "warning", *caps, "--cgroup-parent", PARENT],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert daemon.stdout is not None
            address = daemon.stdout.readline().split("listening on ")[1].strip()
            yield Daemon(address, state, daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(60)
            for path in Path("/sys/fs/cgroup").glob(f"*/{PARENT}"):
                path.rmdir()


def tls_contexts(pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A plain pump's server and client TLS 1.3 contexts, from corral's dev PKI."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pki / "server.crt", pki / "server.key")
    server.load_verify_locations(pki / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(
        pki / "clients" / "admin" / "client.crt", pki / "clients" / "admin" / "client.key"
    )
    client.load_verify_locations(pki / "ca.crt")
    return server, client


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def shim_pid(daemon: Daemon, job_id: str) -> int:
    """The pid of a job's shim, from its status on disk."""
    status = msgpack.unpackb((daemon.state / "jobs" / job_id / "status.msgpack").read_bytes())
    return int(status["shim_pid"])

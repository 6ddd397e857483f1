"""How fast corrald takes connections and answers requests, and what a session costs.

Starts a real corrald on a temporary state directory and dev PKI, then:

1. opens N connections at once (TLS 1.3 handshake + hello + `info` each)
   and reports the rate and the corrald RSS with all N sessions open;
2. sends R `info` requests over one connection, C at a time, and reports
   requests per second and the latency percentiles.

    python bench/connections.py [--connections 500] [--requests 20000] [--concurrency 32]

Numbers go to docs/BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from corral.client.client import Client, connect

CORRALD = [sys.executable, "-m", "corral.supervisor.main"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def connections(address: str, identity: Path, count: int, pid: int) -> None:
    rss_before = rss_kib(pid)
    opened = trio.Event()
    done = 0
    release = trio.Event()

    async def one() -> None:
        nonlocal done
        async with connect(address, identity, timeout=60) as client:
            await client.info()
            done += 1
            if done == count:
                opened.set()
            await release.wait()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
        await opened.wait()
        elapsed = time.perf_counter() - start
        rss_open = rss_kib(pid)
        release.set()
    print(
        f"{count} concurrent connections (handshake + hello + info): {elapsed:.2f} s, "
        f"{count / elapsed:.0f} connections/s"
    )
    print(
        f"corrald RSS: {rss_before / 1024:.1f} MiB idle, {rss_open / 1024:.1f} MiB with "
        f"{count} sessions open ({(rss_open - rss_before) / count:.1f} KiB per session)"
    )


async def requests(address: str, identity: Path, total: int, concurrency: int) -> None:
    latencies: list[float] = []

    async def worker(client: Client, share: int) -> None:
        for _ in range(share):
            start = time.perf_counter()
            await client.info()
            latencies.append(time.perf_counter() - start)

    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(connect(address, identity))
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, client, total // concurrency)
        elapsed = time.perf_counter() - start
    latencies.sort()
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"{len(latencies)} info requests on one connection, {concurrency} in flight: "
        f"{len(latencies) / elapsed:.0f} requests/s, latency p50 {quantiles[49] * 1e3:.2f} ms, "
        f"p99 {quantiles[98] * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        state = Path(directory)
        daemon = subprocess.Popen(
            [*CORRALD, "--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0",
             "--log-level", "warning", "--max-connections", str(args.connections + 16),
             # All of them are the bench's one identity (the cap is 256 by default).
             "--max-connections-per-user", str(args.connections + 16)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert daemon.stdout is not None
            address = daemon.stdout.readline().split("listening on ")[1].strip()
            identity = state / "pki" / "clients" / "admin"
            print(
                f"corrald pid {daemon.pid} on {address}; python {sys.version.split()[0]}, "
                f"{os.cpu_count()} CPUs"
            )
            trio.run(connections, address, identity, args.connections, daemon.pid)
            trio.run(requests, address, identity, args.requests, args.concurrency)
        finally:
            daemon.terminate()
            daemon.wait(30)


if __name__ == "__main__":
    main()

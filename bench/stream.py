"""How fast corrald streams a job's output, how soon a write reaches a
follower, and what an idle follower costs.

Run as root on the host (it starts a real corrald on a temporary state
directory and dev PKI, and real jobs):

    .venv/bin/python bench/stream.py [--size 512] [--followers 1,10,100]
                                     [--idle 1000] [--samples 1000]

Measures:

1. MB/s from a job writing `--size` MiB as fast as it can (`head -c N
   /dev/zero`) to 1, 10 and 100 followers, each on its own mTLS connection
   over loopback, following from byte 0 while the job writes ("live"); and
   again from the ended job's log, now in the page cache ("replay"). Rates
   count the bytes of output.log every follower received (`chunks()`, the
   raw form), summed over the followers, from their first request to the
   last one's end.
2. Beside them, in the same run: `cat` of the same output.log to /dev/null,
   and a plain trio TLS 1.3 byte pump with msgpack framing (no corral code)
   between two processes: a sender reading the same file in 256 KiB chunks
   and a receiver decoding the frames.
3. Latency from a write inside a job (a timestamp line) to the follower
   receiving it, p50/p99, and the part of it before corrald (write -> the
   shim's record time).
4. corrald's RSS and CPU time with `--idle` followers parked on one quiet
   job: all on a few connections (64 streams each, the per-connection
   cap), then each on its own connection.

Numbers go to docs/BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio

from corral.client.client import Client, connect
from corral.job import STREAM_STDOUT

CORRALD = [sys.executable, "-m", "corral.supervisor.main"]
MIB = 1 << 20
PUMP_CHUNK = 256 * 1024
PARENT = f"corral-bench-{os.getpid()}"
STREAMS_PER_CONNECTION = 64  # corrald's default --max-requests


@dataclass(frozen=True)
class Daemon:
    address: str
    state: Path
    pid: int

    @property
    def identity(self) -> Path:
        return self.state / "pki" / "clients" / "admin"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextmanager
def corrald(max_connections: int) -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        state = Path(directory)
        daemon = subprocess.Popen(
            [*CORRALD, "--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0",
             "--log-level", "warning", "--max-connections", str(max_connections),
             "--cgroup-parent", PARENT],
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


@asynccontextmanager
async def clients(daemon: Daemon, count: int) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        # One at a time: each connection runs a task in its own nursery, and
        # the handshakes are not what is measured.
        opened = [
            await stack.enter_async_context(connect(daemon.address, daemon.identity, timeout=60))
            for _ in range(count)
        ]
        yield opened


# -- throughput ------------------------------------------------------------------


async def follow_all(followers: list[Client], job_id: str, pid: int) -> tuple[int, float]:
    """Every follower reads the job's log from 0 to its end: (total bytes, seconds)."""
    total = 0
    ticks = cpu_ticks(pid)
    ours = time.process_time()

    async def one(client: Client) -> None:
        nonlocal total
        async with client.logs(job_id, follow=True) as stream:
            async for chunk in stream.chunks():
                total += len(chunk.data)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in followers:
            nursery.start_soon(one, client)
    seconds = time.perf_counter() - start
    corrald_cpu = (cpu_ticks(pid) - ticks) / os.sysconf("SC_CLK_TCK") / seconds
    print(f"  corrald CPU {corrald_cpu:.0%}, followers' process CPU "
          f"{(time.process_time() - ours) / seconds:.0%}")  # fmt: skip
    return total, seconds


async def throughput(daemon: Daemon, counts: list[int], size: int) -> tuple[Path, list[str]]:
    rows = []
    log_path = Path()
    async with connect(daemon.address, daemon.identity) as control:
        for count in counts:
            async with clients(daemon, count) as followers:
                job = await control.start(["head", "-c", str(size), "/dev/zero"])
                total, seconds = await follow_all(followers, job.id, daemon.pid)
                final = await control.wait(job.id)
                assert final.exit_code == 0, final
                log_path = daemon.state / "jobs" / job.id / "output.log"
                expected = log_path.stat().st_size
                assert total == expected * count, (total, expected, count)
                live = total / seconds / MIB
                total, seconds = await follow_all(followers, job.id, daemon.pid)
                replay = total / seconds / MIB
                rows.append(
                    f"| {count} | {live:7.0f} MiB/s | {live / count:7.0f} MiB/s "
                    f"| {replay:7.0f} MiB/s | {replay / count:7.0f} MiB/s |"
                )
                print(rows[-1], flush=True)
            if count != counts[-1]:
                await control.remove(job.id)
    return log_path, rows


def cat_rate(path: Path) -> float:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the cache
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return path.stat().st_size / (time.perf_counter() - start) / MIB


# -- the plain pump: trio, TLS 1.3, msgpack frames, no corral code ------------


def pump_contexts(pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pki / "server.crt", pki / "server.key")
    server.load_verify_locations(pki / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(pki / "clients" / "admin" / "client.crt", pki / "clients" / "admin" / "client.key")
    client.load_verify_locations(pki / "ca.crt")
    return server, client


async def pump_send(path: Path, pki: Path) -> None:
    """The sender: one connection, the file as length-prefixed msgpack frames."""
    context, _ = pump_contexts(pki)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    tcp = await listeners[0].accept()
    stream = trio.SSLStream(tcp, context, server_side=True)
    with open(path, "rb") as file:
        offset = 0
        while chunk := file.read(PUMP_CHUNK):
            body = msgpack.packb({"t": "data", "id": 1, "offset": offset, "data": chunk})
            await stream.send_all(len(body).to_bytes(4, "big") + body)
            offset += len(chunk)
    await stream.send_all(len(b"\x80").to_bytes(4, "big") + b"\x80")
    await stream.aclose()


async def pump_receive(port: int, pki: Path) -> int:
    _, context = pump_contexts(pki)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    buffer = bytearray()
    received = 0
    while True:
        data = await stream.receive_some(64 * 1024)
        if not data:
            return received
        buffer += data
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + size:
                break
            message = msgpack.unpackb(bytes(buffer[4 : 4 + size]))
            del buffer[: 4 + size]
            if not message:
                return received
            received += len(message["data"])


def pump_rate(path: Path, pki: Path) -> float:
    sender = subprocess.Popen(
        [sys.executable, __file__, "pump-send", str(path), str(pki)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        start = time.perf_counter()
        received = trio.run(pump_receive, port, pki)
        seconds = time.perf_counter() - start
    finally:
        sender.wait(60)
    assert received == path.stat().st_size, (received, path.stat().st_size)
    return received / seconds / MIB


# -- latency ----------------------------------------------------------------------

LATENCY_JOB = """
import os, sys, time
for _ in range({samples}):
    time.sleep({gap})
    os.write(1, b"%d\\n" % time.time_ns())
"""


async def latency(daemon: Daemon, samples: int, gap: float) -> tuple[list[float], list[float]]:
    """(write -> follower, write -> shim record) in seconds, one per line."""
    to_follower: list[float] = []
    to_shim: list[float] = []
    async with connect(daemon.address, daemon.identity) as client:
        script = LATENCY_JOB.format(samples=samples, gap=gap)
        job = await client.start(["python3", "-c", script])
        async with client.logs(job.id, follow=True) as stream:
            async for record in stream:
                now = time.time_ns()
                assert record.stream == STREAM_STDOUT, record
                for line in record.data.split():
                    written = int(line)
                    to_follower.append((now - written) / 1e9)
                    to_shim.append((record.time_ns - written) / 1e9)
        assert stream.job is not None and stream.job.exit_code == 0, stream.job
    return to_follower, to_shim


# -- idle followers ---------------------------------------------------------------


async def idle_followers(daemon: Daemon, count: int, per_connection: int) -> tuple[float, float, float]:
    """corrald's RSS growth per follower (KiB), its CPU seconds over a 2 s idle
    window, and the RSS before (MiB), with `count` followers parked on one job."""
    connections = -(-count // per_connection)
    async with connect(daemon.address, daemon.identity) as control:
        job = await control.start(["sh", "-c", "echo ready; exec sleep 3600"])
        try:
            async with clients(daemon, connections) as followers:
                rss_before = rss_kib(daemon.pid)
                parked = 0
                all_parked = trio.Event()

                async def one(client: Client) -> None:
                    nonlocal parked
                    async with client.logs(job.id, follow=True) as stream:
                        async for _ in stream.chunks():
                            parked += 1
                            if parked == count:
                                all_parked.set()

                async with trio.open_nursery() as nursery:
                    for index in range(count):
                        nursery.start_soon(one, followers[index // per_connection])
                    await all_parked.wait()
                    await trio.sleep(0.5)  # let corrald settle (a measurement window, not a sync)
                    rss_after = rss_kib(daemon.pid)
                    ticks = cpu_ticks(daemon.pid)
                    await trio.sleep(2)  # the idle window measured
                    idle_cpu = (cpu_ticks(daemon.pid) - ticks) / os.sysconf("SC_CLK_TCK")
                    nursery.cancel_scope.cancel()
        finally:
            await control.stop(job.id, 0)
    return (rss_after - rss_before) / count, idle_cpu, rss_before / 1024


async def idle(daemon: Daemon, count: int) -> list[str]:
    rows = []
    for per_connection, label in (
        (STREAMS_PER_CONNECTION, f"{count} followers on {-(-count // STREAMS_PER_CONNECTION)} connections"),
        (1, f"{count} followers, one connection each"),
    ):
        per_follower, idle_cpu, before = await idle_followers(daemon, count, per_connection)
        rows.append(
            f"| {label} | {per_follower:.1f} KiB per follower | {idle_cpu:.2f} s CPU in 2 s idle "
            f"| RSS before {before:.1f} MiB |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["pump-send"]:
        trio.run(pump_send, Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB each job writes (default 512)")
    parser.add_argument("--followers", default="1,10,100", help="follower counts (default 1,10,100)")
    parser.add_argument("--idle", type=int, default=1000, help="idle followers (default 1000)")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples (default 1000)")
    args = parser.parse_args()
    counts = [int(count) for count in args.followers.split(",")]
    # Every connection is an fd, at both ends.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with corrald(max_connections=max(args.idle, max(counts)) + 16) as daemon:
        print(f"corrald pid {daemon.pid} on {daemon.address}; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, {shutil.which('head')} writing {args.size} MiB")  # fmt: skip
        print("| followers | live, all | live, each | replay, all | replay, each |")
        log_path, _ = trio.run(throughput, daemon, counts, args.size * MIB)
        print(f"cat of output.log ({log_path.stat().st_size / MIB:.0f} MiB): {cat_rate(log_path):.0f} MiB/s")
        rate = pump_rate(log_path, daemon.state / "pki")
        print(f"plain trio TLS + msgpack pump, two processes: {rate:.0f} MiB/s")
        to_follower, to_shim = trio.run(latency, daemon, args.samples, 0.005)
        for name, samples in (("write -> follower", to_follower), ("write -> shim record", to_shim)):
            print(
                f"{name}: p50 {statistics.median(samples) * 1e3:.3f} ms, "
                f"p99 {percentile(samples, 0.99) * 1e3:.3f} ms ({len(samples)} writes)"
            )
        if args.idle:
            trio.run(idle, daemon, args.idle)


if __name__ == "__main__":
    main()

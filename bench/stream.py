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
   between two processes: a sender reading the same file in 256 KiB chunks,
   each sent as a msgpack map, and a receiver finding them with msgpack's
   streaming Unpacker.
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
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import msgpack
import trio
from benchlib import Daemon, corrald, rss_kib, tls_contexts

from corral.client.client import Client, connect
from corral.records import STREAM_STDOUT

MIB = 1 << 20
PUMP_CHUNK = 256 * 1024
STREAMS_PER_CONNECTION = 64  # corrald's default --max-requests


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


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
    sizes: list[int] = []
    ticks = cpu_ticks(pid)
    faults = minor_faults(pid)
    ours = time.process_time()

    async def one(client: Client) -> None:
        nonlocal total
        async with client.logs(job_id, follow=True) as stream:
            async for chunk in stream.chunks():
                total += len(chunk.data)
                sizes.append(len(chunk.data))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in followers:
            nursery.start_soon(one, client)
    seconds = time.perf_counter() - start
    corrald_cpu = (cpu_ticks(pid) - ticks) / os.sysconf("SC_CLK_TCK") / seconds
    followers_cpu = (time.process_time() - ours) / seconds
    faults_per_mib = (minor_faults(pid) - faults) / (total / MIB)
    print(
        f"  corrald CPU {corrald_cpu:.0%}, the followers' process CPU {followers_cpu:.0%}; "
        f"chunks of {total / len(sizes) / 1024:.0f} KiB; corrald page faults per MiB "
        f"{faults_per_mib:.0f}"
    )
    return total, seconds


def rate(samples: list[float]) -> str:
    """The median of the runs' MiB/s, with their range."""
    return f"{statistics.median(samples):.0f} ({min(samples):.0f}-{max(samples):.0f})"


async def throughput(
    daemon: Daemon, counts: list[int], size: int, budget: int, repeat: int
) -> Path:
    """Rows of MiB/s, live and replayed, per follower count; returns the log of
    the first job (the largest), for the others to read. Between the runs of
    each count, the plain pump moves the same log: the machine is noisy, so
    the figures are medians of interleaved runs."""
    first_log: Path | None = None
    pump_runs: list[float] = []
    async with connect(daemon.address, daemon.identity) as control:
        for count in counts:
            job_size = min(size, budget // count)
            live_runs: list[float] = []
            replay_runs: list[float] = []
            async with clients(daemon, count) as followers:
                for _ in range(repeat):
                    job = await control.start(["head", "-c", str(job_size), "/dev/zero"])
                    total, seconds = await follow_all(followers, job.id, daemon.pid)
                    final = await control.wait(job.id)
                    assert final.exit_code == 0, final
                    log_path = daemon.state / "jobs" / job.id / "output.log"
                    assert total == log_path.stat().st_size * count, (total, count)
                    live_runs.append(total / seconds / MIB)
                    total, seconds = await follow_all(followers, job.id, daemon.pid)
                    replay_runs.append(total / seconds / MIB)
                    if first_log is None:
                        first_log = log_path
                    else:
                        await control.remove(job.id)
                    pki = daemon.state / "pki"
                    pump_runs.append(await trio.to_thread.run_sync(pump_rate, first_log, pki))
            live, replay = statistics.median(live_runs), statistics.median(replay_runs)
            print(
                f"| {count} | {job_size / MIB:.0f} MiB | {rate(live_runs)} | {live / count:.0f} "
                f"| {rate(replay_runs)} | {replay / count:.0f} |",
                flush=True,
            )
    assert first_log is not None
    log_mib = first_log.stat().st_size / MIB
    print(
        f"| plain trio TLS + msgpack pump, two processes ({log_mib:.0f} MiB) "
        f"| | {rate(pump_runs)} |"
    )
    print(f"| `cat` of the same output.log to /dev/null | | {cat_rate(first_log):.0f} |")
    return first_log


def cat_rate(path: Path) -> float:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the cache
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return path.stat().st_size / (time.perf_counter() - start) / MIB


# -- the plain pump: trio, TLS 1.3, msgpack frames, no corral code ------------


async def pump_send(path: Path, pki: Path, follow: int) -> None:
    """The sender: one connection, the file as length-prefixed msgpack frames.
    With `follow` > 0, new bytes found by inotify, until that many lines."""
    context, _ = tls_contexts(pki)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    inotify = -1
    if follow:
        libc = ctypes.CDLL(None, use_errno=True)
        inotify = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        libc.inotify_add_watch(inotify, bytes(path), 0x2)  # IN_MODIFY
    print(listeners[0].socket.getsockname()[1], flush=True)
    stream = trio.SSLStream(await listeners[0].accept(), context, server_side=True)
    await stream.do_handshake()
    lines = offset = 0
    with open(path, "rb") as file:
        while True:
            chunk = os.pread(file.fileno(), PUMP_CHUNK, offset)
            if chunk:
                await stream.send_all(
                    msgpack.packb({"t": "data", "id": 1, "offset": offset, "data": chunk})
                )
                offset += len(chunk)
                lines += chunk.count(b"\n")
            elif lines >= follow:
                break
            else:
                await trio.lowlevel.wait_readable(inotify)
                os.read(inotify, 4096)
    await stream.send_all(msgpack.packb({}))  # the end
    await stream.aclose()


async def pump_receive(
    port: int, pki: Path, writer: list[str] | None = None
) -> tuple[int, list[float]]:
    """Receive the pump's bytes: (how many, latencies of timestamp lines). With
    `writer`, that command is started once connected, its stdout the file."""
    _, context = tls_contexts(pki)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    await stream.do_handshake()
    process = None
    if writer:
        with open(writer[0], "ab") as output:
            process = subprocess.Popen(writer[1:], stdout=output)
    try:
        return await _receive_frames(stream, latencies=process is not None)
    finally:
        if process is not None:
            process.wait(60)  # it has written its last line before the pump ends


async def _receive_frames(stream: trio.abc.Stream, *, latencies: bool) -> tuple[int, list[float]]:
    # msgpack frames itself: the Unpacker (C) finds the messages in the stream.
    unpacker = msgpack.Unpacker(max_buffer_size=4 * PUMP_CHUNK)
    received = 0
    samples: list[float] = []
    while True:
        data = await stream.receive_some(64 * 1024)
        if not data:
            return received, samples
        unpacker.feed(data)
        for message in unpacker:
            if not message:
                return received, samples
            received += len(message["data"])
            if latencies:
                now = time.time_ns()
                samples.extend((now - int(line)) / 1e9 for line in message["data"].split())


def pump(
    path: Path, pki: Path, writer: list[str] | None = None, lines: int = 0
) -> tuple[int, float, list[float]]:
    """Run the plain pump of `path` to us: (bytes, seconds, latencies)."""
    sender = subprocess.Popen(
        [sys.executable, __file__, "pump-send", str(path), str(pki), str(lines)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        start = time.perf_counter()
        received, latencies = trio.run(pump_receive, port, pki, writer)
        seconds = time.perf_counter() - start
    finally:
        sender.wait(60)
    return received, seconds, latencies


def pump_rate(path: Path, pki: Path) -> float:
    received, seconds, _ = pump(path, pki)
    assert received == path.stat().st_size, (received, path.stat().st_size)
    return received / seconds / MIB


def plain_latency(pki: Path, samples: int, gap: float) -> list[float]:
    """A writer appends timestamp lines to a file; the pump sends them on."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        path = Path(directory) / "lines"
        path.touch()
        script = LATENCY_JOB.format(samples=samples, gap=gap)
        _, _, latencies = pump(path, pki, [str(path), sys.executable, "-c", script], samples)
    return latencies


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
                assert isinstance(record.data, bytes)
                for line in record.data.split():
                    written = int(line)
                    to_follower.append((now - written) / 1e9)
                    to_shim.append((record.time_ns - written) / 1e9)
        assert stream.job is not None
        assert stream.job.exit_code == 0, stream.job
    return to_follower, to_shim


# -- idle followers ---------------------------------------------------------------


async def idle_followers(
    daemon: Daemon, count: int, per_connection: int
) -> tuple[float, float, float]:
    """corrald's RSS growth per follower (KiB, their connections included), its
    CPU seconds over a 2 s idle window, and the RSS before (MiB), with `count`
    followers parked on one job."""
    connections = -(-count // per_connection)
    async with connect(daemon.address, daemon.identity) as control:
        job = await control.start(["sh", "-c", "echo ready; exec sleep 3600"])
        try:
            rss_before = rss_kib(daemon.pid)
            async with clients(daemon, connections) as followers:
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
        (
            STREAMS_PER_CONNECTION,
            f"{count} followers on {-(-count // STREAMS_PER_CONNECTION)} connections",
        ),
        (1, f"{count} followers, one connection each"),
    ):
        per_follower, idle_cpu, before = await idle_followers(daemon, count, per_connection)
        rows.append(
            f"| {label} | {per_follower:.1f} KiB per follower (RSS before: {before:.1f} MiB) "
            f"| {idle_cpu:.2f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["pump-send"]:
        trio.run(pump_send, Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB each job writes (default 512)")
    parser.add_argument(
        "--followers", default="1,10,100", help="follower counts (default 1,10,100)"
    )
    parser.add_argument("--idle", type=int, default=1000, help="idle followers (default 1000)")
    parser.add_argument(
        "--budget",
        type=int,
        default=2048,
        help="MiB all followers of a run read together, at most (default 2048)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure (default 3)")
    parser.add_argument("--samples", type=int, default=2000, help="latency samples (default 2000)")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.005,
        help="seconds between the timestamp lines (default 0.005)",
    )
    args = parser.parse_args()
    counts = [int(count) for count in args.followers.split(",")]
    # Every connection is an fd, at both ends.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with corrald(max_connections=max(args.idle, *counts) + 16) as daemon:
        print(f"corrald pid {daemon.pid} on {daemon.address}; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs; median (range) of {args.repeat} runs")  # fmt: skip
        if args.idle:
            print("| idle followers | corrald memory | corrald CPU over 2 s |")
            trio.run(idle, daemon, args.idle)
        print("| followers | MiB each | live MiB/s, all | each | replay MiB/s, all | each |")
        trio.run(throughput, daemon, counts, args.size * MIB, args.budget * MIB, args.repeat)
        to_follower, to_shim = trio.run(latency, daemon, args.samples, args.gap)
        plain = plain_latency(daemon.state / "pki", args.samples, args.gap)
        print(f"| latency, one line every {args.gap * 1e3:g} ms | p50 | p99 |")
        for name, samples in (
            ("write in the job -> follower", to_follower),
            ("write in the job -> the shim's record", to_shim),
            ("plain: file write -> inotify -> TLS pump -> receiver", plain),
        ):
            print(
                f"| {name} | {statistics.median(samples) * 1e3:.3f} ms "
                f"| {percentile(samples, 0.99) * 1e3:.3f} ms |"
            )


if __name__ == "__main__":
    main()

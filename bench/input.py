"""How fast a job takes input, and what an attached, idle session costs.

Run as root on the host (it starts a real corrald on a temporary state
directory and dev PKI, and real jobs):

    .venv/bin/python bench/input.py [--mib 1024] [--sinks sha256sum,wc]
                                    [--repeat 3] [--idle 100]

Measures:

1. MiB/s of input into a job started with stdin: `--mib` MiB of zeros to
   `sha256sum` (the digest checked), and to `wc -c` (the count checked; a
   sink that costs next to nothing, so the path to it is what is measured):
   - the library: `Client.attach()`, `send()` of 64 KiB pieces, `close()`,
     from the first send to the job's end (its output and status in); and
     again in pieces of the client's INPUT_CHUNK (60 KiB: one message each,
     where a 64 KiB send goes as two);
   - the CLI: `corral run -i -- CMD`, its stdin a pipe from `head -c N
     /dev/zero`, and a file of zeros, from spawning it to its exit (its own
     start and connection included; `--mib 0` shows what they cost);
   - beside them in the same run: a plain trio TLS 1.3 pump with msgpack
     framing (no corral code), this process sending the same 64 KiB pieces
     as msgpack maps to a receiver in another process, which writes them
     to the same command's stdin and sends its output back; and the command
     alone, fed through a pipe by `head -c`.
   Runs are interleaved (corral, CLI, pump, ...) and `--repeat` times.
2. corrald's RSS with `--idle` jobs started with stdin (`cat`), then with a
   connection each, then each connection attached to its job (input and
   output, nothing flowing): the growth per connection and per attachment,
   and corrald's CPU over 2 s while they idle; the same for the shims, a
   shim's RSS before and after its job is attached. Each round on a new
   corrald, so that one round's freed memory does not serve the next.

Numbers go to docs/BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import msgpack
import trio
from benchlib import Daemon, corrald, rss_kib, shim_pid, tls_contexts

from corral.client.client import INPUT_CHUNK, Client, connect

CLI = [sys.executable, "-m", "corral.client.cli"]
MIB = 1 << 20
# The piece a sender writes: a pipe's buffer, what `corral run -i` reads at once.
CHUNK = 64 << 10
ZEROS = bytes(CHUNK)
SINKS = {"sha256sum": ["sha256sum"], "wc": ["wc", "-c"]}
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------


def cpu_ticks(pid: int, *, reaped: bool = False) -> int:
    """utime + stime of `pid` (0 once it has gone); with `reaped`, those of
    the children it has reaped too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return sum(int(field) for field in fields[11 : 15 if reaped else 13])


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


class CPU:
    """CPU time of named processes, and of the descendants of others, over a
    stretch: `shares(seconds)` gives each as a part of one core."""

    def __init__(self, pids: dict[str, int], trees: dict[str, int] | None = None) -> None:
        self._pids = pids
        self._trees = trees or {}
        self._start = time.process_time()
        self._before = self._ticks()
        self._last = self._before

    def _ticks(self) -> dict[str, int]:
        ticks = {name: cpu_ticks(pid) for name, pid in self._pids.items()}
        for name, root in self._trees.items():
            # A descendant that ends is counted in its reaper's.
            ticks[name] = sum(cpu_ticks(pid, reaped=True) for pid in descendants(root))
        return ticks

    def sample(self) -> None:
        """Note the descendants' ticks while they live (just before they end)."""
        self._last = self._ticks()

    def shares(self, seconds: float) -> str:
        now = self._ticks()
        parts = [
            f"{name} {(max(now[name], self._last[name]) - before) / CLOCK_TICK / seconds:.0%}"
            for name, before in self._before.items()
        ]
        parts.append(f"bench {(time.process_time() - self._start) / seconds:.0%}")
        return ", ".join(parts)


def expected_output(sink: str, size: int) -> bytes:
    """What `sink` prints for `size` zeros read from its stdin."""
    if sink == "wc":
        return b"%d\n" % size
    digest = hashlib.sha256()
    for _ in range(size // CHUNK):
        digest.update(ZEROS)
    digest.update(bytes(size % CHUNK))
    return digest.hexdigest().encode() + b"  -\n"


def pieces(size: int, piece: int = CHUNK) -> Iterator[bytes]:
    whole = bytes(piece)
    for start in range(0, size, piece):
        yield whole if size - start >= piece else bytes(size - start)


# -- corral, the library --------------------------------------------------------------


async def library_run(
    daemon: Daemon, sink: str, size: int, piece: int = CHUNK
) -> tuple[float, bytes, str]:
    """Send `size` zeros to a job running `sink`, `piece` bytes a send:
    (seconds, its output, CPU)."""
    async with connect(daemon.address, daemon.identity) as client:
        job = await client.start(SINKS[sink], stdin=True)
        shim = shim_pid(daemon, job.id)
        output = b""
        async with client.attach(job.id, offset=0) as attachment:

            async def feed() -> None:
                for data in pieces(size, piece):
                    await attachment.send(data)
                cpu.sample()
                await attachment.close()

            cpu = CPU({"corrald": daemon.pid, "shim": shim}, {"job": shim})
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                async for record in attachment:
                    assert isinstance(record.data, bytes), record
                    output += record.data
            seconds = time.perf_counter() - start
        assert attachment.job is not None
        assert attachment.job.exit_code == 0, attachment.job
        await client.remove(job.id)
    return seconds, output, cpu.shares(seconds)


# -- corral, the CLI ------------------------------------------------------------------


def cli_run(daemon: Daemon, sink: str, size: int, source: Path | None) -> tuple[float, bytes]:
    """`corral run -i -- SINK`, its stdin `source` (a file) or a pipe from
    `head -c SIZE /dev/zero`: (seconds from spawn to exit, its stdout)."""
    command = [*CLI, "--addr", daemon.address, "--identity", str(daemon.identity),
               "run", "-i", "--", *SINKS[sink]]  # fmt: skip
    start = time.perf_counter()
    if source is not None:
        with open(source, "rb") as stdin:
            result = subprocess.run(command, stdin=stdin, capture_output=True, check=True)
    else:
        head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        assert head.stdout is not None
        result = subprocess.run(command, stdin=head.stdout, capture_output=True, check=True)
        head.stdout.close()
        head.wait()
    return time.perf_counter() - start, result.stdout


def plain_sink(sink: str, size: int) -> tuple[float, bytes]:
    """The command alone: `head -c SIZE /dev/zero | SINK`."""
    start = time.perf_counter()
    head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    result = subprocess.run(SINKS[sink], stdin=head.stdout, capture_output=True, check=True)
    assert head.stdout is not None
    head.stdout.close()
    head.wait()
    return time.perf_counter() - start, result.stdout


# -- the plain pump: trio, TLS 1.3, msgpack frames, no corral code ------------------


async def pump_receive(pki: Path, argv: list[str]) -> None:
    """The receiver (its own process): one connection's msgpack frames
    written to `argv`'s stdin; its stdout sent back once it has ended."""
    context, _ = tls_contexts(pki)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    stream = trio.SSLStream(await listeners[0].accept(), context, server_side=True)
    await stream.do_handshake()
    mine = resource.getrusage(resource.RUSAGE_SELF)
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None
    assert process.stdout is not None
    # msgpack frames itself: the Unpacker (C) finds the messages in the stream.
    unpacker = msgpack.Unpacker(max_buffer_size=4 * CHUNK)
    ended = False
    while not ended:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise RuntimeError("the pump's sender left before its end")
        unpacker.feed(data)
        for message in unpacker:
            if not message:
                ended = True
                break
            await process.stdin.send_all(message["data"])
    await process.stdin.aclose()
    output = b""
    while data := await process.stdout.receive_some():
        output += data
    await process.wait()
    cpu = {
        "receiver": _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - _cpu_seconds(mine),
        "command": _cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)),
    }
    await stream.send_all(msgpack.packb({"output": output, "cpu": cpu}))
    await stream.aclose()


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


async def pump_send(port: int, pki: Path, size: int) -> tuple[float, bytes, str]:
    """This side of the pump, as the corral client is: (seconds, output, CPU)."""
    _, context = tls_contexts(pki)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    await stream.do_handshake()
    start, ours = time.perf_counter(), time.process_time()
    offset = 0
    for piece in pieces(size):
        await stream.send_all(
            msgpack.packb({"t": "data", "id": 1, "offset": offset, "data": piece})
        )
        offset += len(piece)
    await stream.send_all(msgpack.packb({}))  # the end
    unpacker = msgpack.Unpacker()
    while True:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise RuntimeError("the pump's receiver left without the output")
        unpacker.feed(data)
        for message in unpacker:
            seconds = time.perf_counter() - start
            await stream.aclose()
            cpu = {**message["cpu"], "bench": time.process_time() - ours}
            shares = ", ".join(f"{name} {used / seconds:.0%}" for name, used in cpu.items())
            return seconds, bytes(message["output"]), shares


def pump(pki: Path, sink: str, size: int) -> tuple[float, bytes, str]:
    """Run the plain pump into `sink`: (seconds, its output, CPU)."""
    receiver = subprocess.Popen(
        [sys.executable, __file__, "pump-receive", str(pki), *SINKS[sink]],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        return trio.run(pump_send, port, pki, size)
    finally:
        receiver.wait(60)


# -- throughput -----------------------------------------------------------------------


def median_range(samples: list[float]) -> str:
    return f"{statistics.median(samples):.0f} ({min(samples):.0f}-{max(samples):.0f})"


def host_ticks() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole host since boot, from /proc/stat."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


Measure = tuple[float, bytes] | tuple[float, bytes, str]


def throughput(daemon: Daemon, sinks: list[str], size: int, repeat: int) -> None:
    """The rates of each way into each sink, interleaved, `repeat` times.
    Each run's line says how busy the host was meanwhile (all processes,
    ours included), out of all its CPUs: the host may be shared."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        zeros = Path(directory) / "zeros"
        with open(zeros, "wb") as file:
            for piece in pieces(size):
                file.write(piece)
        for sink in sinks:
            expected = expected_output(sink, size)
            rates: dict[str, list[float]] = {}
            ways: list[tuple[str, Callable[[], Measure]]] = [
                ("library", partial(trio.run, library_run, daemon, sink, size)),
                (
                    f"library, {INPUT_CHUNK >> 10} KiB sends",
                    partial(trio.run, library_run, daemon, sink, size, INPUT_CHUNK),
                ),
                ("CLI, stdin a pipe", partial(cli_run, daemon, sink, size, None)),
                ("CLI, stdin a file", partial(cli_run, daemon, sink, size, zeros)),
                ("plain pump", partial(pump, daemon.pki, sink, size)),
                ("the command alone", partial(plain_sink, sink, size)),
            ]
            for _ in range(repeat):
                for name, way in ways:
                    busy_before, total_before = host_ticks()
                    seconds, output, *cpu = way()
                    busy, total = host_ticks()
                    busy, total = busy - busy_before, total - total_before
                    assert output == expected, (name, output, expected)
                    rates.setdefault(name, []).append(size / MIB / seconds)
                    print(f"  {sink}: {name}: {seconds:.2f} s, host busy {busy / total:.0%}; "
                          f"{''.join(cpu)}", flush=True)  # fmt: skip
            pump_rate = statistics.median(rates["plain pump"])
            for name, samples in rates.items():
                print(
                    f"| {sink} | {name} | {median_range(samples)} | {max(samples):.0f} "
                    f"| {statistics.median(samples) / pump_rate:.0%} |",
                    flush=True,
                )


def fixed_cost(daemon: Daemon, repeat: int) -> None:
    """The CLI with no input: its start, connection, the job's start and end."""
    seconds = [cli_run(daemon, "wc", 0, None)[0] for _ in range(repeat)]
    print(f"`corral run -i -- wc -c` of nothing: {statistics.median(seconds) * 1e3:.0f} ms "
          f"({min(seconds) * 1e3:.0f}-{max(seconds) * 1e3:.0f})")  # fmt: skip


# -- idle attachments -----------------------------------------------------------------


@asynccontextmanager
async def clients(daemon: Daemon, count: int) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        # One at a time: the handshakes are not what is measured.
        yield [
            await stack.enter_async_context(connect(daemon.address, daemon.identity, timeout=60))
            for _ in range(count)
        ]


async def idle_attachments(daemon: Daemon, count: int) -> str:
    """One table row: corrald's RSS growth per connection and per attachment
    (KiB), its CPU idle, and a shim's growth once attached."""
    async with connect(daemon.address, daemon.identity) as control:
        jobs = [await control.start(["cat"], stdin=True) for _ in range(count)]
        try:
            shims = [shim_pid(daemon, job.id) for job in jobs]
            await trio.sleep(0.5)  # let corrald settle (a measurement window, not a sync)
            base = rss_kib(daemon.pid)
            shims_before = [rss_kib(pid) for pid in shims]
            async with clients(daemon, count) as sessions:
                await trio.sleep(0.5)
                connected = rss_kib(daemon.pid)
                async with trio.open_nursery() as nursery:
                    echoed = 0
                    all_echoed = trio.Event()

                    async def one(client: Client, job_id: str) -> None:
                        nonlocal echoed
                        async with client.attach(job_id) as attachment:
                            await attachment.send(b"ping\n")  # proves the session works
                            async for _ in attachment.chunks():
                                echoed += 1
                                if echoed == count:
                                    all_echoed.set()

                    for client, job in zip(sessions, jobs, strict=True):
                        nursery.start_soon(one, client, job.id)
                    await all_echoed.wait()
                    await trio.sleep(0.5)
                    attached = rss_kib(daemon.pid)
                    shims_after = [rss_kib(pid) for pid in shims]
                    ticks = cpu_ticks(daemon.pid)
                    await trio.sleep(2)  # the idle window measured
                    idle_cpu = (cpu_ticks(daemon.pid) - ticks) / CLOCK_TICK
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for job in jobs:
                    await control.stop(job.id, 0)
                    await control.remove(job.id)
    shim_growth = statistics.median(
        after - before for before, after in zip(shims_before, shims_after, strict=True)
    )
    return (
        f"| {count} | {base / 1024:.1f} MiB | {(connected - base) / count:.1f} KiB "
        f"| {(attached - connected) / count:.1f} KiB | {(attached - base) / count:.1f} KiB "
        f"| {idle_cpu:.2f} s | {statistics.median(shims_before) / 1024:.2f} MiB "
        f"| {shim_growth:+.0f} KiB |"
    )


def main() -> None:
    if sys.argv[1:2] == ["pump-receive"]:
        trio.run(pump_receive, Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB of input (default 1024)")
    parser.add_argument(
        "--sinks", default="sha256sum,wc", help="commands fed: sha256sum, wc (default both)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure (default 3)")
    parser.add_argument(
        "--idle", type=int, default=100, help="idle attachments, 0 for none (default 100)"
    )
    args = parser.parse_args()
    sinks = [sink for sink in args.sinks.split(",") if sink]
    if unknown := set(sinks) - set(SINKS):
        parser.error(f"unknown sinks: {', '.join(sorted(unknown))}")
    # Every connection is an fd, at both ends, and a shim's too.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"load {Path('/proc/loadavg').read_text().strip()}")  # fmt: skip
    if args.idle:
        print(
            "| attachments | corrald RSS, jobs running | per connection | per attachment "
            "| per session, both | corrald CPU over 2 s | shim RSS | shim, attached |"
        )
        for _ in range(args.repeat):
            with corrald(max_connections=args.idle + 16) as daemon:
                print(trio.run(idle_attachments, daemon, args.idle), flush=True)
    if sinks:
        with corrald(max_connections=64) as daemon:
            fixed_cost(daemon, args.repeat)
            print(f"median (range) of {args.repeat} runs, {args.mib} MiB each")
            print("| command | way in | MiB/s | best | of the pump |")
            throughput(daemon, sinks, args.mib * MIB, args.repeat)
    print(f"load {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()

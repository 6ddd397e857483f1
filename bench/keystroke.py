"""How long a keystroke takes through a job's terminal: a byte sent to the
job's pty and its echo back.

Run as root on the host (it starts a real corrald on a temporary state
directory and dev PKI, and real jobs):

    .venv/bin/python bench/keystroke.py [--keys 2000] [--gap 0.005] [--repeat 3]

Measures, `--keys` round trips each, one key every `--gap` s (as someone
types; the machine idles between keys, as it does then):

1. corral: a job started with `stdin=True, tty=True`, attached with the
   library; `Attachment.send(b"x")`, then the time until the output record
   holding the echo arrives. Two jobs: `cat` on a terminal as it comes
   (cooked: the pty's line discipline echoes the key, cat sleeps until a
   line ends), and `stty raw -echo; cat` (cat reads each key and writes it
   back, as a shell's line editor or a full-screen program does). The
   record's time (the shim's clock) splits the trip into the way in
   (client -> corrald -> shim -> pty -> echo -> shim) and the way out
   (shim -> output.log -> corrald -> client).
2. Beside them, in the same run: a plain pty + TLS echo, the floor any
   remote terminal has. A relay in another process opens a local pty with
   the same command behind it and relays bytes both ways between its
   master and a trio TLS 1.3 loopback connection; this process sends the
   key and waits for the echo, as above. No corral code.
3. The CPU time each process (its main thread) spent per key: corrald,
   the shim and the client; the relay and the client for the plain echo.

Rounds are interleaved (corral, plain, corral, ...), `--repeat` times.
With `--spinners N`, N busy loops at nice 19 keep the CPUs from idling
meanwhile: what is left is the trip without the cost of waking an idle
CPU (a VM exit on a guest that does not poll before halting).
Numbers go to docs/BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from benchlib import Daemon, corrald, percentile, shim_pid, tls_contexts

from corral.client.client import connect

KEY = b"x"
READY = b"ready"
# The jobs. A cooked terminal's line holds 4095 bytes: a round of cat's
# sends at most that many keys without a newline.
JOBS = {
    "pty echo (cat, cooked)": f"echo {READY.decode()}; exec cat",
    "cat echoes (stty raw -echo; cat)": f"stty raw -echo; echo {READY.decode()}; exec cat",
}
MAX_LINE = 4000


@dataclass
class Trips:
    """Round trips in seconds; for corral, also the way in and the way out;
    and the CPU time each process spent per key, in seconds."""

    total: list[float] = field(default_factory=list)
    way_in: list[float] = field(default_factory=list)
    way_out: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def add_cpu(self, name: str, seconds: float) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + seconds


def cpu_ns(pid: int) -> int:
    """Time `pid`'s main thread has run, in ns (schedstat: finer than ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


# -- corral -----------------------------------------------------------------------------


async def corral_trips(daemon: Daemon, script: str, keys: int, gap: float) -> Trips:
    trips = Trips()
    async with connect(daemon.address, daemon.identity) as client:
        while len(trips.total) < keys:
            # A new job per MAX_LINE keys: a cooked terminal's line is full then.
            count = min(MAX_LINE, keys - len(trips.total))
            job = await client.start(["sh", "-c", script], stdin=True, tty=True, tty_size=(80, 24))
            async with client.attach(job.id, offset=0) as attachment:
                records = aiter(attachment)
                seen = b""
                while READY not in seen or not seen.endswith(b"\n"):
                    record = await anext(records)
                    if isinstance(record.data, bytes):  # not the terminal's size
                        seen += record.data
                shim = shim_pid(daemon, job.id)
                before = cpu_ns(daemon.pid), cpu_ns(shim), time.thread_time_ns()
                for _ in range(count):
                    await trio.sleep(gap)  # the pause between keys is measured, not a sync
                    sent_ns = time.time_ns()
                    start = time.perf_counter()
                    await attachment.send(KEY)
                    record = await anext(records)
                    trips.total.append(time.perf_counter() - start)
                    trips.way_out.append((time.time_ns() - record.time_ns) / 1e9)
                    trips.way_in.append((record.time_ns - sent_ns) / 1e9)
                    assert record.data == KEY, record
                after = cpu_ns(daemon.pid), cpu_ns(shim), time.thread_time_ns()
                for name, start_ns, end_ns in zip(
                    ("corrald", "shim", "client"), before, after, strict=True
                ):
                    trips.add_cpu(name, (end_ns - start_ns) / 1e9)
            await client.stop(job.id, 0)
            await client.remove(job.id)
    return trips


# -- the plain pty + TLS echo: no corral code -----------------------------------------


async def relay(pki: Path, script: str) -> None:
    """The plain relay (its own process): `script` on a local pty, its
    master relayed to and from one TLS connection until the peer leaves."""
    context, _ = tls_contexts(pki)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    stream = trio.SSLStream(await listeners[0].accept(), context, server_side=True)
    await stream.do_handshake()
    master, slave = os.openpty()
    process = subprocess.Popen(
        ["sh", "-c", script], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    terminal = trio.lowlevel.FdStream(master)

    async def out() -> None:
        while data := await terminal.receive_some():
            await stream.send_all(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out)
            while data := await stream.receive_some():
                await terminal.send_all(data)
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        process.wait()
        await terminal.aclose()


async def plain_round(
    port: int, pki: Path, keys: int, gap: float, relay_pid: int
) -> tuple[list[float], float, float]:
    """(round trips, the relay's CPU, ours), in seconds."""
    _, context = tls_contexts(pki)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    await stream.do_handshake()
    seen = b""
    while READY not in seen or not seen.endswith(b"\n"):
        seen += await stream.receive_some()
    trips = []
    relay_before, ours_before = cpu_ns(relay_pid), time.thread_time_ns()
    for _ in range(keys):
        await trio.sleep(gap)
        start = time.perf_counter()
        await stream.send_all(KEY)
        echo = await stream.receive_some()
        trips.append(time.perf_counter() - start)
        assert echo == KEY, echo
    relay_cpu = (cpu_ns(relay_pid) - relay_before) / 1e9
    ours = (time.thread_time_ns() - ours_before) / 1e9
    await stream.aclose()
    return trips, relay_cpu, ours


def plain_trips(pki: Path, script: str, keys: int, gap: float) -> Trips:
    trips = Trips()
    while len(trips.total) < keys:
        count = min(MAX_LINE, keys - len(trips.total))
        relayer = subprocess.Popen(
            [sys.executable, __file__, "relay", str(pki), script],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert relayer.stdout is not None
            port = int(relayer.stdout.readline())
            total, relay_cpu, ours = trio.run(plain_round, port, pki, count, gap, relayer.pid)
            trips.total += total
            trips.add_cpu("relay", relay_cpu)
            trips.add_cpu("client", ours)
        finally:
            relayer.wait(60)
    return trips


# -- the report -------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def summary(rounds: list[list[float]]) -> str:
    """p50 and p99: the median of the rounds' (their best)."""
    p50s = [statistics.median(samples) for samples in rounds]
    p99s = [percentile(samples, 0.99) for samples in rounds]
    return (
        f"{ms(statistics.median(p50s))} ({ms(min(p50s))}) "
        f"| {ms(statistics.median(p99s))} ({ms(min(p99s))})"
    )


def cpu_per_key(rounds: list[Trips], keys: int) -> str:
    """Each process's CPU time per key, in µs: the median of the rounds'."""
    return ", ".join(
        f"{name} {statistics.median(trips.cpu[name] for trips in rounds) / keys * 1e6:.0f}"
        for name in rounds[0].cpu
    )


@contextmanager
def spinners(count: int) -> Iterator[None]:
    """`count` busy loops at the lowest priority, for the block's time."""
    loops = [
        subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    if sys.argv[1:2] == ["relay"]:
        trio.run(relay, Path(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2000, help="keys per round (default 2000)")
    parser.add_argument(
        "--gap", type=float, default=0.005, help="seconds between keys (default 0.005)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each (default 3)")
    parser.add_argument(
        "--spinners", type=int, default=0, help="busy loops at nice 19 meanwhile (default 0)"
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"load {Path('/proc/loadavg').read_text().strip()}")  # fmt: skip
    rows = []
    with corrald() as daemon, spinners(args.spinners):
        for name, script in JOBS.items():
            corral: list[Trips] = []
            plain: list[Trips] = []
            for _ in range(args.repeat):
                corral.append(trio.run(corral_trips, daemon, script, args.keys, args.gap))
                plain.append(plain_trips(daemon.pki, script, args.keys, args.gap))
                print(
                    f"  {name}: corral p50 {ms(statistics.median(corral[-1].total))} ms, "
                    f"plain {ms(statistics.median(plain[-1].total))} ms",
                    flush=True,
                )
            rows += [
                f"| {name}: corral | {summary([trips.total for trips in corral])} "
                f"| {cpu_per_key(corral, args.keys)} |",
                f"| ... the way in (client -> shim's record) "
                f"| {summary([trips.way_in for trips in corral])} | |",
                f"| ... the way out (shim's record -> client) "
                f"| {summary([trips.way_out for trips in corral])} | |",
                f"| {name}: plain pty + TLS echo | {summary([trips.total for trips in plain])} "
                f"| {cpu_per_key(plain, args.keys)} |",
            ]
    print(f"{args.keys} keys a round, one every {args.gap * 1e3:g} ms, {args.spinners} "
          f"spinners; median of {args.repeat} rounds (best), in ms")  # fmt: skip
    print("| round trip | p50 | p99 | CPU per key, µs |")
    print("\n".join(rows))
    print(f"load {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()

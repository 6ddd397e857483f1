"""How long a corrald takes to adopt what the last one left.

Run as root on the host (real corrald processes and jobs):

    .venv/bin/python bench/restart.py [--running 100] [--finished 100] [--rounds 3]

Starts a corrald on a temporary state directory, runs `--finished` jobs to
their end and starts `--running` jobs that sleep, SIGKILLs corrald, and
starts a new one on the same state directory. Measures, per round, the time
from the new corrald's exec to its "listening" line (the jobs are indexed
and every live shim watched again before it listens), to its first `list`
answer holding every job in the right state, and its RSS then. The last
corrald stops the running jobs as it shuts down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from corral.client.client import connect

CORRALD = [sys.executable, "-m", "corral.supervisor.main"]
PARENT = f"corral-bench-{os.getpid()}"


def launch(state: Path) -> tuple[subprocess.Popen[str], str, float]:
    """A corrald on `state`: (process, address, seconds from exec to listening)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [*CORRALD, "--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0",
         "--log-level", "warning", "--cgroup-parent", PARENT],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    ready = time.perf_counter() - start
    return process, line.split("listening on ")[1].strip(), ready


async def fill(address: str, identity: Path, running: int, finished: int) -> None:
    async with connect(address, identity) as admin:
        for _ in range(finished):
            job = await admin.start(["true"])
            await admin.wait(job.id)
        for _ in range(running):
            await admin.start(["sleep", "100000"])


async def listed(address: str, identity: Path, running: int, finished: int) -> float:
    """Seconds until corrald answers a list with every job in its state."""
    start = time.perf_counter()
    async with connect(address, identity) as admin:
        jobs = await admin.list(everyone=True)
    seconds = time.perf_counter() - start
    states = [job.state for job in jobs]
    assert states.count("running") == running, states
    assert states.count("exited") == finished, states
    return seconds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--finished", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        state = Path(directory)
        identity = state / "pki" / "clients" / "admin"
        process, address, cold = launch(state)
        try:
            trio.run(fill, address, identity, args.running, args.finished)
            print(f"{args.running} running and {args.finished} finished jobs; "
                  f"an empty corrald listens {cold * 1e3:.0f} ms after exec")  # fmt: skip
            ready, answered = [], []
            for _ in range(args.rounds):
                process.kill()  # SIGKILL: the jobs are left to the next corrald
                process.wait()
                process, address, seconds = launch(state)
                ready.append(seconds)
                answered.append(
                    seconds + trio.run(listed, address, identity, args.running, args.finished)
                )
            runs = ", ".join(f"{seconds * 1e3:.0f}" for seconds in ready)
            median = statistics.median(ready) * 1e3
            print(f"exec -> listening, jobs adopted: median {median:.0f} ms (runs: {runs})")
            print(f"exec -> a list of all {args.running + args.finished} jobs answered: "
                  f"median {statistics.median(answered) * 1e3:.0f} ms")  # fmt: skip
            print(f"corrald RSS then: {rss_mib(process.pid):.1f} MiB")
        finally:
            process.terminate()  # stops the running jobs
            process.wait(120)
            for path in Path("/sys/fs/cgroup").glob(f"*/{PARENT}"):
                path.rmdir()


if __name__ == "__main__":
    main()

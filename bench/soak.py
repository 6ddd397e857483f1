"""Soak: a long run of jobs and followers, then corrald back at its baseline.

Run as root on the host (a real corrald, real jobs):

    .venv/bin/python bench/soak.py [--jobs 1000] [--concurrent 200] [--followers 500]
                                   [--rounds 1]

Starts a corrald on a temporary state directory and notes its footprint
(tasks, fds, RSS: `info`'s `process`, as an admin sees it) and the cgroups
under its parent. Then runs `--jobs` jobs, `--concurrent` at a time, each
printing 200 numbered lines of its own in four bursts 0.2 s apart, while
`--followers` followers, each on a connection of its own, repeatedly pick a
running job, follow it from byte 0 to its end, check every byte, and
disconnect. Then it reports corrald's event-loop lag (all of it, and the
part not spent waiting for a CPU) and CPU time. Afterwards it
checks every job's status (exited 0) and output (exactly its lines),
removes the jobs, and compares corrald's footprint and the cgroup tree with
the baseline, after each of `--rounds` rounds on the same corrald (memory
that stays level from round to round is the allocator's high-water mark,
memory that grows is a leak). Exits 1 if anything was wrong.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from corral.client.client import Client, connect
from corral.client.errors import ConnectError

CORRALD = [sys.executable, "-m", "corral.supervisor.main"]
PARENT = f"corral-bench-{os.getpid()}"
LINES = 200
SCRIPT = (
    'n=0; while [ $n -lt 200 ]; do n=$((n+1)); echo "$1 $n"; '
    "[ $((n % 50)) -eq 0 ] && sleep 0.2; done; true"
)
CONTROL_CONNECTIONS = 8  # for starts and waits: 25 waits each at 200 running


def expected(index: int) -> bytes:
    return b"".join(f"{index} {n}\n".encode() for n in range(1, LINES + 1))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cgroups() -> int:
    """Cgroups under corrald's parent (by name: on v1 each is in every hierarchy)."""
    return len(
        {p.name for parent in Path("/sys/fs/cgroup").glob(f"*/{PARENT}") for p in parent.iterdir()
         if p.is_dir()}
    )  # fmt: skip


async def output(client: Client, job_id: str, *, follow: bool) -> bytes:
    """A job's output (stdout and stderr together), to its end if `follow`."""
    async with client.logs(job_id, follow=follow) as stream:
        return b"".join([record.data async for record in stream if isinstance(record.data, bytes)])


@dataclass
class Soak:
    jobs: int
    concurrent: int
    followers: int
    running: dict[str, int] = field(default_factory=dict)  # job id -> index
    indexes: dict[str, int] = field(default_factory=dict)
    finished: int = 0
    follows: int = 0
    connects: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


async def settled(address: str, identity: Path) -> tuple[dict[str, Any], int]:
    """corrald at rest: the sandbox for the next start built ahead (one cgroup),
    no transient task. Waits up to 10 s for two equal readings."""
    last: tuple[dict[str, Any], int] | None = None
    for _ in range(100):
        reading = await footprint(address, identity), cgroups()
        key = (reading[0]["tasks"], reading[0]["fds"], reading[1])
        if last is not None and key == (last[0]["tasks"], last[0]["fds"], last[1]) and reading[1]:
            return reading
        last = reading
        await trio.sleep(0.1)
    assert last is not None
    return last


async def footprint(address: str, identity: Path) -> dict[str, Any]:
    async with connect(address, identity) as admin:
        info = (await admin.info()).raw
    process: dict[str, Any] = info["process"]
    return {**process, "lag": info["loop_lag"]}


async def run_jobs(soak: Soak, clients: list[Client]) -> None:
    slots = trio.Semaphore(soak.concurrent)

    async def one(index: int, client: Client) -> None:
        job_id = ""
        try:
            job = await client.start(["sh", "-c", SCRIPT, "sh", str(index)])
            job_id = job.id
            soak.indexes[job_id] = index
            soak.running[job_id] = index
            final = await client.wait(job_id)
            if (final.state, final.exit_code) != ("exited", 0):
                soak.errors.append(f"job {index}: {final.state} {final.reason}")
        except Exception as exc:
            soak.errors.append(f"job {index}: {exc!r}")
        finally:
            soak.running.pop(job_id, None)
            soak.finished += 1
            slots.release()

    async with trio.open_nursery() as nursery:
        for index in range(soak.jobs):
            await slots.acquire()
            nursery.start_soon(one, index, clients[index % len(clients)])
    soak.done.set()


async def follower(soak: Soak, address: str, identity: Path) -> None:
    while not soak.done.is_set():
        if not soak.running:
            await trio.sleep(0.01)
            continue
        job_id, index = random.choice(list(soak.running.items()))
        try:
            async with connect(address, identity) as client:
                soak.connects += 1
                data = await output(client, job_id, follow=True)
            if data != expected(index):
                soak.errors.append(f"follower of job {index}: {len(data)} bytes, not as written")
            soak.follows += 1
        except ConnectError:
            # Over corrald's cap on TLS handshakes at once (many followers
            # connect together): closed at accept, as a client should expect.
            soak.refused += 1
            await trio.sleep(random.random() * 0.1)
        except Exception as exc:
            soak.errors.append(f"follower of job {index}: {exc!r}")


async def check_and_clean(soak: Soak, admin: Client) -> None:
    jobs = await admin.list(everyone=True)
    if len(jobs) != soak.jobs:
        soak.errors.append(f"{len(jobs)} jobs listed, not {soak.jobs}")
    for job in jobs:
        index = soak.indexes.get(job.id)
        if index is None or (job.state, job.exit_code) != ("exited", 0):
            soak.errors.append(f"job {job.id}: {job.state} {job.reason}")
            continue
        data = await output(admin, job.id, follow=False)
        if data != expected(index):
            soak.errors.append(f"job {index}: output not as written")
        await admin.remove(job.id)


async def soak_run(args: argparse.Namespace, address: str, identity: Path, pid: int) -> int:
    baseline, base_cgroups = await settled(address, identity)
    errors = 0
    for round_number in range(1, args.rounds + 1):
        errors += await soak_round(args, address, identity, pid, round_number)
        after, after_cgroups = await settled(address, identity)
        for key in ("tasks", "fds"):
            print(f"  {key}: {baseline[key]} before, {after[key]} after")
        print(f"  RSS: {baseline['rss_bytes'] / 2**20:.1f} MiB before, "
              f"{after['rss_bytes'] / 2**20:.1f} MiB after")  # fmt: skip
        print(f"  cgroups under the parent: {base_cgroups} before, {after_cgroups} after")
        if (after["tasks"], after["fds"], after_cgroups) != (
            baseline["tasks"],
            baseline["fds"],
            base_cgroups,
        ):
            print("ERROR: corrald did not return to its baseline")
            errors += 1
    print(f"{errors} errors")
    return 1 if errors else 0


async def soak_round(
    args: argparse.Namespace, address: str, identity: Path, pid: int, round_number: int
) -> int:
    """One round of the soak; the number of errors."""
    cpu_before = cpu_seconds(pid)
    lag_before = (await footprint(address, identity))["lag"]
    soak = Soak(args.jobs, args.concurrent, args.followers)
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        clients = [
            await nursery.start(_connected, address, identity) for _ in range(CONTROL_CONNECTIONS)
        ]
        async with trio.open_nursery() as work:
            for _ in range(soak.followers):
                work.start_soon(follower, soak, address, identity)
            await run_jobs(soak, clients)
        elapsed = time.perf_counter() - began
        await check_and_clean(soak, clients[0])
        nursery.cancel_scope.cancel()
    lag = (await footprint(address, identity))["lag"]
    print(f"round {round_number}: {soak.jobs} jobs ({soak.concurrent} at once) in {elapsed:.1f} s; "
          f"{soak.followers} followers made {soak.follows} follows on {soak.connects} connections "
          f"({soak.refused} connects refused at the handshake cap and retried)")  # fmt: skip
    beats = lag["beats"] - lag_before["beats"]
    print(f"  event-loop lag: max {lag['max_recent_ms']:.1f} ms, "
          f"{lag['late'] - lag_before['late']} of {beats} wake-ups later than 50 ms; "
          f"not counting time waiting for a CPU: max {lag['max_own_ms']:.1f} ms (since start), "
          f"{lag['late_own'] - lag_before['late_own']} later than 50 ms")  # fmt: skip
    print(f"  corrald CPU: {cpu_seconds(pid) - cpu_before:.1f} s")
    for error in soak.errors[:20]:
        print(f"ERROR: {error}")
    return len(soak.errors)


async def _connected(
    address: str, identity: Path, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED
) -> None:
    async with connect(address, identity) as client:
        task_status.started(client)
        await trio.sleep_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--followers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1, help="soak rounds on one corrald")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        state = Path(directory)
        process = subprocess.Popen(
            [*CORRALD, "--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0",
             "--log-level", "warning", "--cgroup-parent", PARENT,
             "--max-connections-per-user", str(args.followers + 100)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        address = process.stdout.readline().split("listening on ")[1].strip()
        try:
            admin = state / "pki" / "clients" / "admin"
            status = trio.run(soak_run, args, address, admin, process.pid)
        finally:
            process.terminate()
            process.wait(120)
            for path in Path("/sys/fs/cgroup").glob(f"*/{PARENT}"):
                path.rmdir()
    sys.exit(status)


if __name__ == "__main__":
    main()

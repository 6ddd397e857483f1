"""What a CPU limit and a memory limit do to a job.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/limits.py

First, the same busy loop runs twice side by side for two seconds of wall
time: once limited to a quarter of a core, once without a limit; their CPU
usage shows the throttling. Then a job limited to 64 MiB of memory tries
to allocate 256 MiB and is killed by the kernel's OOM killer.
"""

from __future__ import annotations

import contextlib
import os
import sys

import trio

from corral.client.client import Client, connect
from corral.client.errors import CorralError
from corral.client.jobs import JobInfo
from corral.client.script import run_script

SPIN_SECONDS = 2.0
# Busy until the wall clock says so: a throttled loop runs as long, and
# simply gets less CPU in that time.
SPIN = f"""
import time
end = time.monotonic() + {SPIN_SECONDS}
while time.monotonic() < end:
    pass
"""
CPU_LIMIT = 0.25  # cores
# What "about a quarter of a core" means here: the loop's first moments
# and a busy host may cost some, one 100 ms period more is the most gained.
EXPECTED_CORES = (0.15, 0.30)
MEMORY_LIMIT = 64 << 20  # bytes
ALLOCATE = "x = bytearray(256 << 20)"  # and fill it with zeros: 256 MiB touched
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def wall_seconds(job: JobInfo) -> float:
    """Wall time from an ended job's start to its end."""
    if job.started_at is None or job.finished_at is None:
        raise ValueError(f"job {job.short_id} has not ended")
    return (job.finished_at - job.started_at) / 1e9


async def clean_up(client: Client, job_ids: list[str]) -> None:
    """Stop what still runs and remove every job, even when the script failed."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        for job_id in job_ids:
            with contextlib.suppress(CorralError):  # failed_precondition: it has ended
                await client.stop(job_id, grace=0)
            with contextlib.suppress(CorralError):
                await client.remove(job_id)


async def cpu_limit(client: Client, jobs: list[str]) -> bool:
    """Show the CPU limit at work; return whether it held."""
    print(f"1. CPU: the same busy loop for {SPIN_SECONDS:g} s, with and without a limit")
    limited = await client.start(["python3", "-c", SPIN], limits={"cpu": CPU_LIMIT})
    jobs.append(limited.id)
    free = await client.start(["python3", "-c", SPIN])
    jobs.append(free.id)

    await trio.sleep(SPIN_SECONDS / 2)
    # status() of a running job reads its cgroup's counters at that moment.
    now = await client.status(limited.id)
    print(
        f"   after {SPIN_SECONDS / 2:g} s the limited job has used "
        f"{now.usage['cpu_seconds']:.2f} s of CPU"
    )

    cores: dict[str, float] = {}
    for job, label in ((limited, f"limits={{'cpu': {CPU_LIMIT}}}"), (free, "no limit")):
        await client.wait(job.id)
        final = await client.status(job.id)  # the usage recorded at the end
        used = final.usage["cpu_seconds"]
        wall = wall_seconds(final)
        cores[job.id] = used / wall
        print(
            f"   {label:<18} ran {wall:.2f} s and used {used:.2f} s of CPU: {used / wall:.2f} cores"
        )
    print(
        f"   The limit is a quota: in every 100 ms period the kernel lets the job's\n"
        f"   cgroup run {CPU_LIMIT * 100:g} ms, then throttles it (pauses every process in it)\n"
        f"   until the next period. The loop still runs {SPIN_SECONDS:g} s, getting "
        f"{CPU_LIMIT:g} of a core:\n"
        f"   cpu_seconds is about {CPU_LIMIT:g} x wall time. Without a limit it gets a whole\n"
        f"   core, if the host has one free."
    )
    low, high = EXPECTED_CORES
    if not low <= cores[limited.id] <= high:
        print(f"   NOT AS EXPECTED: {cores[limited.id]:.2f} cores, not {low:g} to {high:g}")
        return False
    return True


async def memory_limit(client: Client, jobs: list[str]) -> bool:
    """Show an OOM kill; return whether it happened as explained."""
    print(f"2. memory: a job limited to {mib(MEMORY_LIMIT)} runs python3 -c '{ALLOCATE}'")
    job = await client.start(["python3", "-c", ALLOCATE], limits={"memory": MEMORY_LIMIT})
    jobs.append(job.id)
    await client.wait(job.id)
    final = await client.status(job.id)
    print(
        f"   state: {final.state}  exit_code: {final.exit_code}  signal: {final.signal}  "
        f"oom_killed: {final.oom_killed}"
    )
    print(f"   reason: {final.reason}")
    print(f"   peak memory: {mib(final.usage['memory_peak_bytes'])}")
    print(
        "   The job's cgroup may not hold more than its limit (and gets no swap). When\n"
        "   the kernel can reclaim nothing more, its OOM killer kills a process of the\n"
        "   cgroup with SIGKILL, which no program can catch. corral reads oom_killed\n"
        "   from the cgroup's own OOM kill counter, never guesses it from SIGKILL alone.\n"
        "   The state is 'exited' because the job ended without anyone stopping it."
    )
    if not (final.oom_killed and final.signal == "SIGKILL"):
        print("   NOT AS EXPECTED: the job was not killed by the OOM killer")
        return False
    return True


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        async with connect(address, identity) as client:
            jobs: list[str] = []
            try:
                held = [await cpu_limit(client, jobs), await memory_limit(client, jobs)]
            finally:
                await clean_up(client, jobs)
    except CorralError as exc:  # every failure is one clear line
        print(f"limits.py: {exc}", file=sys.stderr)
        return exc.exit_status
    if not all(held):
        print("limits.py: a limit did not work as explained", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

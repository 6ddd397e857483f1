"""What the syscall filter costs: start latency, and a syscall-heavy job's run time.

Run as root on the host:

    .venv/bin/python bench/seccomp_cost.py [--jobs 20] [--starts 100]

With the worker library (what corrald runs), in one run, alternating
filtered (`seccomp="default"`) and unfiltered (`"unconfined"`) jobs so
that both see the same host:

1. request -> running for /bin/true, p50/p99 over --starts jobs each;
2. the run time (the job's own started -> finished) of a syscall-heavy
   job, `find /usr -type f | wc -l` (a stat or a getdents64 per file,
   through the filter each), median over --jobs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from corral.job import SECCOMP_DEFAULT, SECCOMP_UNCONFINED, JobSpec
from corral.shim.cgroup import detect_flavour
from corral.worker.cgroup_parent import remove_if_empty
from corral.worker.manager import JobManager, open_job_manager

PARENT = "corral-bench-seccomp"
HEAVY = ["sh", "-c", "find /usr -type f | wc -l"]
MODES = (SECCOMP_DEFAULT, SECCOMP_UNCONFINED)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def start_latency(jobs: JobManager, count: int) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(count):
        for mode in MODES:
            began = time.perf_counter()
            job = await jobs.start(JobSpec(argv=["/bin/true"], seccomp=mode))
            seen[mode].append((time.perf_counter() - began) * 1000)
            await jobs.wait(job.id)
            await jobs.remove(job.id)
    return seen


async def run_times(jobs: JobManager, count: int) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(count):
        for mode in MODES:
            job = await jobs.start(JobSpec(argv=HEAVY, seccomp=mode))
            status = await jobs.wait(job.id)
            assert status.exit_code == 0, status.reason
            assert status.started_at is not None
            assert status.finished_at is not None
            seen[mode].append((status.finished_at - status.started_at) / 1e6)
            await jobs.remove(job.id)
    return seen


async def main(jobs_count: int, starts: int) -> None:
    print(f"python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as state:
        async with open_job_manager(Path(state), cgroup_parent=PARENT) as jobs:
            latency = await start_latency(jobs, starts)
            for mode, values in latency.items():
                print(
                    f"start, seccomp {mode:10} ({starts}): running p50 "
                    f"{statistics.median(values):6.2f} ms  p99 {percentile(values, 0.99):6.2f} ms"
                )
            runs = await run_times(jobs, jobs_count)
            for mode, values in runs.items():
                print(
                    f"{' '.join(HEAVY[2:])!r}, seccomp {mode:10} ({jobs_count}): run time "
                    f"median {statistics.median(values):7.1f} ms"
                )
            cost = statistics.median(runs[SECCOMP_DEFAULT]) / statistics.median(
                runs[SECCOMP_UNCONFINED]
            )
            print(f"the filter's cost on that job: {100 * (cost - 1):+.1f} %")
    remove_if_empty(detect_flavour(), PARENT, Path("/sys/fs/cgroup"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--starts", type=int, default=100)
    options = parser.parse_args()
    trio.run(main, options.jobs, options.starts)

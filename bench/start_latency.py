"""How fast a job starts, and what a running job costs.

Run as root on the host:

    .venv/bin/python bench/start_latency.py [--jobs 200]

Measures, with the worker library (what corrald runs):

1. request -> running (start() returns once the command has exec'd) and
   request -> exit, for /bin/true, p50/p99 over N jobs started back to back
   and again with 200 ms gaps (cgroup v1 joins are slower after a pause),
   with a warm sandbox (the default) and cold (`warm=0`);
2. the same command under `unshare --pid --fork --mount --mount-proc --net
   --uts --ipc`, that with `--user --map-root-user` added (the fair pair
   for corral, whose every job has a user namespace of its own),
   `bwrap --unshare-all` and `runc run` (a bundle holding /bin/true and
   its libraries) where installed, spawn to exit;
3. the private memory (USS) of a shim and of an init, the same for the
   idle warm sandbox, and this process's RSS (what corrald would hold)
   with N jobs running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from corral.job import JobSpec
from corral.shim.cgroup import detect_flavour
from corral.worker.cgroup_parent import remove_if_empty
from corral.worker.manager import JobManager, open_job_manager

PARENT = f"corral-bench-{os.getpid()}"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {p50 * 1e3:6.2f} ms   p99 {p99 * 1e3:6.2f} ms"


def private_kib(pid: int) -> int:
    """USS: the pages only this process holds."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def corral_latency(
    jobs: JobManager, count: int, gap: float
) -> tuple[list[float], list[float]]:
    running, finished = [], []
    for _ in range(count):
        if gap:
            await trio.sleep(gap)  # the idle gap is what is measured, not a synchronisation
        start = time.perf_counter()
        job = await jobs.start(JobSpec(argv=["/bin/true"]))
        running.append(time.perf_counter() - start)
        await jobs.wait(job.id)
        finished.append(time.perf_counter() - start)
        await jobs.remove(job.id)
    return running, finished


def command_latency(argv: list[str], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return samples


async def memory(jobs: JobManager, count: int) -> None:
    before = rss_kib(os.getpid())
    started = [await jobs.start(JobSpec(argv=["sleep", "1000"])) for _ in range(count)]
    shim_uss, init_uss = [], []
    for job in started[:20]:
        status = job.status
        assert status.shim_pid
        assert status.pid
        shim_uss.append(private_kib(status.shim_pid))
        init_uss.append(private_kib(status.pid))
    after = rss_kib(os.getpid())
    async with trio.open_nursery() as nursery:
        for job in started:
            nursery.start_soon(jobs.stop, job.id, 0)
    shim, init = statistics.median(shim_uss) / 1024, statistics.median(init_uss) / 1024
    print(f"shim USS    {shim:5.2f} MiB (median of 20)")
    print(f"init USS    {init:5.2f} MiB (median of 20)")
    print(f"shim+init   {shim + init:5.2f} MiB per job")
    idle, busy = before / 1024, after / 1024
    print(f"manager RSS {idle:.1f} MiB idle, {busy:.1f} MiB with {count} jobs running")


async def latency(jobs: JobManager, name: str, count: int) -> None:
    await corral_latency(jobs, 10, 0)  # warm up
    running, finished = await corral_latency(jobs, count, 0)
    print(f"{name}, back to back ({count}):".ljust(34) + f"running {percentiles(running)}")
    print(f"{'':34}exited  {percentiles(finished)}")
    running, finished = await corral_latency(jobs, count, 0.2)
    print(f"{name}, 200 ms apart ({count}):".ljust(34) + f"running {percentiles(running)}")
    print(f"{'':34}exited  {percentiles(finished)}")


def warm_sandbox_uss() -> None:
    """The idle warm sandbox's shim and init (named corral-shim/corral-init,
    children of this run's spawner, with no job yet)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if (
                comm == "corral-spawner"
                and int((proc / "stat").read_text().split()[3]) == os.getpid()
            ):
                spawner = int(proc.name)
                break
        except OSError:
            continue
    else:
        return
    children = Path(f"/proc/{spawner}/task/{spawner}/children").read_text().split()
    for shim in children:
        inits = Path(f"/proc/{shim}/task/{shim}/children").read_text().split()
        total = private_kib(int(shim)) + sum(private_kib(int(pid)) for pid in inits)
        print(f"warm sandbox: shim + init USS {total / 1024:5.2f} MiB")


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as state:
        async with open_job_manager(Path(state), cgroup_parent=PARENT) as jobs:
            await latency(jobs, "corral", count)
            await memory(jobs, count)
            await trio.sleep(0.5)  # let the next sandbox be built: its size is measured
            warm_sandbox_uss()
        async with open_job_manager(Path(state), cgroup_parent=PARENT, warm=0) as jobs:
            await latency(jobs, "corral cold", count)
    remove_if_empty(detect_flavour(), PARENT, Path("/sys/fs/cgroup"))  # its slices, then it


def runc_bundle(directory: Path) -> Path:
    """A runc bundle whose rootfs holds /bin/true and the libraries it needs."""
    rootfs = directory / "rootfs"
    needed = ["/bin/true"]
    ldd = subprocess.run(["ldd", "/bin/true"], capture_output=True, text=True, check=True)
    needed += [word for word in ldd.stdout.split() if word.startswith("/")]
    for path in needed:
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    subprocess.run(["runc", "spec"], cwd=directory, check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["args"] = ["/bin/true"]
    config["process"]["terminal"] = False
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def others(count: int) -> None:
    unshare = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--net", "--uts", "--ipc"]
    bwrap = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    with tempfile.TemporaryDirectory(prefix="corral-bench-runc-") as directory:
        candidates: list[tuple[str, list[str]]] = [
            ("unshare(1)", [*unshare, "/bin/true"]),
            # The fair pair for corral's jobs, each in a user namespace of its own.
            (
                "unshare(1) --user --map-root-user",
                [*unshare, "--user", "--map-root-user", "/bin/true"],
            ),
            ("bwrap --unshare-all", [*bwrap, "/bin/true"]),
        ]
        if shutil.which("runc") is not None:
            bundle = runc_bundle(Path(directory))
            candidates.append(("runc run", ["runc", "run", "--bundle", str(bundle), PARENT]))
        else:
            print(f"{'runc run':42}not installed")
        for name, argv in candidates:
            if shutil.which(argv[0]) is None:
                print(f"{name:42}not installed")
                continue
            command_latency(argv, 10)
            samples = command_latency(argv, count)
            print(f"{name + f' ({count})':42}exited  {percentiles(samples)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("start_latency.py needs root (namespaces and cgroups)")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    trio.run(main, options.jobs)
    others(options.jobs)

"""What finished jobs with large argv and env cost corrald in memory.

Run as root on the host (a real corrald, real jobs):

    .venv/bin/python bench/finished_memory.py [--jobs 1000] [--arg-bytes 1024]
                                              [--argv-kib 240] [--env-kib 240]
                                              [--concurrent 8]

Starts a corrald (benchlib's) and notes its RSS once it has served one
job (the code paths warmed). Then runs `--jobs` jobs (`true`), `--concurrent`
at a time, each with `--argv-kib` KiB of argv and `--env-kib` KiB of env in
arguments and variables of `--arg-bytes` bytes each (the spec's caps are
256 KiB of each), and waits for every one to end. It reads corrald's RSS
with them all finished, checks that `status` of one still shows its whole
argv, lists them all (one `list`, every page), removes them all, and reads
the RSS once more. RSS that stays up after the removal, with the jobs
gone from the index, is the allocator's (memory freed inside corrald that
glibc does not hand back), not objects kept. Last, in this process, it
traces what `--jobs` finished jobs of the same shape hold in an index.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import trio
from benchlib import corrald, rss_kib

from corral.client.client import Client, connect
from corral.job import JobSpec, State, Status, new_job_id
from corral.worker.index import Job


def typed_env(env: dict[str, str]) -> dict[str | bytes, str | bytes]:
    """`env` as JobSpec takes it (names and values, str or bytes)."""
    return {name: value for name, value in env.items()}


def spec(
    index: int, argv_bytes: int, env_bytes: int, arg_bytes: int
) -> tuple[list[str], dict[str, str]]:
    """`true` with ~argv_bytes of arguments and ~env_bytes of variables,
    each piece `arg_bytes` long (the job's index in it: no two alike)."""
    piece = max(16, arg_bytes)
    filler = "x" * piece
    argv = ["true"] + [f"{index}-{n}-{filler}"[:piece] for n in range(argv_bytes // (piece + 1))]
    env = {f"V{n}": f"{index}-{filler}"[: piece - 8] for n in range(env_bytes // (piece + 1))}
    return argv, env


async def run_jobs(admin: Client, args: argparse.Namespace) -> list[str]:
    """Run the jobs to their ends, `--concurrent` at a time; their ids."""
    ids = [""] * args.jobs
    limiter = trio.Semaphore(args.concurrent)

    async def one(index: int) -> None:
        argv, env = spec(index, args.argv_kib << 10, args.env_kib << 10, args.arg_bytes)
        async with limiter:
            job = await admin.start(argv, env=env)
            ended = await admin.wait(job.id)
        assert ended.exit_code == 0, ended.reason
        ids[index] = job.id

    async with trio.open_nursery() as nursery:
        for index in range(args.jobs):
            nursery.start_soon(one, index)
    return ids


def kept_per_job(args: argparse.Namespace) -> float:
    """Bytes of Python objects a finished job of this shape keeps in the
    manager's index (its `Job` after `record_end`), traced: what RSS holds
    beyond this is the allocator's."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept: list[Job] = []
    for index in range(args.jobs):
        argv, env = spec(index, args.argv_kib << 10, args.env_kib << 10, args.arg_bytes)
        resolved = replace(
            JobSpec(argv=argv, env=typed_env(env), owner="alice").validate(),
            id=new_job_id(),
            created_at=time.time_ns(),
        )
        ended = Status(state=State.EXITED, reason="exited with code 0", exit_code=0,
                       started_at=time.time_ns(), finished_at=time.time_ns())  # fmt: skip
        job = Job(resolved, ended, Path("/var/lib/corral/jobs") / resolved.id)
        job.record_end(100_000)
        kept.append(job)
    del argv, env, resolved, job
    per_job = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    tracemalloc.stop()
    return per_job


async def bench(args: argparse.Namespace) -> None:
    with corrald() as daemon:
        async with connect(daemon.address, daemon.identity) as admin:
            warm = await admin.start(["true"])
            await admin.wait(warm.id)
            await admin.remove(warm.id)
            idle = rss_kib(daemon.pid)
            ids = await run_jobs(admin, args)
            finished = rss_kib(daemon.pid)
            one = await admin.status(ids[0])
            argv, _ = spec(0, args.argv_kib << 10, args.env_kib << 10, args.arg_bytes)
            whole = [arg.encode() for arg in argv]
            listed = await admin.list()
            cut = sum(1 for job in listed if job.raw.get("argv_cut"))
            listed_rss = rss_kib(daemon.pid)
            for job_id in ids:
                await admin.remove(job_id)
            removed = rss_kib(daemon.pid)
            left = len(await admin.list())
    argv_kib = sum(len(arg) + 1 for arg in whole) / 1024
    print(
        f"{args.jobs} jobs, each ~{argv_kib:.0f} KiB of argv in {len(whole)} arguments "
        f"and ~{args.env_kib} KiB of env"
    )
    print(f"status of one shows its whole argv: {one.argv == whole}")
    print(f"list: {len(listed)} jobs, {cut} of them with their argv cut")
    print(f"corrald RSS idle (after one job):        {idle / 1024:7.1f} MiB")
    print(f"corrald RSS with them all finished:      {finished / 1024:7.1f} MiB "
          f"({(finished - idle) / args.jobs:.1f} KiB per job)")  # fmt: skip
    print(f"corrald RSS after listing them all:      {listed_rss / 1024:7.1f} MiB")
    print(f"corrald RSS after removing them all:     {removed / 1024:7.1f} MiB ({left} jobs left)")
    print(f"a finished job's objects in the index:   {kept_per_job(args) / 1024:7.1f} KiB (traced)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--arg-bytes", type=int, default=1024)
    parser.add_argument("--argv-kib", type=int, default=240)
    parser.add_argument("--env-kib", type=int, default=240)
    parser.add_argument("--concurrent", type=int, default=8)
    trio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()

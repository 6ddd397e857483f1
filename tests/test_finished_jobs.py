"""What corrald keeps of a finished job: a compact spec in memory (no env,
a bounded argv), the whole spec on disk, and the whole argv in the replies
about that one job."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
from corral.job import JobSpec
from corral.store import read_spec
from corral.supervisor.server import Server
from corral.worker.index import KEPT_ARGS, KEPT_ARGV_BYTES, cut_argv
from corral.worker.manager import JobManager, open_job_manager

from .conftest import TEST_CGROUP_PARENT, identity, make_server

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

# ~100 KiB of argv and of env: far beyond what a finished job keeps.
BIG_ARGV = [b"true"] + [b"%d-" % n + b"x" * 1000 for n in range(100)]
BIG_ENV = {f"V{n}": "y" * 1000 for n in range(100)}


def argv_bytes(argv: list[bytes] | tuple[bytes, ...]) -> int:
    return sum(len(arg) + 1 for arg in argv)


@asynccontextmanager
async def serving(
    state: Path, pki_dir: Path, directory: Path
) -> AsyncIterator[tuple[JobManager, Client]]:
    """A manager on `state` served by an in-process corrald, and alice on it."""
    async with (
        open_job_manager(state, cgroup_parent=TEST_CGROUP_PARENT, warm=0) as jobs,
        trio.open_nursery() as nursery,
    ):
        server: Server = make_server(pki_dir, directory)
        server.serve_jobs(jobs)
        addresses = await nursery.start(server.serve)
        try:
            async with connect(addresses[0], identity(pki_dir, "alice")) as alice:
                yield jobs, alice
        finally:
            server.shutdown()


def test_an_argv_is_cut_to_its_first_bytes_and_arguments() -> None:
    whole = (b"a" * 5000,)
    assert cut_argv(whole) == ((b"a" * (KEPT_ARGV_BYTES - 1),), 5001 - KEPT_ARGV_BYTES)
    many = (b"true", *[b"ab"] * 1000)
    kept, left_out = cut_argv(many)
    assert kept == many[:KEPT_ARGS]
    assert left_out == argv_bytes(many) - argv_bytes(kept)
    assert cut_argv((b"true", b"small")) == ((b"true", b"small"), 0)


async def test_a_finished_job_keeps_a_compact_spec_and_its_replies_the_whole_argv(
    tmp_path: Path, pki_dir: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    async with serving(state, pki_dir, short_dir) as (jobs, alice):
        started = await alice.start(BIG_ARGV, env=BIG_ENV, cwd="/tmp")
        assert started.argv == BIG_ARGV
        assert (await alice.wait(started.id)).argv == BIG_ARGV
        small = await alice.start(["true", "small"])
        await alice.wait(small.id)

        # In memory: no env, no cwd, at most KEPT_ARGV_BYTES of argv.
        kept = jobs.resolve(started.id)
        assert (kept.spec.env, kept.spec.cwd) == ({}, b"")
        assert argv_bytes(kept.spec.argv) <= KEPT_ARGV_BYTES
        assert kept.argv_cut == argv_bytes(BIG_ARGV) - argv_bytes(kept.spec.argv)
        assert kept.spec.argv[:-1] == tuple(BIG_ARGV[: len(kept.spec.argv) - 1])
        # On disk: all of it.
        on_disk = read_spec(kept.directory)
        assert (list(on_disk.argv), on_disk.env[b"V0"], on_disk.cwd) == (
            BIG_ARGV,
            b"y" * 1000,
            b"/tmp",
        )

        # The replies about the job carry its whole argv; `list` the part
        # kept, saying how much was left out.
        assert (await alice.status(started.id)).argv == BIG_ARGV
        assert (await alice.stop(started.id)).argv == BIG_ARGV  # it had ended already
        listed = {job.id: job for job in await alice.list()}
        assert listed[started.id].argv == list(kept.spec.argv)
        assert listed[started.id].raw["argv_cut"] == kept.argv_cut
        assert listed[small.id].argv == [b"true", b"small"]
        assert "argv_cut" not in listed[small.id].raw

    # A restarted corrald finds it finished, and keeps it compact too.
    async with serving(state, pki_dir, short_dir) as (jobs, alice):
        found = jobs.resolve(started.id)
        assert (found.spec.env, found.spec.argv) == ({}, kept.spec.argv)
        assert found.argv_cut == kept.argv_cut
        assert (await alice.status(started.id)).argv == BIG_ARGV


async def test_a_running_job_keeps_its_whole_spec(tmp_path: Path) -> None:
    async with open_job_manager(
        tmp_path / "state", cgroup_parent=TEST_CGROUP_PARENT, warm=0
    ) as jobs:
        argv = [b"sh", b"-c", b"exec sleep 1000", *BIG_ARGV]
        env: dict[str | bytes, str | bytes] = {k: v for k, v in BIG_ENV.items()}
        job = await jobs.start(JobSpec(argv=argv, env=env, owner="alice"))
        try:
            assert job.spec.argv == tuple(argv)
            assert job.spec.env[b"V99"] == b"y" * 1000
            assert job.argv_cut == 0
        finally:
            await jobs.stop(job.id, grace=0)
        assert job.argv_cut > 0

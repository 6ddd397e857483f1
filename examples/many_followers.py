"""Many readers of one job's output, each joining at a different moment,
all get exactly the same bytes.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/many_followers.py

It starts a job that writes 4 MiB of random bytes to stdout (and a line to
stderr after each MiB) over about a second. Twenty followers join one
after another, the first as the job starts, others while it writes, the
last ones after it has ended; each has its own connection and hashes the
raw bytes of the job's output log it receives. Every digest must be
the same: a follower always starts from the first byte, however late it
joins. Exits 1 if they differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import dataclass

import trio

from corral.client.client import Client, connect
from corral.client.errors import CorralError
from corral.client.script import run_script
from corral.records import STREAM_STDERR, STREAM_STDOUT, RecordDecoder

MIB = 1 << 20
CHUNKS = 4  # MiB of random bytes the job writes, one every JOB_PAUSE
JOB_PAUSE = 0.25  # seconds
SCRIPT = f"""
for i in $(seq {CHUNKS}); do
    head -c {MIB} /dev/urandom
    echo "wrote MiB $i" >&2
    sleep {JOB_PAUSE}
done
"""
FOLLOWERS = 20
# Followers join this far apart: the last ones join after the job has ended.
JOIN_EVERY = 0.08  # seconds
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


@dataclass
class Received:
    """What one follower got."""

    joined_at: float  # seconds after the job was created
    log_bytes: int  # raw bytes of output.log
    sha256: str
    stdout_bytes: int  # what the job wrote, decoded from the log's records
    stderr_lines: int


async def follow(address: str, identity: str, job_id: str) -> tuple[int, str, int, int]:
    """Read the job's output to its end on a connection of our own; return
    the raw byte count, its SHA-256, and what the records held."""
    digest = hashlib.sha256()
    decoder = RecordDecoder()
    stdout_bytes = stderr_lines = 0
    async with (
        connect(address, identity) as client,
        client.logs(job_id, follow=True) as stream,
    ):
        # chunks(): the bytes of output.log as they lie in the file, with no
        # decoding; the same job gives every reader the same bytes.
        async for chunk in stream.chunks():
            digest.update(chunk.data)
            # Decoding is only to show what those bytes hold.
            for record in decoder.feed(chunk.data):
                if record.stream == STREAM_STDOUT and isinstance(record.data, bytes):
                    stdout_bytes += len(record.data)
                elif record.stream == STREAM_STDERR and isinstance(record.data, bytes):
                    stderr_lines += record.data.count(b"\n")
    return stream.offset, digest.hexdigest(), stdout_bytes, stderr_lines


async def clean_up(client: Client, job_id: str) -> None:
    """Stop the job if it still runs and remove it, even when the script failed."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        with contextlib.suppress(CorralError):  # failed_precondition: it has ended
            await client.stop(job_id, grace=0)
        with contextlib.suppress(CorralError):
            await client.remove(job_id)


async def many_followers(client: Client, address: str, identity: str) -> int:
    job = await client.start(["sh", "-c", SCRIPT])
    started = trio.current_time()
    print(f"started job {job.short_id}: {CHUNKS} MiB of random bytes over about a second")
    # Times are the host's clock (the same as corrald's with `make run`),
    # from the job's creation, to compare with when the job ended.
    created = job.created_at or time.time_ns()
    received: dict[int, Received] = {}
    failed: dict[str, CorralError] = {}
    try:

        async def join_later(number: int) -> None:
            await trio.sleep_until(started + number * JOIN_EVERY)
            joined_at = (time.time_ns() - created) / 1e9
            # A task keeps its error to itself: raised, it would cancel the
            # others and reach us wrapped in an ExceptionGroup.
            try:
                result = await follow(address, identity, job.id)
            except CorralError as exc:
                failed[f"follower {number}"] = exc
            else:
                received[number] = Received(joined_at, *result)

        # Each follower is a task with a connection of its own; the nursery
        # waits for all of them.
        async with trio.open_nursery() as nursery:
            for number in range(FOLLOWERS):
                nursery.start_soon(join_later, number)
        if failed:
            who, exc = next(iter(failed.items()))
            more = f" (and {len(failed) - 1} more failures)" if len(failed) > 1 else ""
            print(f"many_followers.py: {who}: {exc}{more}", file=sys.stderr)
            return exc.exit_status
        # A plain read of the whole log once the job has ended: the reference.
        digest = hashlib.sha256()
        async with client.logs(job.id) as whole:
            async for chunk in whole.chunks():
                digest.update(chunk.data)
        reference = digest.hexdigest()
        finished = whole.job.finished_at if whole.job is not None else None
        ended_at = ((finished or created) - created) / 1e9
    finally:
        await clean_up(client, job.id)

    for number, got in sorted(received.items()):
        print(
            f"  follower {number:2} joined at {got.joined_at:4.2f} s: {got.log_bytes} bytes "
            f"({got.stdout_bytes} stdout, {got.stderr_lines} stderr lines), "
            f"sha256 {got.sha256[:16]}..."
        )
    print(f"  the whole log, read after the end: {whole.offset} bytes, sha256 {reference[:16]}...")
    digests = {got.sha256 for got in received.values()}
    if digests != {reference} or len(received) != FOLLOWERS:
        print(
            f"many_followers.py: the digests differ: {len(digests | {reference})} different "
            f"ones among {len(received)} followers and the whole log",
            file=sys.stderr,
        )
        return 1
    if any(got.stdout_bytes != CHUNKS * MIB for got in received.values()):
        print(f"many_followers.py: the job did not write {CHUNKS} MiB", file=sys.stderr)
        return 1
    late = sum(got.joined_at > ended_at for got in received.values())
    print(f"all {FOLLOWERS} followers got the same {whole.offset} bytes: sha256 {reference}")
    print(f"the job ended at {ended_at:.2f} s; {late} followers joined after that and got it all")
    return 0


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        async with connect(address, identity) as client:
            return await many_followers(client, address, identity)
    except CorralError as exc:  # every failure is one clear line
        print(f"many_followers.py: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

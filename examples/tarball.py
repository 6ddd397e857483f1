"""Feed a job a tarball on its stdin and read back what it made of it.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/tarball.py

It packs a tiny project in memory (a C-free "build": a shell script and
its input), starts a job with its stdin open (`stdin=True`, as `corral run
-i`), attaches to it, sends the tarball and closes the job's stdin (EOF).
The job unpacks it in its private /tmp, runs the build, and prints the
result; the script checks the result against what it expects.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tarfile

import trio

from corral.client.client import Client, connect
from corral.client.errors import CorralError
from corral.client.script import run_script
from corral.records import STREAM_STDERR, STREAM_STDOUT

# The "project": a build script that counts the words of its input.
FILES = {
    "src/build.sh": b"set -e\nwc -w < words.txt > count.txt\necho built: $(cat count.txt)\n",
    "src/words.txt": b"the quick brown fox jumps over the lazy dog\n",
}
# The job: unpack stdin into its own /tmp, build there, show what it built.
JOB = "tar x -C /tmp && cd /tmp/src && sh build.sh && ls"
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


def tarball() -> bytes:
    """FILES as a tar archive, made in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in FILES.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), 0o755
            archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


async def clean_up(client: Client, job_id: str) -> None:
    """Stop the job if it still runs and remove it, even when the script failed."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        with contextlib.suppress(CorralError):  # failed_precondition: it has ended
            await client.stop(job_id, grace=0)
        with contextlib.suppress(CorralError):
            await client.remove(job_id)


async def feed_a_tarball(client: Client) -> int:
    archive = tarball()
    job = await client.start(["sh", "-c", JOB], stdin=True)
    print(f"started job {job.short_id} with its stdin open: sh -c '{JOB}'")
    output = {STREAM_STDOUT: bytearray(), STREAM_STDERR: bytearray()}
    try:
        # offset=0: the job's output from its first byte, not from the moment
        # we attach (it may have written already).
        async with client.attach(job.id, offset=0) as attached:

            async def send() -> None:
                await attached.send(archive)  # waits whenever the job is not reading
                await attached.close()  # EOF: tar sees the end of its archive
                print(f"sent a {len(archive)}-byte tarball, then EOF")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                async for record in attached:
                    if isinstance(record.data, bytes):
                        output[record.stream] += record.data
        final = attached.job
        assert final is not None
        print(f"the job has ended: {final.outcome}")
        print("its output:")
        for line in output[STREAM_STDOUT].decode(errors="replace").splitlines():
            print(f"  {line}")
        if output[STREAM_STDERR]:
            print(f"its errors: {output[STREAM_STDERR].decode(errors='replace')}")
        if final.exit_code != 0 or b"built: 9" not in output[STREAM_STDOUT]:
            print("tarball.py: the job did not build what was expected", file=sys.stderr)
            return 1
        print("the job built from our tarball: 9 words counted")
    finally:
        await clean_up(client, job.id)
    return 0


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        async with connect(address, identity) as client:
            return await feed_a_tarball(client)
    except CorralError as exc:  # every failure is one clear line
        print(f"tarball.py: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

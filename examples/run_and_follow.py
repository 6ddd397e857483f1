"""Start a job and follow its output live, from the first byte to its end.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/run_and_follow.py

It starts a shell that writes to stdout and stderr for about a second and
exits with code 3, prints every record of its output as it arrives (which
stream, when, what), then how the job ended.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import trio

from corral.client.client import Client, connect
from corral.client.errors import CorralError
from corral.client.script import run_script
from corral.records import STREAM_STDERR, STREAM_STDOUT

# A job that talks on both streams for a second or so, then fails.
SCRIPT = """
for i in 1 2 3 4; do
    echo "step $i of 4"
    echo "warning: step $i is slow" >&2
    sleep 0.25
done
echo "giving up" >&2
exit 3
"""
STREAM_NAMES = {STREAM_STDOUT: "stdout", STREAM_STDERR: "stderr"}
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


async def clean_up(client: Client, job_id: str) -> None:
    """Stop the job if it still runs and remove it, even when the script failed."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        with contextlib.suppress(CorralError):  # failed_precondition: it has ended
            await client.stop(job_id, grace=0)
        with contextlib.suppress(CorralError):
            await client.remove(job_id)


async def run_and_follow(client: Client) -> int:
    job = await client.start(["sh", "-c", SCRIPT])
    print(f"started job {job.short_id}: sh -c '...' (4 steps, then exit 3)")
    try:
        # Times from the job's creation: started_at is when corral learned
        # that the command runs, and the first output can come a moment before.
        created = job.created_at or 0
        # follow=True: everything the job has written (from offset 0, the
        # first byte) and then everything it writes, until it ends.
        async with client.logs(job.id, follow=True) as stream:
            async for record in stream:
                # When the job wrote it, and how long it took to reach us
                # (both clocks are the same host's with `make run`).
                at = (record.time_ns - created) / 1e9
                late_ms = (time.time_ns() - record.time_ns) / 1e6
                if isinstance(record.data, bytes):
                    name = STREAM_NAMES[record.stream]
                    for line in record.data.decode(errors="replace").splitlines():
                        print(f"  +{at:.2f} s  {name}: {line:<28} (here {late_ms:.0f} ms later)")
                else:  # stream 0: a note from corral, such as {"dropped_bytes": N}
                    print(f"  +{at:.2f} s  corral: {record.data}")
        # The stream ends when the job does; its last frame carries the job's
        # final state, so no separate status() call is needed.
        final = stream.job
        assert final is not None
        print(f"the job has ended: state {final.state}, exit code {final.exit_code}")
        print(f"corral's reason: {final.reason}")
        print(f"{stream.offset} bytes of output.log read, from the first byte to the last")
    finally:
        await clean_up(client, job.id)
    return 0


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        async with connect(address, identity) as client:
            return await run_and_follow(client)
    except CorralError as exc:  # every failure is one clear line
        print(f"run_and_follow.py: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

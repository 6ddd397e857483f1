"""What a job sees of the machine it runs on.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/isolation_tour.py

It runs a few commands as jobs (ps, ip link, hostname, id, the mount
table, a look at what is writable) and prints each one's output with a
line saying what it shows. The script checks each claim against the
output and exits 1 if one does not hold.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import trio

from corral.client.client import Client, connect
from corral.client.errors import CorralError
from corral.client.jobs import JobInfo
from corral.client.script import run_script

# The mounts init makes for every job, and what "/" is (the host's).
SHOWN_MOUNTS = ("/", "/proc", "/sys", "/tmp", "/dev/shm", "/dev/mqueue")
WRITABLE = "for d in /etc /usr /var/tmp /tmp; do test -w $d && echo $d yes || echo $d no; done"
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


class Tour:
    """Runs commands as jobs and keeps count of claims that did not hold."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.jobs: list[str] = []
        self.wrong: list[str] = []

    async def run(self, argv: list[str], shown: str | None = None) -> tuple[str, JobInfo]:
        """Run `argv` as a job; print it, return its output (stdout and
        stderr, as written) and its final state."""
        print(f"$ {shown or ' '.join(argv)}")
        job = await self.client.start(argv)
        self.jobs.append(job.id)
        output = bytearray()
        async with self.client.logs(job.id, follow=True) as stream:
            async for record in stream:
                if isinstance(record.data, bytes):
                    output += record.data
        assert stream.job is not None  # set when a stream ends
        return output.decode(errors="replace"), stream.job

    def show(self, text: str, keep: int = 20) -> None:
        lines = text.splitlines()
        for line in lines[:keep]:
            print(f"    {line}")
        if len(lines) > keep:
            print(f"    ... ({len(lines) - keep} more lines)")

    def explain(self, holds: bool, claim: str) -> None:
        """Print what the output shows; note it if the output says otherwise."""
        print(f"  -> {claim}" if holds else f"  -> NOT AS EXPECTED: {claim}")
        if not holds:
            self.wrong.append(claim)

    async def clean_up(self) -> None:
        """Stop what still runs and remove every job, even when the tour failed."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            for job_id in self.jobs:
                with contextlib.suppress(CorralError):  # failed_precondition: it has ended
                    await self.client.stop(job_id, grace=0)
                with contextlib.suppress(CorralError):
                    await self.client.remove(job_id)


def tmpfs_size(options: str) -> str:
    """'rw,nosuid,size=65536k' -> '64 MiB' (the kernel shows sizes in KiB)."""
    size = next((o.removeprefix("size=") for o in options.split(",") if o.startswith("size=")), "")
    return f"{int(size[:-1]) // 1024} MiB" if size.endswith("k") else size or "no size"


async def tour(guide: Tour) -> None:
    # comm is a process's own name; args the command line it was started with.
    output, _ = await guide.run(["ps", "-eo", "pid,ppid,user,comm,args"])
    guide.show(output)
    processes = [line.split(None, 4) for line in output.splitlines()[1:]]
    pid1 = next((p for p in processes if p[0] == "1"), [])
    guide.explain(
        len(processes) == 2 and pid1[3:] == ["corral-init", "corral-init"],
        "its own PID namespace: only its own processes. PID 1 is corral's init\n"
        "     (named corral-init, its command line too: it never execs, and names\n"
        "     itself), and init started ps. The host's processes are not there.",
    )

    output, _ = await guide.run(["ip", "link"])
    guide.show(output)
    interfaces = re.findall(r"^\d+: ([^:@]+)", output, re.MULTILINE)
    guide.explain(
        interfaces == ["lo"] and "UP" in output,
        "its own network namespace: only the loopback interface, up; no other\n"
        "     interface, so nothing outside the job can be reached. (ip is the host's\n"
        "     own program: jobs see the host's filesystem.)",
    )

    output, job = await guide.run(["hostname"])
    guide.show(output)
    guide.explain(
        output.strip() == job.short_id,
        f"its own UTS namespace: the hostname is the job's short id, {job.short_id}",
    )

    output, job = await guide.run(
        ["sh", "-c", "id; cat /proc/self/uid_map"], "id; cat /proc/self/uid_map"
    )
    guide.show(output)
    mapping = output.splitlines()[1].split() if output.count("\n") > 1 else []
    guide.explain(
        output.startswith(f"uid={job.uid}(job) gid={job.uid}(job)")
        and mapping == [str(job.uid), str(job.uid), "1"],
        f"a uid of its own, {job.uid}, from corrald's range: no other running job has\n"
        "     it. It lives in a user namespace of its own where that uid is the only one\n"
        "     mapped (every other id shows as nobody); only an admin may ask for another\n"
        "     user, or for root, which is root inside the job alone",
    )

    output, _ = await guide.run(["cat", "/proc/self/mounts"])
    mounts = [line.split() for line in output.splitlines()]
    # A mount point can appear more than once: the last mount is the one seen.
    seen = {fields[1]: fields for fields in mounts if len(fields) >= 4}
    guide.show("\n".join(" ".join(seen[point][:4]) for point in SHOWN_MOUNTS if point in seen))
    print(f"    ... ({len(mounts)} mounts in all, most of them the host's)")
    unknown = ["", "", "", ""]
    root_read_only = "ro" in seen.get("/", unknown)[3].split(",")
    root_mode = "read-only" if root_read_only else "read-write"
    tmp = seen.get("/tmp", unknown)
    guide.explain(
        seen.get("/proc", unknown)[0] == "proc"
        and "ro" in seen.get("/sys", unknown)[3].split(",")
        and tmp[2] == seen.get("/dev/shm", unknown)[2] == "tmpfs",
        "its own mount namespace: a fresh /proc (its own processes), a read-only\n"
        "     /sys, a private tmpfs on /tmp and /dev/shm; the rest, / included, is the\n"
        f"     host's, mounted as on the host ({root_mode} here), seen from a private copy.",
    )

    output, _ = await guide.run(["sh", "-c", WRITABLE], shown="test -w on /etc /usr /var/tmp /tmp")
    guide.show(output)
    writable = dict(line.split() for line in output.splitlines())
    if root_read_only:
        what = (
            "the host's filesystem is read-only here: it cannot change /etc or /usr,\n"
            "     nor even /var/tmp, which anyone may write on the host; /tmp is its own,\n"
            "     and `--rw PATH` is how a job is given a host path to write"
        )
        expected = {"/etc": "no", "/usr": "no", "/var/tmp": "no", "/tmp": "yes"}
    else:
        var_tmp = "can" if writable.get("/var/tmp") == "yes" else "cannot"
        what = (
            "the host's files are guarded by their permissions, not by the mount:\n"
            "     as nobody it cannot change /etc or /usr, but it can write wherever anyone\n"
            f"     may on the host: it {var_tmp} write to the host's /var/tmp. /tmp is its own."
        )
        expected = {"/etc": "no", "/usr": "no", "/tmp": "yes"}
    guide.explain(all(writable.get(path) == seen for path, seen in expected.items()), what)

    output, _ = await guide.run(["ls", "-A", "/tmp"])
    guide.show(output or "(nothing)")
    guide.explain(
        output == "",
        f"its /tmp is a fresh, empty tmpfs of {tmpfs_size(tmp[3])}, not the host's /tmp",
    )


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        async with connect(address, identity) as client:
            guide = Tour(client)
            try:
                await tour(guide)
            finally:
                await guide.clean_up()
    except CorralError as exc:  # every failure is one clear line
        print(f"isolation_tour.py: {exc}", file=sys.stderr)
        return exc.exit_status
    if guide.wrong:
        print(f"isolation_tour.py: {len(guide.wrong)} claims did not hold", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

"""What an admin sees and may do, and what a user does not.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/admin_vs_user.py

Two connections: the admin's (CORRAL_IDENTITY) and a user's,
CORRAL_USER_IDENTITY, by default the `alice` identity beside the admin's
(var/pki/clients/alice). The admin starts a job; alice cannot see it, not
even by its id: corrald answers exactly as for a job that does not exist,
so a user cannot learn which jobs others run. alice starts her own; the
admin sees both. alice may not run a job as root. Exits 1 if corrald
behaves otherwise.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import trio

from corral.client.client import Client, connect
from corral.client.errors import EXIT_CONFIG, CorralError, ServerError
from corral.client.script import run_script
from corral.job import new_job_id
from corral.protocol import ErrorCode

SLEEPER = ["sleep", "30"]  # long enough to be running throughout; stopped at the end
CLEANUP_TIMEOUT = 10.0  # seconds; a corrald that cannot stop a job by then will not


# Every job the script starts, with the connection of the one who started it.
Started = list[tuple[Client, str]]


async def clean_up(jobs: Started) -> None:
    """Stop what still runs and remove every job, even when the script failed.
    Each owner cleans up their own jobs (an admin could do it all, a user not)."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        for client, job_id in jobs:
            with contextlib.suppress(CorralError):  # failed_precondition: it has ended
                await client.stop(job_id, grace=0)
            with contextlib.suppress(CorralError):
                await client.remove(job_id)


class Checks:
    """Prints what happened and keeps count of what was not as expected."""

    def __init__(self) -> None:
        self.wrong = 0

    def expect(self, holds: bool, text: str) -> None:
        print(f"  {text}" if holds else f"  NOT AS EXPECTED: {text}")
        self.wrong += not holds


async def admin_vs_user(admin: Client, alice: Client, jobs: Started) -> int:
    checks = Checks()
    who = f"{alice.identity.name} ({alice.identity.role})"
    print(f"connected as {admin.identity.name} ({admin.identity.role}) and as {who}")

    admins_job = await admin.start(SLEEPER)
    jobs.append((admin, admins_job.id))
    print(f"{admin.identity.name} started job {admins_job.short_id}: {admins_job.command}")

    theirs = [job.short_id for job in await alice.list()]
    checks.expect(
        admins_job.short_id not in theirs,
        f"{alice.identity.name} lists her jobs: {theirs or 'none'}; the admin's is not there",
    )

    # Asking for a job by id: the admin's, then one that was never started.
    answers = []
    for label, job_id in (
        ("the admin's job", admins_job.id),
        ("a job that never was", new_job_id()),
    ):
        try:
            job = await alice.status(job_id)
        except ServerError as exc:
            print(f"  {alice.identity.name} asks the status of {label}: {exc.code}: {exc}")
            answers.append((exc.code, str(exc).replace(job_id, "ID")))  # the same but the id?
        else:
            checks.expect(False, f"{alice.identity.name} sees {label}: {job.state}")
    checks.expect(
        len(answers) == 2 and answers[0] == answers[1] and answers[0][0] is ErrorCode.NOT_FOUND,
        "the same answer: she cannot tell someone else's job from no job at all",
    )

    her_job = await alice.start(SLEEPER)
    jobs.append((alice, her_job.id))
    print(f"{alice.identity.name} started job {her_job.short_id}: {her_job.command}")

    everyone = await admin.list(everyone=True)
    ours = [job for job in everyone if job.id in (admins_job.id, her_job.id)]
    others = len(everyone) - len(ours)
    print(f"{admin.identity.name} lists every job, list(everyone=True), and finds among them:")
    for job in ours:
        print(f"    {job.short_id}  owner {job.owner:<8} {job.state:<8} {job.command}")
    if others:
        print(f"    (and {others} other jobs)")
    checks.expect(len(ours) == 2, "the admin sees both jobs, alice's included")

    try:
        root_job = await alice.start(["id"], user="root")
    except ServerError as exc:
        print(f"  {alice.identity.name} asks to run a job as root: {exc.code}: {exc}")
        checks.expect(
            exc.code is ErrorCode.PERMISSION_DENIED, "refused: only an admin picks the user"
        )
    else:
        jobs.append((alice, root_job.id))
        checks.expect(False, f"{alice.identity.name} started a job as root: {root_job.short_id}")
    return 1 if checks.wrong else 0


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    user_identity = os.environ.get("CORRAL_USER_IDENTITY", str(Path(identity).parent / "alice"))
    try:
        async with connect(address, identity) as admin, connect(address, user_identity) as alice:
            if not admin.identity.is_admin or alice.identity.is_admin:
                print(
                    f"admin_vs_user.py: needs an admin's identity and a user's, not "
                    f"{admin.identity.role} {admin.identity.name} and "
                    f"{alice.identity.role} {alice.identity.name}",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            jobs: Started = []
            try:
                status = await admin_vs_user(admin, alice, jobs)
            finally:
                await clean_up(jobs)
            started = {job_id for _, job_id in jobs}
            left = [job for job in await admin.list(everyone=True) if job.id in started]
            print(f"stopped and removed the {len(jobs)} jobs; {len(left)} left")
    except CorralError as exc:  # every failure is one clear line
        print(f"admin_vs_user.py: {exc}", file=sys.stderr)
        return exc.exit_status
    return status


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))

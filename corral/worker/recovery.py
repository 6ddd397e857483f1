"""Recovery: what a manager finds in its state directory when it starts.

Theory of operation. Shims outlive corrald, so a restarted manager has
jobs it did not start. Every job directory is read back into a `Job`; a
job not ended whose shim is alive (its pid from the status, or, for a
corrald killed just after writing "starting", the `corral-shim` process
holding a file of the job directory open) gets a pidfd, pinned and checked
to still be a shim, for the manager to watch again; one whose shim is gone
gets none, and its watcher marks it `lost`. One line of the log says what
was found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path

from corral.ipc import SHIM_COMM
from corral.job import State, Status
from corral.store import read_spec, read_status
from corral.worker.index import Job
from corral.worker.retention import log_size

log = logging.getLogger(__name__)


def shim_of(directory: Path) -> int | None:
    """The pid of a live shim holding a file of this job directory open."""
    inside = f"{directory}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != SHIM_COMM:
                continue
            if any(os.readlink(fd).startswith(inside) for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:  # it ended meanwhile
            continue
    return None


def shim_alive(pid: int | None) -> int | None:
    """A pidfd for the shim with this pid, if that process is still a corral shim."""
    if not pid:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    # The pid was reused, or the shim has ended (a zombie not yet reaped).
    if comm != SHIM_COMM or select.select([pidfd], [], [], 0)[0]:
        os.close(pidfd)
        return None
    return pidfd


def find_shim(directory: Path, status: Status | None) -> int | None:
    """A pidfd for the live shim of the job in `directory` (its pid from
    `status`, else found by the files it holds open), or None if it is gone."""
    return shim_alive((status.shim_pid if status is not None else None) or shim_of(directory))


def recorded_end(directory: Path) -> bool:
    """Whether the job's status file records its end."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        status = read_status(directory)
        return status is not None and status.state.finished
    return False


@dataclass(frozen=True, slots=True)
class Found:
    """A job read back from its directory. For a job not ended, `pidfd` is
    its live shim's (the caller's to close), or None if the shim is gone."""

    job: Job
    pidfd: int | None


def load(jobs_dir: Path) -> list[Found]:
    """Every job in `jobs_dir`, oldest directory name first; finished jobs
    come with their end recorded (`Job.record_end`: compact). Logs
    how many running jobs were adopted and how many lost. Unreadable job
    directories are logged and skipped."""
    found: list[Found] = []
    adopted = lost = 0
    for directory in sorted(jobs_dir.iterdir()):
        try:
            spec = read_spec(directory)
            status = read_status(directory) or Status(state=State.STARTING)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping job directory %s: %s", directory, exc)
            continue
        job = Job(spec=spec, status=status, directory=directory)
        job.started.set()
        if status.state.finished:
            job.record_end(log_size(directory))
            found.append(Found(job, None))
            continue
        pidfd = find_shim(directory, status)
        adopted += pidfd is not None
        lost += pidfd is None and not recorded_end(directory)  # it may have just ended
        found.append(Found(job, pidfd))
    lost_note = f"; {lost} job{'' if lost == 1 else 's'} lost (shim gone without recording an end)"
    log.info("adopted %d running jobs%s", adopted, lost_note if lost else "")
    return found


__all__ = ["Found", "find_shim", "load", "recorded_end", "shim_alive", "shim_of"]

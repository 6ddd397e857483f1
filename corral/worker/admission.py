"""Admission: how many jobs may be starting or running at once, and
what an owner's finished jobs may keep before their starts are refused.

Each running job is a shim, an init and its command's processes: a
manager refuses starts beyond its caps (`resource_exhausted`) rather than
fork without bound, and refuses every start once it is told to (corrald
shutting down: `unavailable`). A job holds its slot from its admission
(or its adoption at a restart) until its end is recorded.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

from corral.errors import OperationError
from corral.identity import Identity
from corral.protocol.errors import ErrorCode
from corral.units import format_size, short_size

# A shim and an init are ~15 MiB of private memory between them: a thousand
# jobs is a large host's worth; one owner may take a quarter of it.
MAX_JOBS = 1000
MAX_JOBS_PER_OWNER = 250
# Finished jobs one owner may have kept (their records and logs, until
# removed or retention takes them): a day of a busy user's short jobs;
# beyond it, one user's history would grow corrald and its disk unbounded.
MAX_FINISHED_PER_OWNER = 5000
# Bytes of output.log one owner's finished jobs may hold together: ten logs
# at the per-job cap (DEFAULT_LOG_LIMIT, 1 GiB), or 2 MiB a job at the
# finished cap. corrald takes less on a small disk (`log_quota`).
MAX_LOG_BYTES_PER_OWNER = 10 << 30
# corrald's default is at most this share of the state directory's
# filesystem: the quarter one user gets of the jobs and the connections,
# so one user's logs cannot fill the disk every job writes to.
LOG_SHARE = 4


@dataclass(frozen=True, kw_only=True)
class Admission:
    """The caps on jobs starting or running at once, in all and per owner;
    None means no cap of that kind."""

    max_jobs: int | None = MAX_JOBS
    max_jobs_per_owner: int | None = MAX_JOBS_PER_OWNER
    max_finished_per_owner: int | None = MAX_FINISHED_PER_OWNER
    max_log_bytes_per_owner: int | None = MAX_LOG_BYTES_PER_OWNER


def log_quota(state_dir: Path) -> int:
    """corrald's default for `max_log_bytes_per_owner`: MAX_LOG_BYTES_PER_OWNER,
    or a LOG_SHARE of the filesystem `state_dir` is on if that is less.
    Raises OSError if that filesystem cannot be asked."""
    info = os.statvfs(state_dir)
    return min(MAX_LOG_BYTES_PER_OWNER, info.f_blocks * info.f_frsize // LOG_SHARE)


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


class Slots:
    """The jobs starting or running, counted by owner, against `Admission`."""

    def __init__(self, caps: Admission) -> None:
        self.caps = caps
        self._active: collections.Counter[Identity] = collections.Counter()
        self._refusing: str | None = None  # why starts are refused, once they are

    def refuse_all(self, reason: str) -> None:
        """Refuse every later `take` (`unavailable`, saying `reason`)."""
        self._refusing = reason

    def check(self, owner: Identity, finished: int = 0, log_bytes: int = 0) -> None:
        """Raise OperationError unless `owner`, who has `finished` finished
        jobs kept, their output.log files `log_bytes` together, may start a
        job now: unavailable once starts are refused, resource_exhausted
        beyond a cap. Takes nothing: `take` does, with no checkpoint in
        between."""
        if self._refusing is not None:
            raise OperationError(ErrorCode.UNAVAILABLE, self._refusing)
        limit = self.caps.max_jobs
        if limit is not None and self.running() >= limit:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"corrald has {_jobs(limit)} starting or running, its maximum; "
                "try again when one has ended",
            )
        limit = self.caps.max_jobs_per_owner
        if limit is not None and self._active[owner] >= limit:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{owner.name or 'this owner'} has {_jobs(limit)} starting or running, "
                "the most one user may have; wait for one to end, or stop one",
            )
        limit = self.caps.max_finished_per_owner
        if limit is not None and finished >= limit:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{owner.name or 'this owner'} has {_jobs(finished)} finished and kept, "
                f"the most one user may keep ({limit}); remove some "
                "(`corral rm --finished`) to start more",
            )
        limit = self.caps.max_log_bytes_per_owner
        if limit is not None and log_bytes >= limit:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{owner.name or 'this owner'}'s finished jobs keep {format_size(log_bytes)} of "
                f"output logs, the most one user may keep ({short_size(limit)}); remove some "
                "(`corral rm --finished`) to start more",
            )

    def take(self, owner: Identity) -> None:
        """Count one more job of `owner` (admitted, or adopted at a restart)."""
        self._active[owner] += 1

    def free(self, owner: Identity) -> None:
        """Count one job of `owner` less: its end is recorded."""
        self._active[owner] -= 1
        if self._active[owner] <= 0:
            del self._active[owner]

    def running(self, owner: Identity | None = None) -> int:
        """Jobs starting or running (with `owner`, that owner's)."""
        if owner is not None:
            return self._active[owner]
        return sum(self._active.values())


__all__ = [
    "LOG_SHARE",
    "MAX_FINISHED_PER_OWNER",
    "MAX_JOBS",
    "MAX_JOBS_PER_OWNER",
    "MAX_LOG_BYTES_PER_OWNER",
    "Admission",
    "Slots",
    "log_quota",
]

"""Admission: how many jobs may be starting or running at once.

Each running job is a shim, an init and its command's processes: a
manager refuses starts beyond its caps (`resource_exhausted`) rather than
fork without bound, and refuses every start once it is told to (corrald
shutting down: `unavailable`). A job holds its slot from its admission
(or its adoption at a restart) until its end is recorded.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from corral.errors import OperationError
from corral.protocol.errors import ErrorCode

# A shim and an init are ~15 MiB of private memory between them: a thousand
# jobs is a large host's worth; one owner may take a quarter of it.
MAX_JOBS = 1000
MAX_JOBS_PER_OWNER = 250
# Finished jobs one owner may have kept (their records and logs, until
# removed or retention takes them): a day of a busy user's short jobs;
# beyond it, one user's history would grow corrald and its disk unbounded.
MAX_FINISHED_PER_OWNER = 5000


@dataclass(frozen=True, kw_only=True)
class Admission:
    """The caps on jobs starting or running at once, in all and per owner;
    None means no cap of that kind."""

    max_jobs: int | None = MAX_JOBS
    max_jobs_per_owner: int | None = MAX_JOBS_PER_OWNER
    max_finished_per_owner: int | None = MAX_FINISHED_PER_OWNER


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


class Slots:
    """The jobs starting or running, counted by owner, against `Admission`."""

    def __init__(self, caps: Admission) -> None:
        self.caps = caps
        self._active: collections.Counter[str] = collections.Counter()
        self._refusing: str | None = None  # why starts are refused, once they are

    def refuse_all(self, reason: str) -> None:
        """Refuse every later `take` (`unavailable`, saying `reason`)."""
        self._refusing = reason

    def check(self, owner: str, finished: int = 0) -> None:
        """Raise OperationError unless `owner`, who has `finished` finished
        jobs kept, may start a job now: unavailable once starts are refused,
        resource_exhausted beyond a cap. Takes nothing: `take` does, with no
        checkpoint in between."""
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
                f"{owner or 'this owner'} has {_jobs(limit)} starting or running, "
                "the most one user may have; wait for one to end, or stop one",
            )
        limit = self.caps.max_finished_per_owner
        if limit is not None and finished >= limit:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{owner or 'this owner'} has {_jobs(finished)} finished and kept, "
                f"the most one user may keep ({limit}); remove some "
                "(`corral rm --finished`) to start more",
            )

    def take(self, owner: str) -> None:
        """Count one more job of `owner` (admitted, or adopted at a restart)."""
        self._active[owner] += 1

    def free(self, owner: str) -> None:
        """Count one job of `owner` less: its end is recorded."""
        self._active[owner] -= 1
        if self._active[owner] <= 0:
            del self._active[owner]

    def running(self, owner: str | None = None) -> int:
        """Jobs starting or running (with `owner`, that owner's)."""
        if owner is not None:
            return self._active[owner]
        return sum(self._active.values())


__all__ = ["MAX_FINISHED_PER_OWNER", "MAX_JOBS", "MAX_JOBS_PER_OWNER", "Admission", "Slots"]

"""The jobs a manager knows, in memory: one `Job` each, found by id or prefix.

The state directory is the truth; this index is rebuilt from it at every
start (`corral.worker.recovery`) and kept in step as jobs start, end and
are removed. It does no I/O and never waits.
"""

from __future__ import annotations

from pathlib import Path

import trio

from corral.errors import OperationError
from corral.job import ResolvedSpec, State, Status
from corral.protocol.errors import ErrorCode, shorten


def _rank(state: State) -> int:
    """Where a state comes in a job's life: starting, running, then its end."""
    return {State.STARTING: 0, State.RUNNING: 1}.get(state, 2)


class Job:
    """One job as the manager knows it. `status` is the latest recorded one."""

    __slots__ = ("_status", "directory", "done", "spec", "started")

    def __init__(self, spec: ResolvedSpec, status: Status, directory: Path) -> None:
        self.spec = spec
        self.directory = directory
        self._status = status
        self.started = trio.Event()  # set once start() knows how the start went
        self.done = trio.Event()  # set once the end is recorded

    @property
    def status(self) -> Status:
        return self._status

    def advance(self, status: Status) -> bool:
        """Take `status` unless it is earlier than the one held: an end is
        never replaced, and running never goes back to starting, whoever
        reports last (the start taking the shim's report, the watcher taking
        the end). Returns whether it was taken."""
        if self._status.state.finished or _rank(status.state) < _rank(self._status.state):
            return False
        self._status = status
        return True

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def short_id(self) -> str:
        return self.spec.short_id

    @property
    def ended_at(self) -> int:
        """When the job ended (ns since the epoch), or was created if unrecorded."""
        return self._status.finished_at or self.spec.created_at


class JobIndex:
    """Every job of one manager, by id."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def forget(self, job: Job) -> None:
        """Drop the job from the index (its files are the caller's)."""
        self._jobs.pop(job.id, None)

    def resolve(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job with this id or unique id prefix.

        With `owner`, only that owner's jobs are candidates: another owner's
        job is not found, exactly like a job that does not exist. Raises
        OperationError: not_found, or invalid_argument for an ambiguous prefix.
        """
        exact = self._jobs.get(job_id)
        if exact is not None and (owner is None or exact.spec.owner == owner):
            return exact  # the usual case, without a scan of every job
        matches = [job for job in self._owned(owner) if job_id and job.id.startswith(job_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:  # the id is the caller's: quoted, but cut short
            raise OperationError(ErrorCode.NOT_FOUND, f"no job {shorten(job_id)}")
        shown = ", ".join(sorted(job.short_id for job in matches)[:10])
        raise OperationError(
            ErrorCode.INVALID_ARGUMENT,
            f"job id prefix {job_id!r} is ambiguous: it matches {shown}; give more of the id",
        )

    def jobs(self, *, owner: str | None = None) -> list[Job]:
        """Every job (with `owner`, that owner's), oldest first."""
        return sorted(self._owned(owner), key=lambda job: (job.spec.created_at, job.id))

    def unfinished(self) -> list[Job]:
        """The jobs whose end is not recorded yet."""
        return [job for job in self._jobs.values() if not job.done.is_set()]

    def finished(self, owner: str) -> int:
        """How many of `owner`'s jobs have their end recorded."""
        return sum(
            1 for job in self._jobs.values() if job.spec.owner == owner and job.done.is_set()
        )

    def finished_oldest_first(self) -> list[Job]:
        """The jobs whose end is recorded, the earliest end first."""
        finished = [job for job in self._jobs.values() if job.done.is_set()]
        return sorted(finished, key=lambda job: (job.ended_at, job.id))

    def _owned(self, owner: str | None) -> list[Job]:
        return [job for job in self._jobs.values() if owner is None or job.spec.owner == owner]


__all__ = ["Job", "JobIndex"]

"""The jobs a manager knows, in memory: one `Job` each, found by id or prefix.

The state directory is the truth; this index is rebuilt from it at every
start (`corral.worker.recovery`) and kept in step as jobs start, end and
are removed. It does no I/O and never waits.
"""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path

import trio

from corral.errors import OperationError
from corral.identity import Identity
from corral.job import ResolvedSpec, State, Status
from corral.protocol.errors import ErrorCode, shorten

# What a finished job keeps of its argv in memory: a `list` row needs no
# more, and a spec may hold 256 KiB of argv (and as much env), which a
# thousand finished jobs would keep for ever. The whole spec stays in
# spec.msgpack. Arguments are counted too: each is a Python object of ~40
# bytes whatever its length, and 4 KiB of 2-byte arguments would be 57 KiB.
KEPT_ARGV_BYTES = 4096  # arguments' bytes and their NULs, as MAX_ARGV_BYTES counts them
KEPT_ARGS = 64


def cut_argv(argv: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], int]:
    """The first arguments of `argv` within KEPT_ARGS and KEPT_ARGV_BYTES (the
    last of them cut short if it is what does not fit), and how many bytes
    of argv that leaves out (counting a NUL per argument): 0 when it is whole."""
    kept: list[bytes] = []
    room = KEPT_ARGV_BYTES
    for arg in argv[:KEPT_ARGS]:
        if len(arg) + 1 > room:
            if room > 1:
                kept.append(arg[: room - 1])
            break
        kept.append(arg)
        room -= len(arg) + 1
    left_out = sum(len(arg) + 1 for arg in argv) - sum(len(arg) + 1 for arg in kept)
    return tuple(kept), left_out


def _rank(state: State) -> int:
    """Where a state comes in a job's life: starting, running, then its end."""
    return {State.STARTING: 0, State.RUNNING: 1}.get(state, 2)


class Job:
    """One job as the manager knows it. `status` is the latest recorded one.

    Once its end is recorded (`record_end`), `spec` is compact: `argv_cut`
    says how many bytes of its argv that left out, and `log_bytes` is the
    size of its output.log, which no longer changes."""

    __slots__ = ("_status", "argv_cut", "directory", "done", "log_bytes", "spec", "started")

    def __init__(self, spec: ResolvedSpec, status: Status, directory: Path) -> None:
        self.spec = spec
        self.argv_cut = 0
        self.log_bytes = 0
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

    def record_end(self, log_bytes: int) -> None:
        """Mark the job ended (its status holds the end), its output.log
        `log_bytes` long. From now on its spec is compact: a finished job is
        only shown, so it keeps its spec without env and cwd (nothing shows
        them) and at most KEPT_ARGV_BYTES of its argv; the whole spec stays
        in its spec.msgpack (`corral.store.read_spec`). A running job's
        spec is kept whole."""
        argv, left_out = cut_argv(self.spec.argv)
        self.argv_cut += left_out  # a second end leaves out nothing more
        self.spec = replace(self.spec, argv=argv, env={}, cwd=b"")
        self.log_bytes = log_bytes
        self.started.set()
        self.done.set()

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
    """Every job of one manager, by id, and what each owner's finished jobs
    hold: how many, and their output.log bytes (counted as jobs end and
    are removed, never by a scan: admission asks at every start)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._finished: collections.Counter[Identity] = collections.Counter()
        self._log_bytes: collections.Counter[Identity] = collections.Counter()

    def add(self, job: Job) -> None:
        """Index the job; one whose end is recorded already (found at a
        restart) is counted as finished at once."""
        self.forget(job)
        self._jobs[job.id] = job
        if job.done.is_set():
            self._count(job, 1)

    def ended(self, job: Job) -> None:
        """Count the job as finished: its end is recorded (`Job.record_end`).
        Called once per job, for a job in the index."""
        if self._jobs.get(job.id) is job and job.done.is_set():
            self._count(job, 1)

    def forget(self, job: Job) -> None:
        """Drop the job from the index (its files are the caller's)."""
        known = self._jobs.pop(job.id, None)
        if known is not None and known.done.is_set():
            self._count(known, -1)

    def _count(self, job: Job, sign: int) -> None:
        owner = job.spec.owned_by
        self._finished[owner] += sign
        self._log_bytes[owner] += sign * job.log_bytes
        if self._finished[owner] <= 0:
            del self._finished[owner]
            self._log_bytes.pop(owner, None)

    def resolve(self, job_id: str, *, owner: Identity | None = None) -> Job:
        """The job with this id or unique id prefix.

        With `owner`, only that owner's jobs are candidates: another owner's
        job is not found, exactly like a job that does not exist. Raises
        OperationError: not_found, or invalid_argument for an ambiguous prefix.
        """
        exact = self._jobs.get(job_id)
        if exact is not None and (owner is None or exact.spec.owned_by == owner):
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

    def jobs(self, *, owner: Identity | None = None) -> list[Job]:
        """Every job (with `owner`, that owner's), oldest first."""
        return sorted(self._owned(owner), key=lambda job: (job.spec.created_at, job.id))

    def unfinished(self) -> list[Job]:
        """The jobs whose end is not recorded yet."""
        return [job for job in self._jobs.values() if not job.done.is_set()]

    def finished(self, owner: Identity) -> int:
        """How many of `owner`'s jobs have their end recorded."""
        return self._finished[owner]

    def log_bytes(self, owner: Identity) -> int:
        """The output.log bytes of `owner`'s jobs whose end is recorded, together."""
        return self._log_bytes[owner]

    def finished_oldest_first(self) -> list[Job]:
        """The jobs whose end is recorded, the earliest end first."""
        finished = [job for job in self._jobs.values() if job.done.is_set()]
        return sorted(finished, key=lambda job: (job.ended_at, job.id))

    def _owned(self, owner: Identity | None) -> list[Job]:
        return [job for job in self._jobs.values() if owner is None or job.spec.owned_by == owner]


__all__ = ["KEPT_ARGS", "KEPT_ARGV_BYTES", "Job", "JobIndex", "cut_argv"]

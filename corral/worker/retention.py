"""Retention: which finished jobs to remove, and the task that removes them.

Beyond a bound the oldest finished jobs go first; running ones never. The
count and log-size bounds apply to each owner's jobs apart: one tenant's
jobs push out only that tenant's history, however many it runs. Totals
over every owner (`total_count`, `total_log_bytes`) are a last resort an
operator sets knowingly: there, the oldest of anyone's go. The task
applies the bounds at start, whenever a job ends (`notify`), and at the
moment the oldest finished job passes the age bound: a deadline, not a
poll.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from corral.errors import OperationError
from corral.identity import Identity
from corral.store import OUTPUT_FILE
from corral.worker.index import Job, JobIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retention:
    """How many finished jobs to keep: None means no bound of that kind.
    Beyond a bound the oldest finished jobs are removed; running ones never."""

    count: int | None = None  # finished jobs kept, of each owner
    age: float | None = None  # seconds since a job finished
    log_bytes: int | None = None  # output.log size of each owner's finished jobs together
    total_count: int | None = None  # finished jobs kept, of every owner together
    total_log_bytes: int | None = None  # output.log size of every finished job together

    @property
    def bounded(self) -> bool:
        bounds = (self.count, self.age, self.log_bytes, self.total_count, self.total_log_bytes)
        return any(bound is not None for bound in bounds)


def log_size(directory: Path) -> int:
    """The size of the job's output.log in `directory` (0 if it has none).
    Taken once, when a job's end is recorded (`Job.log_bytes`): a finished
    job's log no longer changes."""
    try:
        return (directory / OUTPUT_FILE).stat().st_size
    except OSError:
        return 0


def beyond(bounds: Retention, finished: list[Job], now_ns: int) -> list[Job]:
    """The jobs of `finished` (oldest first) that the bounds say to remove,
    each once, oldest first."""
    doomed: list[Job] = []
    if bounds.age is not None:
        oldest_kept = now_ns - int(bounds.age * 1e9)
        doomed += [job for job in finished if job.ended_at <= oldest_kept]
    by_owner: dict[Identity, list[Job]] = {}
    for job in finished:
        by_owner.setdefault(job.spec.owned_by, []).append(job)
    for jobs in by_owner.values():
        doomed += _over(jobs, bounds.count, bounds.log_bytes)
    going = set(doomed)
    kept = [job for job in finished if job not in going]
    doomed += _over(kept, bounds.total_count, bounds.total_log_bytes)
    gone = set(doomed)
    return [job for job in finished if job in gone]


def _over(jobs: list[Job], count: int | None, log_bytes: int | None) -> list[Job]:
    """The oldest of `jobs` (oldest first) beyond `count` of them, or beyond
    `log_bytes` of output.log together."""
    doomed: list[Job] = []
    if count is not None:
        doomed += jobs[: max(0, len(jobs) - count)]
    if log_bytes is not None:
        total = sum(job.log_bytes for job in jobs)
        for job in jobs:
            if total <= log_bytes:
                break
            doomed.append(job)
            total -= job.log_bytes
    return doomed


class Retainer:
    """Keeps one manager's finished jobs within `bounds`."""

    def __init__(self, bounds: Retention, index: JobIndex) -> None:
        self.bounds = bounds
        self._index = index
        self._changed = trio.Event()  # a job ended: the next expiry may be sooner

    def notify(self) -> None:
        """A job has ended: look again."""
        self._changed.set()

    async def run(self, remove: Callable[[str], Awaitable[None]]) -> None:
        """Remove finished jobs beyond the bounds with `remove(job_id)`,
        until cancelled. A job that cannot be removed is logged and kept."""
        if not self.bounds.bounded:
            return
        while True:
            self._changed = trio.Event()
            finished = self._index.finished_oldest_first()
            for job in beyond(self.bounds, finished, time.time_ns()):
                log.info("removing job %s: beyond the retention bounds", job.short_id)
                try:
                    await remove(job.id)
                except (OperationError, OSError) as exc:
                    log.warning("cannot remove job %s: %s", job.short_id, exc)
            with trio.move_on_at(self._next_expiry()):
                await self._changed.wait()

    def _next_expiry(self) -> float:
        """The trio time at which the oldest finished job outlives the age bound."""
        finished = self._index.finished_oldest_first()
        if self.bounds.age is None or not finished:
            return math.inf
        expires_ns = finished[0].ended_at + int(self.bounds.age * 1e9)
        return trio.current_time() + max(0.0, (expires_ns - time.time_ns()) / 1e9)


__all__ = ["Retainer", "Retention", "beyond", "log_size"]

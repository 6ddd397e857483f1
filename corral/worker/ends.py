"""How jobs end, as a manager records it: one watcher task per live shim.

Theory of operation. A shim owns its job and records its end in the job's
status file, then exits. The watcher awaits the shim's pidfd (no
polling), then takes the status the shim left; a shim that died without
one leaves a `lost` job, whose cgroup the watcher removes. Recording an
end frees the job's admission slot, counts it (and its log's size) as its
owner's finished, wakes its waiters and followers, and tells retention.
An end is recorded once; a start that failed before it had a shim is
recorded here too (`fail`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import trio

from corral.job import State, Status
from corral.shim.cgroup import CgroupError, Flavour, open_cgroup
from corral.store import RESERVE_FILE, read_status, write_status
from corral.worker.admission import Slots
from corral.worker.index import Job, JobIndex
from corral.worker.output import OutputWatcher
from corral.worker.retention import Retainer, log_size
from corral.worker.uid_pool import UidPool

log = logging.getLogger(__name__)

# Writing a final status is a small write and an fsync; a disk that takes
# longer than this is stuck, and the end is kept in memory meanwhile.
RECORD_TIMEOUT = 10.0


class Ends:
    """Watches a manager's shims and records its jobs' ends."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        index: JobIndex,
        slots: Slots,
        uids: UidPool,
        retainer: Retainer,
        output: OutputWatcher,
        flavour: Flavour,
        cgroup_root: Path,
        cgroup_parent: str,
        tally: collections.Counter[str] | None = None,
    ) -> None:
        self._nursery = nursery
        # Ends recorded, by outcome: the state, or "oom" (for metrics).
        self.tally: collections.Counter[str] = collections.Counter() if tally is None else tally
        self._index = index
        self._slots = slots
        self._uids = uids
        self._retainer = retainer
        self._output = output
        self._flavour = flavour
        self._cgroup_root = cgroup_root
        self._cgroup_parent = cgroup_parent

    def watch(self, job: Job, pidfd: int | None) -> None:
        """Watch the job's shim through `pidfd` (now ours to close) until it
        ends, then record the end; None: the shim is gone already. Does not
        wait: the watcher is a task of the manager's nursery."""
        self._nursery.start_soon(self._watch, job, pidfd)

    async def _watch(self, job: Job, pidfd: int | None) -> None:
        if pidfd is not None:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
        try:
            status = read_status(job.directory)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # damaged: not corrald's end
            log.warning("job %s: unreadable status: %s", job.short_id, exc)
            status = None
        if status is None or not status.state.finished:
            status = await self._lost(job, status)
        self._finish(job, status)
        self._output.notify(job.id)  # followers: the output is complete
        self._retainer.notify()

    async def fail(self, job: Job, step: str, message: str) -> None:
        """Record that the job failed at `step` (it has no shim), saying
        `message`. Returns within RECORD_TIMEOUT; never raises."""
        status = Status(
            state=State.FAILED, reason=message, failed_step=step, finished_at=time.time_ns()
        )
        await self._record(job, status, "its failure")
        self._finish(job, status)

    async def _lost(self, job: Job, last: Status | None) -> Status:
        """The shim vanished without recording an end: kill what is left, say so."""
        cgroup = open_cgroup(
            self._flavour, job.id, self._cgroup_root, self._cgroup_parent, job.spec.slice
        )
        reason = "lost: its shim ended without recording how the job ended"
        try:
            await trio.to_thread.run_sync(cgroup.remove)
        except CgroupError as exc:
            reason += f"; its cgroup could not be removed: {exc}"
        base = last or Status(state=State.LOST)
        status = replace(base, state=State.LOST, reason=reason, finished_at=time.time_ns())
        # The room the shim kept for the job's end is free now, for this end.
        with contextlib.suppress(FileNotFoundError):
            (job.directory / RESERVE_FILE).unlink()
        await self._record(job, status, "that it was lost")
        log.warning("job %s %s", job.short_id, reason)
        return status

    async def _record(self, job: Job, status: Status, what: str) -> None:
        """Write the job's final status (flushed to disk: never on the event
        loop). A failed write is logged, never raised: a full disk must not
        take corrald down. A write still going after RECORD_TIMEOUT is left
        to finish in its thread."""
        with trio.move_on_after(RECORD_TIMEOUT) as late:
            try:
                await trio.to_thread.run_sync(
                    write_status, job.directory, status, abandon_on_cancel=True
                )
            except OSError as exc:
                log.warning("job %s: cannot record %s: %s", job.short_id, what, exc)
        if late.cancelled_caught:
            log.warning(
                "job %s: recording %s took over %g s; it goes on in the background",
                job.short_id,
                what,
                RECORD_TIMEOUT,
            )

    def _finish(self, job: Job, status: Status) -> None:
        """Record the job's end, once: it frees the job's slot and uid,
        compacts its spec (`Job.record_end`), counts it and its log's size
        as its owner's finished (one stat: the shim has written its last),
        and wakes its waiters. A second end (there should be none) changes
        nothing."""
        if job.done.is_set():
            log.warning("job %s: a second end ignored: %s", job.short_id, status.reason)
            return
        job.advance(status)
        job.record_end(log_size(job.directory))
        self._index.ended(job)
        self.tally["oom" if status.oom_killed else str(status.state)] += 1
        self._slots.free(job.spec.owned_by)
        self._uids.release(job.spec.uid)


__all__ = ["RECORD_TIMEOUT", "Ends"]

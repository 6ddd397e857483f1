"""A job's start: admitted, recorded, its shim made, watched, and heard from.

Theory of operation. A start takes an admission slot (and, for a job
that runs as a pooled uid, a uid of its own) and records the job (its
directory, spec and "starting" status) with no checkpoint between the
cap's check and the count, so a burst of starts admits exactly up to
the cap. It takes a sandbox built ahead if there is one (its job id
becomes the job's). The spawner makes the shim and hands back its pidfd,
and a watcher takes it at once. The shim then sends one report over a
pipe: running, or why not (it has recorded that failure, and its watcher
takes it as the job's end).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import trio

from corral import ipc
from corral.errors import OperationError
from corral.job import JobSpec, Limits, ResolvedSpec, SpecError, State, Status, new_job_id
from corral.protocol.errors import ErrorCode
from corral.shim.cgroup import slice_name
from corral.store import FULL_ERRNOS, SPEC_FILE, pack, read_status, write_atomically, write_status
from corral.worker import recovery, shim_link
from corral.worker.admission import Slots
from corral.worker.ends import Ends
from corral.worker.index import Job, JobIndex
from corral.worker.sandboxes import SandboxRecords
from corral.worker.spawner import SpawnerError
from corral.worker.spawner_pool import SpawnerPool, SpawnTimeout
from corral.worker.uid_pool import UidPool

log = logging.getLogger(__name__)

# A shim sets a job up in milliseconds; this only catches one that hangs.
START_TIMEOUT = 60.0


class Starts:
    """Starts jobs for one running manager."""

    def __init__(
        self,
        jobs_dir: Path,
        *,
        index: JobIndex,
        slots: Slots,
        uids: UidPool,
        pool: SpawnerPool,
        ends: Ends,
        sandboxes: SandboxRecords,
        default_limits: Limits,
    ) -> None:
        self._jobs_dir = jobs_dir
        self._index = index
        self._slots = slots
        self._uids = uids
        self._pool = pool
        self._ends = ends
        self._sandboxes = sandboxes
        self._default_limits = default_limits

    async def start(self, spec: JobSpec, quota: Limits) -> Job:
        """Start a job and return once its command is running.

        Raises OperationError: invalid_argument for a bad spec, or a command that
        cannot be found; resource_exhausted beyond the admission caps;
        failed_precondition or internal when it could not start; unavailable
        once starts are refused, or when the spawner failed. A job that failed
        to start stays recorded as `failed`, and the error's `job_id` names it.
        """
        try:
            resolved = spec.validate()
        except SpecError as exc:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        owner = resolved.owned_by
        self._slots.check(owner, self._index.finished(owner), self._index.log_bytes(owner))
        uid = self._uids.allocate() if resolved.pooled else None
        slice = slice_name(owner)
        warm_id = self._pool.take_warm(slice)
        resolved = replace(
            resolved,
            id=warm_id or new_job_id(),
            created_at=time.time_ns(),
            limits=self._default_limits.merged(resolved.limits),
            uid=uid,
            slice=slice,
        )
        try:
            directory = self._make_job_directory(resolved, warm=warm_id is not None)
        except OperationError:
            self._uids.release(uid)
            raise
        job = Job(spec=resolved, status=Status(state=State.STARTING), directory=directory)
        self._index.add(job)
        self._slots.take(owner)  # no checkpoint since check()
        try:
            report = await self._spawn(job, quota)
        finally:
            job.started.set()
        if report.ok:
            # The job may have ended already (its watcher took the end): then
            # this earlier report changes nothing.
            assert report.status is not None  # ipc checks a report that is ok has one
            job.advance(report.status)
            return job
        await job.done.wait()  # the shim has recorded the failure and is gone
        # The step that failed and its errno, when the shim said (the client
        # tells "not found" from "not runnable" by them).
        details: dict[str, object] = {"job": job.id}
        if report.step is not None:
            details.update(step=report.step, errno=report.errno)
        raise OperationError(
            ErrorCode(report.code) if report.code else ErrorCode.INTERNAL,
            report.message or "the job could not start",
            details=details,
        )

    def _make_job_directory(self, spec: ResolvedSpec, *, warm: bool) -> Path:
        """The job's directory with its spec and first status.

        OperationError if they cannot be written (resource_exhausted when the disk
        is full); then nothing is left, and a sandbox built ahead for this id
        waits for the next start.
        """
        directory = self._jobs_dir / spec.id
        try:
            directory.mkdir(mode=0o700)
            write_atomically(directory / SPEC_FILE, pack(spec.to_wire()), durable=False)
            write_status(directory, Status(state=State.STARTING, reason="starting"))
        except OSError as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(directory)
            if warm:
                self._pool.give_back(spec.id, spec.slice)
            code = ErrorCode.RESOURCE_EXHAUSTED if exc.errno in FULL_ERRNOS else ErrorCode.INTERNAL
            raise OperationError(
                code, f"cannot record the job in corrald's state directory: {exc.strerror}"
            ) from None
        if warm:
            self._sandboxes.drop(spec.id)  # its job directory says it is ours now
        return directory

    # Theory of operation. Once the spawner may have made a shim, that shim
    # must be watched, or a cancelled start leaves a job nobody can stop:
    # the exchange and the watcher's start are shielded, bounded by the
    # pool's SPAWN_TIMEOUT. When the spawner did not answer in time (it is
    # killed), a shim may exist all the same, holding our report pipe:
    # its report (bounded by START_TIMEOUT) and the processes holding the
    # job directory tell, and such a shim is watched like any other. Only
    # a start with no shim is recorded failed here.
    async def _spawn(self, job: Job, quota: Limits) -> ipc.StartReport:
        """Have the job's shim made and watched; return the shim's report.

        Raises OperationError unavailable, the job recorded failed, when no
        shim was made.
        """
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        request = self._pool.start_request(job.id, job.directory, job.spec.slice, quota)
        try:
            with trio.CancelScope(shield=True):  # deadline: SPAWN_TIMEOUT (the pool's)
                try:
                    _, pidfd = await self._pool.spawn(request, report_w)
                finally:
                    os.close(report_w)  # the shim has its own, if there is one
                self._ends.watch(job, pidfd)
        except SpawnTimeout as exc:
            # Deadlines: START_TIMEOUT for the report, RECORD_TIMEOUT for a failure.
            with trio.CancelScope(shield=True):
                report = await shim_link.read_start_report(report_r, START_TIMEOUT)
                await self._watch_stray(job, report, exc)
            return report
        except SpawnerError as exc:
            os.close(report_r)
            with trio.CancelScope(shield=True):  # deadline: RECORD_TIMEOUT, in fail()
                await self._ends.fail(job, "spawn", str(exc))
            message = f"cannot start the job: {exc}"
            raise OperationError(ErrorCode.UNAVAILABLE, message, details={"job": job.id}) from None
        try:
            return await shim_link.read_start_report(report_r, START_TIMEOUT)
        finally:
            # After this start (it had the CPU first): the next is likely
            # this owner's again, so the sandboxes built ahead are for them.
            self._pool.aim(job.spec.slice, quota)

    async def _watch_stray(self, job: Job, report: ipc.StartReport, exc: SpawnTimeout) -> None:
        """After a spawner that did not answer: watch the job's shim if one
        was made (it reported, is alive, or recorded an end); else record
        the start failed and raise OperationError unavailable."""
        status: Status | None = None
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            status = read_status(job.directory)
        pidfd = recovery.find_shim(job.directory, status)
        if pidfd is None and not report.ok and not recovery.recorded_end(job.directory):
            await self._ends.fail(job, "spawn", str(exc))
            message = f"cannot start the job: {exc}"
            raise OperationError(ErrorCode.UNAVAILABLE, message, details={"job": job.id})
        log.warning("job %s: %s; its shim was made all the same: watching it", job.short_id, exc)
        self._ends.watch(job, pidfd)


__all__ = ["START_TIMEOUT", "Starts"]

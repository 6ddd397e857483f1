"""The job library: start, stop, inspect, wait for and remove jobs, from trio.

    async with JobManager(Path("/var/lib/corral")) as jobs:
        job = await jobs.start(JobSpec(argv=["echo", "hello"]), owner="alice")
        status = await jobs.wait(job.id)

Theory of operation. The state directory is the truth: `jobs/<id>/` holds
the spec, the status and the output, and the job's shim (a separate
process, made by the spawner) owns the job and writes its status. The
manager keeps an index of jobs in memory, one watcher task per live shim
(awaiting the shim's pidfd: no polling), and talks to a shim over its unix
socket for `status` and `stop`. When a shim ends, its watcher reads the
status it left; a shim that died without one leaves a `lost` job, whose
cgroup the watcher removes.

A job's status only moves forward (`Job.advance`): starting, running, then
one end, which nothing replaces; the watcher may record the end before the
start that made the job has taken the shim's "running" report. The manager
removes only cgroups it can prove are its own: its jobs', and the sandboxes
it recorded before building them (`corral.worker.sandboxes`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import select
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgpack
import trio

from corral.job import (
    FULL_ERRNOS,
    OUTPUT_FILE,
    RESERVE_FILE,
    SPEC_FILE,
    JobSpec,
    Limits,
    ResolvedSpec,
    SpecError,
    State,
    Status,
    new_job_id,
    pack,
    read_spec,
    read_status,
    socket_path,
    unpack,
    write_atomically,
    write_status,
)
from corral.protocol.errors import ErrorCode, shorten
from corral.shim.cgroup import (
    CgroupError,
    Flavour,
    check_host,
    detect_flavour,
    disk_devices,
    open_cgroup,
)
from corral.worker.cgroup_parent import ParentError, default_parent, record_parent
from corral.worker.output import OutputReader, OutputWatcher
from corral.worker.sandboxes import SandboxRecords
from corral.worker.spawner import Spawner, SpawnerError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# A shim sets a job up in milliseconds; this only catches one that hangs.
START_TIMEOUT = 60.0
SHIM_TIMEOUT = 10.0  # for one status or stop exchange with a shim
SHIM_COMM = "corral-shim"
# A shim and an init are ~15 MiB of private memory between them: a thousand
# jobs is a large host's worth; one owner may take a quarter of it.
MAX_JOBS = 1000
MAX_JOBS_PER_OWNER = 250
# A spawner that dies within SPAWNER_STEADY seconds of its start is
# restarted after a delay that doubles from SPAWNER_BACKOFF each time.
SPAWNER_STEADY = 10.0
SPAWNER_BACKOFF = 0.05
SPAWNER_BACKOFF_MAX = 30.0


class JobError(Exception):
    """A job operation failed; `code` is the wire's error code. `job_id` names
    the job it concerns when one was recorded (a start that failed after it)."""

    def __init__(self, code: ErrorCode, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class Retention:
    """How many finished jobs to keep: None means no bound of that kind.
    Beyond a bound the oldest finished jobs are removed; running ones never."""

    count: int | None = None  # finished jobs kept
    age: float | None = None  # seconds since a job finished
    log_bytes: int | None = None  # total output.log size of finished jobs

    @property
    def bounded(self) -> bool:
        return (self.count, self.age, self.log_bytes) != (None, None, None)


@dataclass(frozen=True, kw_only=True)
class Admission:
    """How many jobs may be starting or running at once, in all and per owner.

    Each running job is a shim, an init and its command's processes: corrald
    refuses starts beyond these (`resource_exhausted`) rather than fork
    without bound. Jobs adopted at a restart count too.
    """

    max_jobs: int | None = MAX_JOBS
    max_jobs_per_owner: int | None = MAX_JOBS_PER_OWNER


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


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


def _ended_at(job: Job) -> int:
    """When the job ended (ns since the epoch), or was created if unrecorded."""
    return job.status.finished_at or job.spec.created_at


def _log_size(job: Job) -> int:
    try:
        return (job.directory / OUTPUT_FILE).stat().st_size
    except OSError:
        return 0


def _shim_of(directory: Path) -> int | None:
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


def _shim_alive(pid: int | None) -> int | None:
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


def _recorded_end(directory: Path) -> bool:
    """Whether the job's status file records its end."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        status = read_status(directory)
        return status is not None and status.state.finished
    return False


class JobManager:
    """Jobs in a state directory, run through a spawner. An async context manager."""

    def __init__(
        self,
        state_dir: Path,
        *,
        spawner: Spawner | None = None,
        flavour: Flavour | None = None,
        cgroup_root: Path = CGROUP_ROOT,
        cgroup_parent: str | None = None,
        default_limits: Limits | None = None,
        warm: int = 1,
        retention: Retention | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.jobs_dir = state_dir / "jobs"
        self.flavour = flavour or detect_flavour()
        self.cgroup_root = cgroup_root
        try:  # None: the state directory's own (see corral.worker.cgroup_parent)
            self.cgroup_parent = cgroup_parent or default_parent(state_dir)
        except ParentError as exc:
            raise JobError(ErrorCode.FAILED_PRECONDITION, str(exc)) from None
        self._sandboxes = SandboxRecords(state_dir)
        self._refusing: str | None = None  # why starts are refused, once they are
        self.default_limits = default_limits or Limits()
        self._spawner = spawner
        self._own_spawner = spawner is None
        self.spawner_restarts = 0
        self.retention = retention or Retention()
        self.admission = admission or Admission()
        self._active: collections.Counter[str] = collections.Counter()  # by owner
        self._retention_changed = trio.Event()  # a job ended: the next expiry may be sooner
        self._jobs: dict[str, Job] = {}
        self._devices: list[tuple[int, int]] = []
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None
        # Sandboxes built ahead of the next starts (init jailed and in its
        # cgroup), by the job ids they are for: a start takes one and only
        # fills the job in.
        self.warm = warm
        self._warm: list[str] = []
        self._warming = False
        self._output: OutputWatcher | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.flavour is Flavour.NONE:
            raise JobError(ErrorCode.FAILED_PRECONDITION, "no cgroup hierarchy is mounted")
        try:
            check_host(self.flavour, self.cgroup_root)
            # A bad parent name fails here, not at the first job.
            open_cgroup(self.flavour, "probe", self.cgroup_root, self.cgroup_parent)
        except CgroupError as exc:
            raise JobError(ErrorCode.FAILED_PRECONDITION, str(exc)) from None
        if self.warm < 0:
            raise JobError(ErrorCode.INVALID_ARGUMENT, f"warm must be 0 or more, not {self.warm}")
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            previous = record_parent(self.state_dir, self.cgroup_parent)
        except OSError as exc:  # the next run may choose another default; say so
            log.warning("cannot record the cgroup parent %s: %s", self.cgroup_parent, exc)
        else:
            if previous not in (None, self.cgroup_parent):
                log.warning(
                    "cgroup parent %s replaces %s: jobs started before keep their cgroups there",
                    self.cgroup_parent,
                    previous,
                )
        self._devices = disk_devices([self.state_dir, Path("/")])
        if self._spawner is None:
            self._spawner = Spawner.start()
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._output = OutputWatcher()
        self._nursery.start_soon(self._output.run)
        self._nursery.start_soon(self._supervise_spawner)
        self._load()
        await trio.to_thread.run_sync(self._sweep_sandboxes)
        self._nursery.start_soon(self._warm_up)
        if self.retention.bounded:
            self._nursery.start_soon(self._retain)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return bool(await self._nursery_manager.__aexit__(kind, value, traceback))
        finally:
            if self._own_spawner and self._spawner is not None:
                self._spawner.close()

    def _load(self) -> None:
        """Index the jobs already in the state directory; watch live shims
        again (and log how many), and have those whose shim is gone marked lost."""
        adopted = lost = 0
        for directory in sorted(self.jobs_dir.iterdir()):
            try:
                spec = read_spec(directory)
                status = read_status(directory) or Status(state=State.STARTING)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("skipping job directory %s: %s", directory, exc)
                continue
            job = Job(spec=spec, status=status, directory=directory)
            job.started.set()
            self._jobs[spec.id] = job
            if status.state.finished:
                job.done.set()
                continue
            self._active[spec.owner] += 1
            # A corrald killed just after writing "starting" left no shim pid:
            # the shim may live on all the same; find it by its job directory.
            pidfd = _shim_alive(status.shim_pid or _shim_of(directory))
            adopted += pidfd is not None
            lost += pidfd is None and not _recorded_end(directory)  # it may have just ended
            assert self._nursery is not None
            self._nursery.start_soon(self._watch, job, pidfd)
        lost_note = f"; {_jobs(lost)} lost (shim gone without recording an end)" if lost else ""
        log.info("adopted %d running jobs%s", adopted, lost_note)

    async def _supervise_spawner(self) -> None:
        """Start a new spawner whenever the spawner dies.

        Running jobs do not need it (their shims are on their own); starts
        do. Starts in flight when it dies fail `unavailable`; the sandboxes
        it had built ahead died with it (their death signal is its) and
        their cgroups are swept. One that keeps dying is restarted less
        and less often, up to every SPAWNER_BACKOFF_MAX seconds.
        """
        failures = 0
        while True:
            spawner = self._spawner
            assert spawner is not None
            began = trio.current_time()
            pidfd = os.pidfd_open(spawner.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
            spawner.close()  # reaps it
            log.warning(
                "the spawner (pid %d) died with status %s; starting a new one",
                spawner.pid,
                spawner.process.returncode,
            )
            self._warm.clear()
            await trio.to_thread.run_sync(self._sweep_sandboxes)
            failures = failures + 1 if trio.current_time() - began < SPAWNER_STEADY else 1
            while True:
                await trio.sleep(min(SPAWNER_BACKOFF * 2 ** (failures - 1), SPAWNER_BACKOFF_MAX))
                try:
                    self._spawner = Spawner.start()
                    break
                except SpawnerError as exc:
                    log.warning("%s; trying again", exc)
                    failures += 1
            self._own_spawner = True  # the replacement is ours to close
            self.spawner_restarts += 1
            log.info("new spawner: pid %d", self._spawner.pid)
            assert self._nursery is not None
            self._nursery.start_soon(self._warm_up)

    def _sweep_sandboxes(self) -> None:
        """Remove the sandboxes this manager recorded that never became jobs."""
        building = list(self._warm)
        self._sandboxes.sweep(self.flavour, self.cgroup_root, self.cgroup_parent, building=building)

    async def _warm_up(self) -> None:
        """Keep `warm` sandboxes built ahead of the next starts."""
        if self._warming or self._spawner is None:
            return
        self._warming = True
        try:
            while len(self._warm) < self.warm:
                job_id = new_job_id()
                try:  # before it exists, so that a later sweep may remove it
                    self._sandboxes.record(job_id)
                except OSError as exc:
                    log.warning("cannot record a sandbox, so none is built ahead: %s", exc)
                    return
                self._warm.append(job_id)
                try:
                    await self._spawner.prepare(self._spawn_request(job_id))
                except SpawnerError as exc:
                    # Its record stays: the sweep after a dead spawner takes it.
                    log.warning("cannot build a sandbox ahead of a start: %s", exc)
                    with contextlib.suppress(ValueError):
                        self._warm.remove(job_id)
                    return
        finally:
            self._warming = False

    @property
    def spawner_pid(self) -> int | None:
        return self._spawner.pid if self._spawner is not None else None

    @property
    def warm_ids(self) -> tuple[str, ...]:
        """The job ids sandboxes are built (or being built) for."""
        return tuple(self._warm)

    def _spawn_request(self, job_id: str) -> dict[str, Any]:
        return {
            "id": job_id,
            "flavour": str(self.flavour),
            "cgroup_root": str(self.cgroup_root),
            "cgroup_parent": self.cgroup_parent,
            "devices": [list(device) for device in self._devices],
        }

    # -- lookup ----------------------------------------------------------------------

    def resolve(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job with this id or unique id prefix; JobError otherwise.

        With `owner`, only that owner's jobs are candidates: another owner's
        job is not found, exactly like a job that does not exist.
        """
        exact = self._jobs.get(job_id)
        if exact is not None and (owner is None or exact.spec.owner == owner):
            return exact  # the usual case, without a scan of every job
        matches = [job for job in self._owned(owner) if job_id and job.id.startswith(job_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:  # the id is the caller's: quoted, but cut short
            raise JobError(ErrorCode.NOT_FOUND, f"no job {shorten(job_id)}")
        shown = ", ".join(sorted(job.short_id for job in matches)[:10])
        raise JobError(
            ErrorCode.INVALID_ARGUMENT,
            f"job id prefix {job_id!r} is ambiguous: it matches {shown}; give more of the id",
        )

    @property
    def devices(self) -> list[tuple[int, int]]:
        """The disks (MAJ, MIN) IO limits apply to: those behind the state
        directory and the root filesystem."""
        return list(self._devices)

    def jobs(self, *, owner: str | None = None) -> list[Job]:
        """Every job (with `owner`, that owner's), oldest first."""
        return sorted(self._owned(owner), key=lambda job: (job.spec.created_at, job.id))

    def _owned(self, owner: str | None) -> list[Job]:
        return [job for job in self._jobs.values() if owner is None or job.spec.owner == owner]

    # -- start -------------------------------------------------------------------------

    async def start(self, spec: JobSpec) -> Job:
        """Start a job and return once its command is running.

        Raises JobError: invalid_argument for a bad spec, or a command that
        cannot be found; failed_precondition or internal when it could not
        start; unavailable once starts are refused. A job that failed to
        start stays recorded as `failed`, and the error's `job_id` names it.
        """
        try:
            resolved = spec.validate()
        except SpecError as exc:
            raise JobError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        self._admit(resolved.owner)
        warm = bool(self._warm)
        job_id = self._warm.pop(0) if warm else new_job_id()
        resolved = replace(
            resolved,
            id=job_id,
            created_at=time.time_ns(),
            limits=self.default_limits.merged(resolved.limits),
        )
        directory = self._make_job_directory(resolved, warm=warm)
        job = Job(spec=resolved, status=Status(state=State.STARTING), directory=directory)
        self._jobs[job_id] = job
        self._active[resolved.owner] += 1  # no checkpoint since _admit

        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        request = {**self._spawn_request(job_id), "job_dir": str(directory)}
        try:
            assert self._spawner is not None
            # Shielded up to the watcher: once a shim exists it must be
            # watched, or a cancelled start leaves a job nobody can stop.
            with trio.CancelScope(shield=True):
                _, pidfd = await self._spawner.spawn(request, report_w)
                assert self._nursery is not None
                self._nursery.start_soon(self._watch, job, pidfd)
        except SpawnerError as exc:
            os.close(report_r)
            with trio.CancelScope(shield=True):  # a recorded failure, even if cancelled
                await self._fail(job, "spawn", str(exc))
            job.started.set()
            message = f"cannot start the job: {exc}"
            raise JobError(ErrorCode.UNAVAILABLE, message, job_id=job.id) from None
        finally:
            os.close(report_w)
        try:
            report = await self._read_report(report_r)
        finally:
            job.started.set()
            assert self._nursery is not None
            self._nursery.start_soon(self._warm_up)  # after this start: it had the CPU first
        if report.get("ok"):
            # The job may have ended already (its watcher took the end): then
            # this earlier report changes nothing.
            try:
                job.advance(Status.from_wire(report["status"]))
            except (KeyError, TypeError, ValueError):
                job.advance(read_status(directory) or job.status)
            return job
        await job.done.wait()  # the shim has recorded the failure and is gone
        code = ErrorCode(report.get("code", "internal"))
        message = str(report.get("message", "the job could not start"))
        raise JobError(code, message, job_id=job.id)

    def _make_job_directory(self, spec: ResolvedSpec, *, warm: bool) -> Path:
        """The job's directory with its spec and first status.

        JobError if they cannot be written (resource_exhausted when the disk
        is full); then nothing is left, and a sandbox built ahead for this id
        waits for the next start.
        """
        directory = self.jobs_dir / spec.id
        try:
            directory.mkdir(mode=0o700)
            write_atomically(directory / SPEC_FILE, pack(spec.to_wire()), durable=False)
            write_status(directory, Status(state=State.STARTING, reason="starting"))
        except OSError as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(directory)
            if warm:
                self._warm.insert(0, spec.id)
            code = ErrorCode.RESOURCE_EXHAUSTED if exc.errno in FULL_ERRNOS else ErrorCode.INTERNAL
            raise JobError(
                code, f"cannot record the job in corrald's state directory: {exc.strerror}"
            ) from None
        if warm:
            self._sandboxes.drop(spec.id)  # its job directory says it is ours now
        return directory

    def _admit(self, owner: str) -> None:
        """Refuse a start beyond the caps on jobs starting or running, or
        once starts are refused."""
        if self._refusing is not None:
            raise JobError(ErrorCode.UNAVAILABLE, self._refusing)
        limit = self.admission.max_jobs
        if limit is not None and self.running() >= limit:
            raise JobError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"corrald has {_jobs(limit)} starting or running, its maximum; "
                "try again when one has ended",
            )
        limit = self.admission.max_jobs_per_owner
        if limit is not None and self._active[owner] >= limit:
            raise JobError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{owner or 'this owner'} has {_jobs(limit)} starting or running, "
                "the most one user may have; wait for one to end, or stop one",
            )

    def _finish(self, job: Job, status: Status) -> None:
        """Record the job's end, once: it frees the job's slot and wakes its
        waiters. A second end (there should be none) changes nothing."""
        if job.done.is_set():
            log.warning("job %s: a second end ignored: %s", job.short_id, status.reason)
            return
        job.advance(status)
        job.started.set()
        job.done.set()
        self._active[job.spec.owner] -= 1
        if not self._active[job.spec.owner]:
            del self._active[job.spec.owner]

    def running(self, owner: str | None = None) -> int:
        """Jobs starting or running (with `owner`, that owner's)."""
        if owner is not None:
            return self._active[owner]
        return sum(self._active.values())

    async def _read_report(self, fd: int) -> dict[str, Any]:
        """The shim's one report: started, or why not. EOF first means it died."""
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 16)
        async with trio.lowlevel.FdStream(fd) as stream:
            with trio.move_on_after(START_TIMEOUT):
                while data := await stream.receive_some(4096):
                    unpacker.feed(data)
                    for report in unpacker:
                        if isinstance(report, dict):
                            return report
                return {
                    "ok": False,
                    "code": "internal",
                    "message": "the shim died while starting the job",
                }
        return {
            "ok": False,
            "code": "internal",
            "message": f"the shim did not report in {START_TIMEOUT:g} s",
        }

    async def _fail(self, job: Job, step: str, message: str) -> None:
        status = Status(
            state=State.FAILED, reason=message, failed_step=step, finished_at=time.time_ns()
        )
        # A final status is flushed to disk: never on the event loop.
        try:
            await trio.to_thread.run_sync(write_status, job.directory, status)
        except OSError as exc:  # a full disk must not take corrald down
            log.warning("job %s: cannot record its failure: %s", job.short_id, exc)
        self._finish(job, status)

    # -- watching shims --------------------------------------------------------------

    async def _watch(self, job: Job, pidfd: int | None) -> None:
        """Wait for the job's shim to end, then take its recorded status."""
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
        if self._output is not None:
            self._output.notify(job.id)  # followers: the output is complete
        self._retention_changed.set()

    async def _lost(self, job: Job, last: Status | None) -> Status:
        """The shim vanished without recording an end: kill what is left, say so."""
        cgroup = open_cgroup(self.flavour, job.id, root=self.cgroup_root, parent=self.cgroup_parent)
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
        try:
            await trio.to_thread.run_sync(write_status, job.directory, status)
        except OSError as exc:  # a full disk must not take corrald down
            log.warning("job %s: cannot record that it was lost: %s", job.short_id, exc)
        log.warning("job %s %s", job.short_id, reason)
        return status

    # -- retention -----------------------------------------------------------------

    async def _retain(self) -> None:
        """Remove finished jobs beyond the retention bounds, oldest first: now,
        whenever a job ends, and when the oldest reaches the age bound (a
        deadline, not a poll)."""
        while True:
            self._retention_changed = trio.Event()
            for job in self._beyond_retention():
                log.info("removing job %s: beyond the retention bounds", job.short_id)
                try:
                    await self.remove(job.id)
                except (JobError, OSError) as exc:
                    log.warning("cannot remove job %s: %s", job.short_id, exc)
            with trio.move_on_at(self._next_expiry()):
                await self._retention_changed.wait()

    def _finished_oldest_first(self) -> list[Job]:
        finished = [job for job in self._jobs.values() if job.done.is_set()]
        return sorted(finished, key=lambda job: (_ended_at(job), job.id))

    def _beyond_retention(self) -> list[Job]:
        finished = self._finished_oldest_first()
        bounds = self.retention
        doomed: list[Job] = []
        if bounds.age is not None:
            oldest_kept = time.time_ns() - int(bounds.age * 1e9)
            doomed += [job for job in finished if _ended_at(job) <= oldest_kept]
        if bounds.count is not None:
            doomed += finished[: max(0, len(finished) - bounds.count)]
        if bounds.log_bytes is not None:
            sizes = [(job, _log_size(job)) for job in finished]
            total = sum(size for _, size in sizes)
            for job, size in sizes:
                if total <= bounds.log_bytes:
                    break
                doomed.append(job)
                total -= size
        return list(dict.fromkeys(doomed))  # each once, oldest first as found

    def _next_expiry(self) -> float:
        """The trio time at which the oldest finished job outlives the age bound."""
        finished = self._finished_oldest_first()
        if self.retention.age is None or not finished:
            return math.inf
        expires_ns = _ended_at(finished[0]) + int(self.retention.age * 1e9)
        return trio.current_time() + max(0.0, (expires_ns - time.time_ns()) / 1e9)

    # -- talking to a shim ----------------------------------------------------------

    async def _ask_shim(self, job: Job, request: dict[str, Any]) -> dict[str, Any] | None:
        """One exchange with the job's shim; None if it is gone."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with sock, trio.move_on_after(SHIM_TIMEOUT):
            try:
                with socket_path(job.directory) as address:
                    await sock.connect(address)
                await sock.send(pack(request))
                reply = await sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno in {errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE}:
                    return None
                raise JobError(ErrorCode.INTERNAL, f"cannot reach the job's shim: {exc}") from exc
            return unpack(reply) if reply else None
        raise JobError(ErrorCode.INTERNAL, f"the job's shim did not answer in {SHIM_TIMEOUT:g} s")

    # -- output -------------------------------------------------------------------

    def open_output(self, job_id: str, offset: int = 0) -> OutputReader:
        """A reader of the job's output.log from `offset` (a context manager).

        `await reader.read(size, follow=...)` returns the next bytes of the log
        (msgpack records; `corral.job.RecordDecoder` decodes them), b"" at the end.
        """
        job = self.resolve(job_id)
        if offset < 0:
            raise JobError(ErrorCode.INVALID_ARGUMENT, "offset: must be zero or more")
        assert self._output is not None
        return OutputReader(self._output, job.id, job.directory, offset, job.done)

    async def output(
        self, job_id: str, *, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[bytes]:
        """The raw bytes of the job's output.log from `offset`: to its current
        end, or with `follow` until the job has ended and all was read."""
        with self.open_output(job_id, offset) as reader:
            while data := await reader.read(follow=follow):
                yield data

    @property
    def followed(self) -> int:
        """How many jobs have readers now (each holds one inotify watch)."""
        return self._output.watched if self._output is not None else 0

    def is_followed(self, job_id: str) -> bool:
        """Whether the job has output readers now."""
        return self._output is not None and self._output.watches(job_id)

    # -- operations ------------------------------------------------------------------

    async def status(self, job_id: str) -> tuple[Job, Status]:
        """The job and its status, with live usage while it runs."""
        job = self.resolve(job_id)
        # A job adopted while "starting" (its shim's pid unrecorded) has a shim to ask.
        live = job.status.state is State.RUNNING or (
            job.status.state is State.STARTING and job.started.is_set()
        )
        if not job.done.is_set() and live:
            reply = await self._ask_shim(job, {"op": "status"})
            if reply and reply.get("ok"):
                return job, Status.from_wire(reply["status"])
        if job.done.is_set():
            return job, job.status
        return job, read_status(job.directory) or job.status

    async def stop(self, job_id: str, grace: float = 10.0, *, by: str = "") -> Status:
        """Stop the job: SIGTERM, then after `grace` seconds SIGKILL to all of it.

        Returns the final status once the job has ended. Stopping a job that
        has ended is failed_precondition; stopping twice is safe.
        """
        if not (isinstance(grace, int | float) and math.isfinite(grace) and 0 <= grace <= 3600):
            raise JobError(ErrorCode.INVALID_ARGUMENT, "grace: must be between 0 and 3600 seconds")
        job = self.resolve(job_id)
        if job.done.is_set():
            raise JobError(
                ErrorCode.FAILED_PRECONDITION,
                f"job {job.short_id} has already ended ({job.status.reason})",
            )
        await job.started.wait()  # a stop racing start waits for the shim's report
        if not job.done.is_set():
            await self._ask_shim(job, {"op": "stop", "grace": float(grace), "by": by})
        await job.done.wait()
        return job.status

    def refuse_starts(self, reason: str) -> None:
        """From now on refuse every start (`unavailable`, saying `reason`), so
        the jobs running now are all there will be (corrald shutting down)."""
        self._refusing = reason

    async def stop_all(self, *, by: str, grace: float | None = None) -> int:
        """Stop every job still running, all at once, each with its own stop
        grace (or `grace`); return once all have ended, with how many there were."""
        running = [job for job in self._jobs.values() if not job.done.is_set()]

        async def stop(job: Job) -> None:
            with contextlib.suppress(JobError):  # it ended meanwhile
                await self.stop(job.id, job.spec.stop_grace if grace is None else grace, by=by)

        async with trio.open_nursery() as nursery:
            for job in running:
                nursery.start_soon(stop, job)
        return len(running)

    async def wait(self, job_id: str) -> Status:
        job = self.resolve(job_id)
        await job.done.wait()
        return job.status

    async def remove(self, job_id: str) -> None:
        """Forget a finished job and delete its files."""
        job = self.resolve(job_id)
        if not job.done.is_set():
            raise JobError(
                ErrorCode.FAILED_PRECONDITION, f"job {job.short_id} is running; stop it first"
            )
        del self._jobs[job.id]
        await trio.to_thread.run_sync(shutil.rmtree, job.directory)


__all__ = ["Job", "JobError", "JobManager"]

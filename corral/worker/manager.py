"""The job library: start, stop, inspect, wait for and remove jobs, from trio.

    async with open_job_manager(Path("/var/lib/corral")) as jobs:
        job = await jobs.start(JobSpec(argv=["echo", "hello"], owner="alice"))
        status = await jobs.wait(job.id)

Theory of operation. The state directory is the truth: `jobs/<id>/` holds
the spec, the status and the output, and the job's shim (a separate
process, made by the spawner) owns the job and writes its status. The
manager keeps an index of jobs in memory (`corral.worker.index`), one
watcher task per live shim (awaiting the shim's pidfd: no polling), and
talks to a shim over its unix socket for `status` and `stop`. When a shim
ends, its watcher reads the status it left; a shim that died without one
leaves a `lost` job, whose cgroup the watcher removes.

This module reads in the order a job lives: the manager is opened (its
pieces: the spawner and its warm sandboxes, `corral.worker.spawner_pool`;
the jobs a previous corrald left, `corral.worker.recovery`; the caps,
`corral.worker.admission`; the uids jobs run as, `corral.worker.uid_pool`;
the retention bounds,
`corral.worker.retention`), a job is admitted, recorded and spawned, its
shim is watched until it ends, it is asked about, stopped, waited for, and
removed.

A job's status only moves forward (`Job.advance`): starting, running, then
one end, which nothing replaces; the watcher may record the end before the
start that made the job has taken the shim's "running" report. The manager
removes only cgroups it can prove are its own: its jobs', and the sandboxes
it recorded before building them (`corral.worker.sandboxes`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from corral import ipc
from corral.directories import make_directories
from corral.errors import OperationError
from corral.identity import USER, Identity
from corral.job import (
    DEFAULT_STOP_GRACE,
    JobSpec,
    Limits,
    State,
    Status,
    check_grace,
    check_tty_size,
)
from corral.protocol.errors import ErrorCode
from corral.shim.cgroup import (
    CgroupError,
    Flavour,
    check_host,
    detect_flavour,
    disk_devices,
    open_cgroup,
    slice_name,
)
from corral.store import (
    read_status,
)
from corral.worker import job_input, recovery, shim_link
from corral.worker.admission import MAX_JOBS, MAX_JOBS_PER_OWNER, Admission, Slots
from corral.worker.cgroup_parent import ParentError, default_parent, record_parent
from corral.worker.ends import Ends
from corral.worker.index import Job, JobIndex
from corral.worker.output import OutputReader, OutputWatcher
from corral.worker.retention import Retainer, Retention
from corral.worker.sandboxes import SandboxRecords
from corral.worker.spawner import Spawner, SpawnerError
from corral.worker.spawner_pool import SpawnerPool
from corral.worker.starts import Starts
from corral.worker.uid_pool import UidPool, UidRange

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_TIMEOUT = 10.0  # for one status or stop exchange with a shim


def _created(job: Job) -> int:
    return job.spec.created_at


@dataclass(frozen=True, slots=True)
class _Running:
    """What exists only while the manager runs: the spawner pool, the
    output watcher, the shims' watchers and the starts that feed them."""

    pool: SpawnerPool
    output: OutputWatcher
    ends: Ends
    starts: Starts


@contextlib.asynccontextmanager
async def open_job_manager(
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
    uid_range: UidRange | None = None,
) -> AsyncIterator[JobManager]:
    """A running job manager on `state_dir`, for the body of the `async with`.

    `spawner`: one started before trio (corrald's), left to the caller to
    close; None starts one, closed on the way out. `flavour` (detected if
    None), `cgroup_root` and `cgroup_parent` (None: the state directory's
    own, see corral.worker.cgroup_parent) say where jobs' cgroups go.
    `warm` sandboxes are kept built ahead of the next starts.

    The manager is handed out fully running: jobs found in the state
    directory adopted, its sandboxes swept, its spawner up. If any of that
    fails, what was started is torn down (the spawner too, if it is ours)
    and OperationError says why: failed_precondition for a host or a
    cgroup parent jobs cannot run on, invalid_argument for a bad `warm`,
    unavailable when no spawner can be started. On the way out every task
    of the manager ends; running jobs do not (their shims outlive it).
    """
    manager = JobManager(
        state_dir,
        spawner=spawner,
        flavour=flavour,
        cgroup_root=cgroup_root,
        cgroup_parent=cgroup_parent,
        default_limits=default_limits,
        warm=warm,
        retention=retention,
        admission=admission,
        uid_range=uid_range,
    )
    async with manager._run() as running:
        yield running


class JobManager:
    """Jobs in a state directory, run through a spawner.

    Made by `open_job_manager`. (`async with JobManager(...)` is the same,
    for callers that need the object before it runs; its operations raise
    `unavailable` until it does.)
    """

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
        uid_range: UidRange | None = None,
    ) -> None:
        """Touches nothing. Raises OperationError failed_precondition if the
        state directory's recorded cgroup parent cannot be read."""
        self.state_dir = state_dir
        self.jobs_dir = state_dir / "jobs"
        self.flavour = flavour or detect_flavour()
        self.cgroup_root = cgroup_root
        try:  # None: the state directory's own (see corral.worker.cgroup_parent)
            self.cgroup_parent = cgroup_parent or default_parent(state_dir)
        except ParentError as exc:
            raise OperationError(ErrorCode.FAILED_PRECONDITION, str(exc)) from None
        self.default_limits = default_limits or Limits()
        self.warm = warm
        self.retention = retention or Retention()
        self.admission = admission or Admission()
        self._spawner = spawner
        self._sandboxes = SandboxRecords(state_dir)
        self._index = JobIndex()
        # Ends recorded since corrald started, by outcome (`Ends.tally`).
        self.ended: collections.Counter[str] = collections.Counter()
        self._slots = Slots(self.admission)
        self.uids = UidPool(uid_range or UidRange())
        self._retainer = Retainer(self.retention, self._index)
        self._devices: list[tuple[int, int]] = []
        self._live: _Running | None = None
        self._entered: contextlib.AbstractAsyncContextManager[Self] | None = None

    # -- opening -----------------------------------------------------------------------

    def _prepare(self) -> None:
        """Check the host and the parent, then make the jobs directory and
        record the parent. Raises OperationError (see open_job_manager)."""
        if self.flavour is Flavour.NONE:
            raise OperationError(ErrorCode.FAILED_PRECONDITION, "no cgroup hierarchy is mounted")
        try:
            check_host(self.flavour, self.cgroup_root)
            # A bad parent name fails here, not at the first job.
            open_cgroup(self.flavour, "probe", self.cgroup_root, self.cgroup_parent)
        except CgroupError as exc:
            raise OperationError(ErrorCode.FAILED_PRECONDITION, str(exc)) from None
        if self.warm < 0:
            raise OperationError(
                ErrorCode.INVALID_ARGUMENT, f"warm must be 0 or more, not {self.warm}"
            )
        make_directories(self.jobs_dir, 0o700)
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

    # Theory of operation. The nursery is this generator's: it is open
    # exactly while the manager is handed out. Every piece that runs is a
    # task in it, started in order (output watcher, spawner pool, which
    # reports started once its spawner is up and its sandboxes swept, then
    # a watcher per adopted job, then retention). Whatever fails on the way
    # in, or ends the body, leaves through the nursery: its tasks are
    # cancelled and the pool's `finally` closes a spawner it started. A
    # failure on the way in is raised after the nursery has closed, as it
    # was, so callers catch OperationError rather than a group.
    @contextlib.asynccontextmanager
    async def _run(self) -> AsyncIterator[Self]:
        if self._live is not None or self._entered is not None:
            raise RuntimeError("this job manager is running already")
        self._prepare()
        pool = SpawnerPool(
            self._sandboxes,
            flavour=self.flavour,
            cgroup_root=self.cgroup_root,
            cgroup_parent=self.cgroup_parent,
            devices=self._devices,
            warm=self.warm,
            spawner=self._spawner,
        )
        failure: OperationError | None = None
        async with trio.open_nursery() as nursery:
            output = OutputWatcher()
            nursery.start_soon(output.run)
            try:
                await nursery.start(pool.run)
            except SpawnerError as exc:
                failure = OperationError(ErrorCode.UNAVAILABLE, str(exc))
                nursery.cancel_scope.cancel()
            else:
                ends = Ends(
                    nursery,
                    index=self._index,
                    slots=self._slots,
                    uids=self.uids,
                    retainer=self._retainer,
                    output=output,
                    flavour=self.flavour,
                    cgroup_root=self.cgroup_root,
                    cgroup_parent=self.cgroup_parent,
                    tally=self.ended,
                )
                starts = Starts(
                    self.jobs_dir,
                    index=self._index,
                    slots=self._slots,
                    uids=self.uids,
                    pool=pool,
                    ends=ends,
                    sandboxes=self._sandboxes,
                    default_limits=self.default_limits,
                )
                self._live = _Running(pool, output, ends, starts)
                try:
                    self._adopt()
                    # Sandboxes built ahead are in an owner's slice: until a
                    # start says whose, the owner of the newest job's.
                    newest = max(self._index.jobs(), key=_created, default=None)
                    owner = newest.spec.owned_by if newest else Identity("", USER)
                    pool.aim(slice_name(owner), None)
                    nursery.start_soon(self._retainer.run, self.remove)
                    yield self
                finally:
                    self._live = None
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def __aenter__(self) -> Self:
        entered = self._run()
        running = await entered.__aenter__()
        self._entered = entered
        return running

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        entered, self._entered = self._entered, None
        assert entered is not None, "__aexit__ without __aenter__"
        return await entered.__aexit__(kind, value, traceback)

    def _adopt(self) -> None:
        """Index the jobs already in the state directory; watch live shims
        again, and have those whose shim is gone marked lost."""
        live = self._running()
        for found in recovery.load(self.jobs_dir):
            self._index.add(found.job)
            if not found.job.done.is_set():
                self._slots.take(found.job.spec.owned_by)
                uid = found.job.spec.uid
                if uid is not None and not self.uids.hold(uid):
                    log.warning(
                        "job %s runs as uid %d, outside --uid-range %s or another's: "
                        "it is not counted in the pool",
                        found.job.short_id,
                        uid,
                        self.uids.range,
                    )
                live.ends.watch(found.job, found.pidfd)

    def _running(self) -> _Running:
        """The running parts; OperationError unavailable if the manager is not running."""
        if self._live is None:
            raise OperationError(ErrorCode.UNAVAILABLE, "the job manager is not running")
        return self._live

    # -- what it holds -----------------------------------------------------------------

    def resolve(self, job_id: str, *, owner: Identity | None = None) -> Job:
        """The job with this id or unique id prefix; OperationError otherwise.

        With `owner`, only that owner's jobs are candidates: another owner's
        job is not found, exactly like a job that does not exist.
        """
        return self._index.resolve(job_id, owner=owner)

    def jobs(self, *, owner: Identity | None = None) -> list[Job]:
        """Every job (with `owner`, that owner's), oldest first."""
        return self._index.jobs(owner=owner)

    def running(self, owner: Identity | None = None) -> int:
        """Jobs starting or running (with `owner`, that owner's)."""
        return self._slots.running(owner)

    @property
    def devices(self) -> list[tuple[int, int]]:
        """The disks (MAJ, MIN) IO limits apply to: those behind the state
        directory and the root filesystem."""
        return list(self._devices)

    @property
    def spawner_pid(self) -> int | None:
        return self._live.pool.pid if self._live is not None else None

    @property
    def spawner_restarts(self) -> int:
        return self._live.pool.restarts if self._live is not None else 0

    @property
    def warm_ids(self) -> tuple[str, ...]:
        """The job ids sandboxes are built (or being built) for."""
        return self._live.pool.warm_ids if self._live is not None else ()

    # -- start -------------------------------------------------------------------------

    def refuse_starts(self, reason: str) -> None:
        """From now on refuse every start (`unavailable`, saying `reason`), so
        the jobs running now are all there will be (corrald shutting down)."""
        self._slots.refuse_all(reason)

    async def start(self, spec: JobSpec, *, quota: Limits | None = None) -> Job:
        """Start a job and return once its command is running (see
        `corral.worker.starts`), in its owner's slice, limited to `quota`
        (what all the owner's jobs together may use; None: no limit).

        Raises OperationError: invalid_argument for a bad spec, or a command that
        cannot be found; resource_exhausted beyond the admission caps;
        failed_precondition or internal when it could not start; unavailable
        once starts are refused, or when the spawner failed or the manager is
        not running. A job that failed to start stays recorded as `failed`,
        and the error's `job_id` names it.
        """
        return await self._running().starts.start(spec, quota or Limits())

    # -- asking a running job ------------------------------------------------------------

    async def status(self, job_id: str) -> tuple[Job, Status]:
        """The job and its status, with live usage while it runs."""
        job = self.resolve(job_id)
        # A job adopted while "starting" (its shim's pid unrecorded) has a shim to ask.
        live = job.status.state is State.RUNNING or (
            job.status.state is State.STARTING and job.started.is_set()
        )
        if not job.done.is_set() and live:
            try:
                reply = await shim_link.ask_shim(job.directory, ipc.StatusRequest(), SHIM_TIMEOUT)
            except shim_link.ShimVersionError as exc:
                log.warning(
                    "job %s: %s; answering with its last recorded status", job.short_id, exc
                )
                reply = None
            if isinstance(reply, ipc.StatusReply):
                return job, reply.status
        if job.done.is_set():
            return job, job.status
        return job, read_status(job.directory) or job.status

    def open_output(self, job_id: str, offset: int = 0) -> OutputReader:
        """A reader of the job's output.log from `offset` (a context manager).

        `await reader.read(size, follow=...)` returns the next bytes of the log
        (msgpack records; `corral.records.RecordDecoder` decodes them), b"" at the end.
        Raises OperationError: not_found, invalid_argument for a negative
        offset, unavailable if the manager is not running.
        """
        job = self.resolve(job_id)
        if offset < 0:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, "offset: must be zero or more")
        return OutputReader(self._running().output, job.id, job.directory, offset, job.done)

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
        return self._live.output.watched if self._live is not None else 0

    def is_followed(self, job_id: str) -> bool:
        """Whether the job has output readers now."""
        return self._live is not None and self._live.output.watches(job_id)

    # -- its input ---------------------------------------------------------------------

    async def open_input(self, job_id: str) -> job_input.ShimInput:
        """A new writer of the job's input (see `job_input.ShimInput`).

        Raises OperationError: not_found; failed_precondition when the job
        takes no input (started without stdin), has closed its stdin or
        has ended; internal when its shim does not answer."""
        without = "takes no input: it was started without -i"
        job = await self._running_with(job_id, "stdin", without)
        return await job_input.open_input(job.directory, job.id)

    async def resize(self, job_id: str, columns: int, rows: int) -> None:
        """Give the job's terminal a new size, columns by rows (it gets SIGWINCH).

        Raises OperationError: not_found; invalid_argument for a size out of
        bounds; failed_precondition when the job has no terminal or has ended."""
        job = self.resolve(job_id)
        columns, rows = check_tty_size([columns, rows], "size")
        without = "has no terminal: it was started without -t"
        await self._running_with(job.id, "tty", without)
        await job_input.resize(job.directory, job.id, columns, rows)

    async def _running_with(self, job_id: str, feature: str, without: str) -> Job:
        """The job, once its start is known, if its spec has `feature` (stdin
        or tty) and it has not ended; failed_precondition saying which not."""
        job = self.resolve(job_id)
        if not getattr(job.spec, feature):
            raise OperationError(ErrorCode.FAILED_PRECONDITION, f"job {job.short_id} {without}")
        if job.done.is_set():
            raise job_input.ended(job.id)
        await job.started.wait()
        return job

    # -- its end -----------------------------------------------------------------------

    async def stop(self, job_id: str, grace: float = DEFAULT_STOP_GRACE, *, by: str = "") -> Status:
        """Stop the job: SIGTERM, then after `grace` seconds SIGKILL to all of it.

        Returns the final status once the job has ended. Stopping a job that
        has ended is failed_precondition; stopping twice is safe.
        """
        grace = check_grace(grace)
        job = self.resolve(job_id)
        if job.done.is_set():
            raise OperationError(
                ErrorCode.FAILED_PRECONDITION,
                f"job {job.short_id} has already ended ({job.status.reason})",
            )
        await job.started.wait()  # a stop racing start waits for the shim's report
        if not job.done.is_set():
            # A shim of another version is asked nothing (ShimVersionError,
            # failed_precondition: the job is left running).
            stop = ipc.StopRequest(grace=float(grace), by=by)
            await shim_link.ask_shim(job.directory, stop, SHIM_TIMEOUT)
        await job.done.wait()
        return job.status

    async def stop_all(self, *, by: str, grace: float | None = None) -> int:
        """Stop every job still running, all at once, each with its own stop
        grace (or `grace`); return once all have ended, with how many there were."""
        running = self._index.unfinished()

        async def stop(job: Job) -> None:
            with contextlib.suppress(OperationError):  # it ended meanwhile
                await self.stop(job.id, job.spec.stop_grace if grace is None else grace, by=by)

        async with trio.open_nursery() as nursery:
            for job in running:
                nursery.start_soon(stop, job)
        return len(running)

    async def wait(self, job_id: str) -> Status:
        """The job's final status, once it has ended."""
        job = self.resolve(job_id)
        await job.done.wait()
        return job.status

    async def remove(self, job_id: str) -> None:
        """Forget a finished job and delete its files.

        Raises OperationError: not_found, failed_precondition while it runs;
        OSError if its files cannot be deleted (it is forgotten all the same).
        """
        job = self.resolve(job_id)
        if not job.done.is_set():
            raise OperationError(
                ErrorCode.FAILED_PRECONDITION, f"job {job.short_id} is running; stop it first"
            )
        self._index.forget(job)
        await trio.to_thread.run_sync(shutil.rmtree, job.directory)


__all__ = [
    "CGROUP_ROOT",
    "MAX_JOBS",
    "MAX_JOBS_PER_OWNER",
    "Admission",
    "Job",
    "JobManager",
    "Retention",
    "open_job_manager",
]

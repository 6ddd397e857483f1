"""The spawner a manager makes its shims with: kept running, kept warm.

Theory of operation. `SpawnerPool.run` is a service task: it starts a
spawner unless it was given one, sweeps the sandboxes an earlier spawner
left (`corral.worker.sandboxes`), reports itself started, and from then on
restarts the spawner whenever it dies. Running jobs do not need the
spawner (their shims are on their own); starts do. Starts in flight when
it dies fail; the sandboxes it had built ahead died with it (their death
signal is its) and their cgroups are swept. One that keeps dying is
restarted less and less often, up to every SPAWNER_BACKOFF_MAX seconds.

Warm sandboxes: `warm` of them are kept built ahead of the next starts
(init jailed and in its cgroup), by the job ids they are for, recorded
before they are asked for so that a later sweep may remove them. A start
takes one (`take_warm`) and only fills the job in. A sandbox's cgroup is
in an owner's slice, so it is built for one owner: the pool builds them
for the owner of the last start (`aim`), whose next start is the likely
one, and takes down those built for another (a cgroup cannot move to
another slice, and moving init into a new one would cost the start the
cgroup join that warm sandboxes are there to save). Before the first
start, and for an owner who starts after another, a start is cold.

Every exchange with the spawner has a deadline, SPAWN_TIMEOUT. The
spawner's end of the exchange is never torn apart by a cancel (a reply left
unread would go to the next caller), so the deadline does not cancel it: a
spawner that has not answered by then is killed, which ends the exchange
with "gone", and is then restarted like any spawner that died.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from corral import ipc
from corral.job import Limits, new_job_id
from corral.shim.cgroup import Flavour
from corral.worker.sandboxes import SandboxRecords
from corral.worker.spawner import Spawner, SpawnerError

log = logging.getLogger(__name__)

# A spawner that dies within SPAWNER_STEADY seconds of its start is
# restarted after a delay that doubles from SPAWNER_BACKOFF each time.
SPAWNER_STEADY = 10.0
SPAWNER_BACKOFF = 0.05
SPAWNER_BACKOFF_MAX = 30.0
# The spawner answers in milliseconds (a fork); a queue of a thousand
# starts behind one lock still clears in seconds, and a fresh spawner's
# first answer (its interpreter starting) takes seconds on a slow or
# emulated host. This only catches a spawner that hangs.
SPAWN_TIMEOUT = 30.0

T = TypeVar("T")


class SpawnTimeout(SpawnerError):
    """The spawner did not answer in time and was killed: a shim may or may
    not have been made for the request."""


class SpawnerPool:
    """One manager's spawner and the sandboxes it keeps built ahead."""

    def __init__(
        self,
        records: SandboxRecords,
        *,
        flavour: Flavour,
        cgroup_root: Path,
        cgroup_parent: str,
        devices: list[tuple[int, int]],
        warm: int,
        spawner: Spawner | None = None,
    ) -> None:
        self._records = records
        self._flavour = flavour
        self._cgroup_root = cgroup_root
        self._cgroup_parent = cgroup_parent
        self._devices = devices
        self.warm = warm
        self._spawner = spawner
        self._own_spawner = spawner is None  # ours to close
        self.restarts = 0
        self._warm: list[tuple[str, str]] = []  # (job id, slice)
        self._slice: str | None = None  # whose sandboxes to build: the last starter's
        self._slice_limits: Limits | None = None
        self._warming = False
        self._nursery: trio.Nursery | None = None  # run()'s, for warm-ups

    # -- the service -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the spawner (unless given one), sweep, report started, then
        keep a spawner running and `warm` sandboxes built, until cancelled.
        On the way out, a spawner this pool started is closed.

        Raises SpawnerError if the first spawner cannot be started.
        """
        try:
            async with trio.open_nursery() as nursery:
                if self._spawner is None:
                    self._spawner = Spawner.start()
                await self._sweep()
                self._nursery = nursery
                task_status.started()
                nursery.start_soon(self._warm_up)
                await self._supervise()
        finally:
            self._nursery = None
            # Closing waits (in the spawner) for its warm shims to take their
            # sandboxes down: bounded by the spawner's own CLOSE_TIMEOUT.
            if self._own_spawner and self._spawner is not None:
                self._spawner.close()

    async def _supervise(self) -> None:
        """Start a new spawner whenever the spawner dies (see the module's notes)."""
        failures = 0
        while True:
            spawner = self._spawner
            assert spawner is not None  # run() starts one before this
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
            await self._sweep()
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
            self.restarts += 1
            log.info("new spawner: pid %d", self._spawner.pid)
            self.kick()

    async def _sweep(self) -> None:
        """Remove the sandboxes this pool recorded that never became jobs."""
        building = list(self.warm_ids)
        await trio.to_thread.run_sync(
            lambda: self._records.sweep(
                self._flavour, self._cgroup_root, self._cgroup_parent, building=building
            )
        )

    # -- warm sandboxes ----------------------------------------------------------------

    def kick(self) -> None:
        """Build sandboxes up to `warm` again, in the background (after a
        start took one: the start had the CPU first)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._warm_up)

    def aim(self, slice: str, limits: Limits | None) -> None:
        """Build the sandboxes ahead for the owner of `slice` (its quota
        `limits`; None: as the slice has it) from now on, and kick."""
        self._slice, self._slice_limits = slice, limits
        self.kick()

    async def _warm_up(self) -> None:
        """Keep `warm` sandboxes built ahead of the next starts, for the
        slice aimed at; take down those built for another."""
        if self._warming or self._spawner is None or self._slice is None:
            return
        self._warming = True
        try:
            while stale := [entry for entry in self._warm if entry[1] != self._slice]:
                job_id, _ = stale[0]
                self._warm.remove(stale[0])
                await self._discard(job_id)
            while len(self._warm) < self.warm:
                slice = self._slice
                job_id = new_job_id()
                try:  # before it exists, so that a later sweep may remove it
                    self._records.record(job_id, slice)
                except OSError as exc:
                    log.warning("cannot record a sandbox, so none is built ahead: %s", exc)
                    return
                self._warm.append((job_id, slice))
                spawner = self._spawner
                request = self.request(job_id, slice, self._slice_limits)
                try:
                    await self._within_deadline(
                        spawner, functools.partial(spawner.prepare, request)
                    )
                except SpawnerError as exc:
                    # Its record stays: the sweep after a dead spawner takes it.
                    log.warning("cannot build a sandbox ahead of a start: %s", exc)
                    with contextlib.suppress(ValueError):
                        self._warm.remove((job_id, slice))
                    return
        finally:
            self._warming = False

    async def _discard(self, job_id: str) -> None:
        """Have the spawner take the sandbox of `job_id` down, and forget it.
        If the spawner cannot, its record stays for the next sweep."""
        spawner = self._spawner
        if spawner is None:
            return
        try:
            await self._within_deadline(
                spawner, functools.partial(spawner.discard, ipc.Discard(id=job_id))
            )
        except SpawnerError as exc:
            log.warning("cannot take down the sandbox built ahead for %s: %s", job_id, exc)
            return
        # The warm shim removes its cgroup as it exits; the record goes now:
        # a sweep would find no cgroup, or one the shim is removing.
        self._records.drop(job_id)

    def take_warm(self, slice: str) -> str | None:
        """The job id of a sandbox built ahead in `slice`, now the caller's;
        None if none is."""
        for entry in self._warm:
            if entry[1] == slice:
                self._warm.remove(entry)
                return entry[0]
        return None

    def give_back(self, job_id: str, slice: str) -> None:
        """Return a sandbox `take_warm` gave, unused: the next start takes it."""
        self._warm.insert(0, (job_id, slice))

    @property
    def warm_ids(self) -> tuple[str, ...]:
        """The job ids sandboxes are built (or being built) for."""
        return tuple(job_id for job_id, _ in self._warm)

    # -- shims -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._spawner.pid if self._spawner is not None else None

    def request(self, job_id: str, slice: str = "", limits: Limits | None = None) -> ipc.Prepare:
        """What the spawner needs to build job `job_id`'s sandbox, in
        `slice`, whose quota is `limits`."""
        return ipc.Prepare(
            id=job_id,
            flavour=str(self._flavour),
            cgroup_root=str(self._cgroup_root),
            cgroup_parent=self._cgroup_parent,
            devices=tuple(self._devices),
            slice=slice,
            slice_limits=limits,
        )

    def start_request(
        self, job_id: str, job_dir: Path, slice: str = "", limits: Limits | None = None
    ) -> ipc.Start:
        """What the spawner needs to start job `job_id` in `job_dir`."""
        prepared = self.request(job_id, slice, limits)
        return ipc.Start(
            id=job_id,
            flavour=prepared.flavour,
            cgroup_root=prepared.cgroup_root,
            cgroup_parent=prepared.cgroup_parent,
            devices=prepared.devices,
            slice=prepared.slice,
            slice_limits=prepared.slice_limits,
            job_dir=str(job_dir),
        )

    async def spawn(self, request: ipc.Start, report_fd: int) -> tuple[int, int]:
        """Have the spawner make the shim for `request` (in its warm sandbox
        if there is one), handing it `report_fd`; return the shim's pid and a
        pidfd (the caller's to close).

        Not torn apart by a cancel. Raises SpawnerError if the spawner
        refuses or is gone (no shim was made), SpawnTimeout if it did not
        answer within SPAWN_TIMEOUT (it is killed; a shim may exist).
        """
        spawner = self._spawner
        if spawner is None:
            raise SpawnerError("the spawner is not running")
        with trio.CancelScope(shield=True):  # deadline: SPAWN_TIMEOUT, by _within_deadline
            made = await self._within_deadline(
                spawner, functools.partial(spawner.spawn, request, report_fd)
            )
        return made

    async def _within_deadline(self, spawner: Spawner, exchange: Callable[[], Awaitable[T]]) -> T:
        """Run `exchange` with `spawner`; kill the spawner if it has not
        answered in SPAWN_TIMEOUT seconds (see the module's notes)."""
        killed = False

        async def kill_when_late() -> None:
            nonlocal killed
            await trio.sleep(SPAWN_TIMEOUT)
            killed = True
            log.warning(
                "the spawner (pid %d) did not answer in %g s; killing it",
                spawner.pid,
                SPAWN_TIMEOUT,
            )
            spawner.process.kill()  # a no-op once it has been reaped

        # The failure is caught inside the nursery: raised out of it, it
        # would come wrapped in an exception group.
        failure: SpawnerError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_late)
            try:
                result = await exchange()
            except SpawnerError as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is None:
            return result
        if killed:
            raise SpawnTimeout(
                f"the spawner did not answer in {SPAWN_TIMEOUT:g} s; "
                "it was killed, and a new one is starting"
            ) from failure
        raise failure


__all__ = ["SPAWN_TIMEOUT", "SpawnTimeout", "SpawnerPool"]

"""The job operations corrald serves: start, stop, status, list, remove, wait, logs.

Each handler turns a request's args into a call on the `JobManager` and
its result into a plain map. Who may touch which job is decided in
`_visible`, the one place for it: admins see every job, users their own,
and another user's job answers exactly like a job that does not exist.
"""

from __future__ import annotations

import math
from typing import Any

from corral.job import JobSpec, Limits, SpecError, Status
from corral.protocol import ErrorCode
from corral.supervisor.session import Handler, OperationError, RequestContext, StreamEnd
from corral.tls import Identity
from corral.worker.manager import Job, JobError, JobManager
from corral.worker.output import CHUNK

DEFAULT_GRACE = 10.0
MAX_GRACE = 3600.0


def job_record(job: Job, status: Status | None = None) -> dict[str, Any]:
    """A job as the wire carries it (times in ns since the epoch, argv as bytes)."""
    status = status or job.status
    return {
        "id": job.id,
        "owner": job.spec.owner,
        "argv": list(job.spec.argv),
        "user": job.spec.user,
        "created_at": job.spec.created_at,
        "limits": job.spec.limits.to_wire(),
        "max_runtime": job.spec.max_runtime,
        **status.to_wire(),
    }


def _arg(
    args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    value = args.get(name, default)
    if value is not None and (
        not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    ):
        raise OperationError(ErrorCode.INVALID_ARGUMENT, f"{name}: has the wrong type")
    return value


class JobOperations:
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def handlers(self) -> dict[str, Handler]:
        return {
            "start": self.start,
            "stop": self.stop,
            "status": self.status,
            "list": self.list,
            "remove": self.remove,
            "wait": self.wait,
            "logs": self.logs,
        }

    def _visible(self, identity: Identity, job_id: Any) -> Job:
        """The job `identity` may act on, or not_found, whether it is missing or not theirs."""
        if not isinstance(job_id, str) or not job_id:
            raise OperationError(
                ErrorCode.INVALID_ARGUMENT, "id: a job id or id prefix is required"
            )
        owner = None if identity.is_admin else identity.name
        try:
            return self.manager.resolve(job_id, owner=owner)
        except JobError as exc:
            raise OperationError(exc.code, str(exc)) from None

    async def start(self, context: RequestContext) -> dict[str, Any]:
        args = context.request.args
        identity = context.identity
        user = _arg(args, "user", str)
        if user is not None and user != "nobody" and not identity.is_admin:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED, "only an admin may choose the user a job runs as"
            )
        try:
            spec = JobSpec(
                argv=_arg(args, "argv", list, []),
                env=_arg(args, "env", dict),
                cwd=_arg(args, "cwd", (str, bytes), "/"),
                user=user or "nobody",
                limits=Limits.from_wire(_arg(args, "limits", dict, {})),
                max_runtime=_arg(args, "max_runtime", (int, float)),
                owner=identity.name,
            )
            job = await self.manager.start(spec)
        except SpecError as exc:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        except JobError as exc:
            raise OperationError(exc.code, str(exc)) from None
        return {"id": job.id, "job": job_record(job)}

    async def stop(self, context: RequestContext) -> dict[str, Any]:
        args = context.request.args
        job = self._visible(context.identity, args.get("id"))
        grace = _arg(args, "grace", (int, float), DEFAULT_GRACE)
        if not (math.isfinite(grace) and 0 <= grace <= MAX_GRACE):
            raise OperationError(
                ErrorCode.INVALID_ARGUMENT, f"grace: must be between 0 and {MAX_GRACE:g} seconds"
            )
        try:
            status = await self.manager.stop(job.id, grace, by=context.identity.name)
        except JobError as exc:
            raise OperationError(exc.code, str(exc)) from None
        return {"job": job_record(job, status)}

    async def status(self, context: RequestContext) -> dict[str, Any]:
        job = self._visible(context.identity, context.request.args.get("id"))
        try:
            _, status = await self.manager.status(job.id)
        except JobError as exc:
            raise OperationError(exc.code, str(exc)) from None
        return {"job": job_record(job, status)}

    async def wait(self, context: RequestContext) -> dict[str, Any]:
        """Answer once the job has ended, with its final state."""
        job = self._visible(context.identity, context.request.args.get("id"))
        status = await self.manager.wait(job.id)
        return {"job": job_record(job, status)}

    async def list(self, context: RequestContext) -> dict[str, Any]:
        identity = context.identity
        everyone = bool(_arg(context.request.args, "all", bool, False)) and identity.is_admin
        jobs = [job for job in self.manager.jobs() if everyone or job.spec.owner == identity.name]
        return {"jobs": [job_record(job) for job in jobs]}

    async def remove(self, context: RequestContext) -> dict[str, Any]:
        job = self._visible(context.identity, context.request.args.get("id"))
        try:
            await self.manager.remove(job.id)
        except JobError as exc:
            raise OperationError(exc.code, str(exc)) from None
        return {"id": job.id}

    async def logs(self, context: RequestContext) -> StreamEnd:
        """Stream the job's output.log from `offset`: data within the client's
        credit, then an end with the offset reached and the job's state (final
        when it has ended). With `follow`, until the job has ended."""
        args = context.request.args
        job = self._visible(context.identity, args.get("id"))
        offset = _arg(args, "offset", int, 0)
        follow = bool(_arg(args, "follow", bool, False))
        if offset < 0:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, "offset: must be zero or more")
        with self.manager.open_output(job.id, offset) as reader:
            while True:
                # Credit first, then the read: nothing is read that cannot be sent.
                credit = await context.wait_credit()
                at = reader.offset
                data = await reader.read(min(credit, CHUNK), follow=follow)
                if not data:
                    break
                await context.send_data(at, data)
            end = reader.offset
        if job.done.is_set():
            status = job.status
        else:
            try:
                _, status = await self.manager.status(job.id)
            except JobError:
                status = job.status
        return StreamEnd({"offset": end, "job": job_record(job, status)})

"""The job operations corrald serves: start, stop, status, list, remove, wait, logs.

Each handler turns a request's args into a call on the `JobManager` and
its result into a plain map. Who may do what is not decided here but in
`corral.supervisor.policy` (the table of operation x role): every handler
asks it first, and finds jobs only through `visible`, which looks a job
up among those the caller may reach, so another user's job answers
exactly like a job that does not exist.

A finished job's spec is kept compact in memory (no env, at most 4 KiB of
argv; `corral.worker.index.Job.compact`). The replies about one job
(start, stop, status, wait) carry its whole argv, read back from its
spec.msgpack when it was cut; `list` and a stream's end carry the part
kept, with `argv_cut`, the bytes left out, so a page of a thousand jobs
costs no disk reads.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import trio

from corral.errors import OperationError
from corral.identity import Identity
from corral.job import DEFAULT_STOP_GRACE, DEFAULT_TTY_SIZE, JobSpec, Limits, Status, check_grace
from corral.protocol import ErrorCode
from corral.store import OUTPUT_FILE, pack, read_spec
from corral.supervisor.descriptors import Descriptors
from corral.supervisor.policy import Policy, authorize, owner_filter
from corral.supervisor.session import Handler, RequestContext, StreamEnd
from corral.units import describe
from corral.worker.manager import Job, JobManager
from corral.worker.output import CHUNK, misplaced_offset

# Bytes of job records in one `list` reply; with the largest record a spec
# allows (see corral.job) added on, it is still well within a frame.
LIST_PAGE_BYTES = 256 * 1024


def job_record(
    job: Job, status: Status | None = None, *, argv: tuple[bytes, ...] | None = None
) -> dict[str, Any]:
    """A job as the wire carries it (times in ns since the epoch, argv as bytes).

    A finished job's argv is the part its compact spec keeps (see
    `corral.worker.index.Job.compact`), and `argv_cut` says how many bytes
    of it were left out, unless `argv` gives the whole (`whole_record`)."""
    status = status or job.status
    cut = {"argv_cut": job.argv_cut} if argv is None and job.argv_cut else {}
    return {
        "id": job.id,
        "owner": job.spec.owner,
        "owner_role": job.spec.owner_role,
        "argv": list(job.spec.argv if argv is None else argv),
        **cut,
        "user": job.spec.user,
        "uid": job.spec.uid,
        "host_root": job.spec.host_root,
        "seccomp": job.spec.seccomp,
        "created_at": job.spec.created_at,
        "limits": job.spec.limits.to_wire(),
        "max_runtime": job.spec.max_runtime,
        "writable": list(job.spec.writable),
        "stdin": job.spec.stdin,
        "tty": job.spec.tty,
        "tty_size": list(job.spec.tty_size),
        **status.to_wire(),
    }


async def whole_record(job: Job, status: Status | None = None) -> dict[str, Any]:
    """The job's record with its whole argv: for a finished job whose compact
    spec has it cut, read from its spec.msgpack (in a thread: it may be
    256 KiB). A spec that cannot be read (the job removed meanwhile) leaves
    the cut argv, said so by `argv_cut`."""
    if not job.argv_cut:
        return job_record(job, status)
    try:
        spec = await trio.to_thread.run_sync(read_spec, job.directory)
    except (OSError, ValueError, TypeError, KeyError):
        return job_record(job, status)
    return job_record(job, status, argv=spec.argv)


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = args.get(name, default)
    if value is not None and (
        not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    ):
        raise OperationError(
            ErrorCode.INVALID_ARGUMENT,
            f"{name}: must be {_KIND_WORDS[kind]}, not {describe(value)}",
        )
    return value


# What each argument kind is called in a message.
_KIND_WORDS: dict[type | tuple[type, ...], str] = {
    list: "a list",
    dict: "a map",
    str: "a string",
    (str, bytes): "a string",
    (int, float): "a number",
    int: "a whole number",
    bool: "true or false",
}


# Output streams (logs, attach) one user may have open at once, on all
# their connections: each holds a descriptor of corrald's (an attach, two),
# and without a bound one user's 256 connections x 64 streams would take
# every descriptor corrald has from everyone else.
MAX_STREAMS_PER_USER = 1024


class JobOperations:
    def __init__(
        self,
        manager: JobManager,
        policy: Policy | None = None,
        *,
        max_streams_per_user: int | None = MAX_STREAMS_PER_USER,
        descriptors: Descriptors | None = None,
    ) -> None:
        """`descriptors`: corrald's, whose reserve for admins a user's
        streams and starts may not take (None: not counted)."""
        self.manager = manager
        self.policy = policy or Policy()
        self.max_streams_per_user = max_streams_per_user
        self.descriptors = descriptors
        self._streams: collections.Counter[Identity] = collections.Counter()  # open, by user

    @property
    def streams_open(self) -> int:
        """Output streams open now, on every connection."""
        return sum(self._streams.values())

    @contextlib.contextmanager
    def stream_slot(self, identity: Identity) -> Iterator[None]:
        """Count an open stream of `identity`'s while the block runs;
        resource_exhausted if a user has as many as they may, or corrald's
        descriptors are down to the admins' reserve. Admins are counted,
        never refused: an admin can always look."""
        cap = self.max_streams_per_user
        if cap is not None and not identity.is_admin and self._streams[identity] >= cap:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{identity.name} has {cap} output streams open (logs -f, attach), the most "
                "one user may have; end one to open another",
            )
        if self.descriptors is not None:
            self.descriptors.check(identity, "output streams")
        self._streams[identity] += 1
        try:
            yield
        finally:
            self._streams[identity] -= 1
            if not self._streams[identity]:
                del self._streams[identity]

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

    def visible(self, context: RequestContext) -> Job:
        """The job the request names, among those its caller may reach with its
        operation: not_found alike whether it is missing or not theirs."""
        owner = owner_filter(context.identity, context.request.op)
        job_id = context.request.args.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise OperationError(
                ErrorCode.INVALID_ARGUMENT, "id: a job id or id prefix is required"
            )
        return self.manager.resolve(job_id, owner=owner)

    async def start(self, context: RequestContext) -> dict[str, Any]:
        args = context.request.args
        identity = context.identity
        authorize(identity, "start")
        if self.descriptors is not None:  # a running job holds a descriptor of corrald's
            self.descriptors.check(identity, "jobs")
        # Errors (SpecError, the policy's, the manager's) are OperationErrors
        # with their code and details: the session answers with them as they
        # are. A start that failed after its job was recorded names the job.
        terms = self.policy.start_terms(
            identity,
            user=arg(args, "user", str),
            limits=Limits.from_wire(arg(args, "limits", dict, {})),
            max_runtime=arg(args, "max_runtime", (int, float)),
            host_root=arg(args, "host_root", bool, False),
            seccomp=arg(args, "seccomp", str),
        )
        writable = arg(args, "writable", list, [])
        self.policy.check_writable(identity, writable)
        spec = JobSpec(
            argv=arg(args, "argv", list, []),
            env=arg(args, "env", dict),
            cwd=arg(args, "cwd", (str, bytes), "/"),
            env_clear=arg(args, "env_clear", bool, False),
            writable=writable,
            user=terms.user,
            limits=terms.limits,
            max_runtime=terms.max_runtime,
            owner=identity.name,
            owner_role=identity.role,
            stdin=arg(args, "stdin", bool, False),
            tty=arg(args, "tty", bool, False),
            tty_size=arg(args, "tty_size", list, list(DEFAULT_TTY_SIZE)),
            host_root=terms.host_root,
            seccomp=terms.seccomp,
        )
        job = await self.manager.start(spec, quota=self.policy.quota(identity.role))
        return {"id": job.id, "job": await whole_record(job)}

    async def stop(self, context: RequestContext) -> dict[str, Any]:
        args = context.request.args
        job = self.visible(context)
        grace = check_grace(args.get("grace", DEFAULT_STOP_GRACE))  # before anything else
        # Stopping a job that has ended is done already, as `docker stop`
        # has it: the reply says so, with how it ended.
        if job.done.is_set():
            return {"job": await whole_record(job), "already_ended": True}
        try:
            status = await self.manager.stop(job.id, grace, by=context.identity.name)
        except OperationError:
            if job.done.is_set():  # it ended on its own meanwhile
                return {"job": await whole_record(job), "already_ended": True}
            raise
        return {"job": await whole_record(job, status), "already_ended": False}

    async def status(self, context: RequestContext) -> dict[str, Any]:
        job = self.visible(context)
        _, status = await self.manager.status(job.id)
        return {"job": await whole_record(job, status)}

    async def wait(self, context: RequestContext) -> dict[str, Any]:
        """Answer once the job has ended, with its final state."""
        job = self.visible(context)
        status = await self.manager.wait(job.id)
        return {"job": await whole_record(job, status)}

    async def list(self, context: RequestContext) -> dict[str, Any]:
        identity = context.identity
        # `all` widens the list to what the caller may reach: every job for
        # an admin; for a user, still their own.
        owner = owner_filter(identity, "list")
        args = context.request.args
        if not arg(args, "all", bool, False):
            owner = identity
        jobs = self.manager.jobs(owner=owner)  # oldest first: by (created_at, id)
        after = arg(args, "after", list)
        if after is not None:
            if len(after) != 2 or not isinstance(after[0], int) or not isinstance(after[1], str):
                raise OperationError(ErrorCode.INVALID_ARGUMENT, "after: must be [created_at, id]")
            keys = [(job.spec.created_at, job.id) for job in jobs]
            jobs = jobs[bisect.bisect_right(keys, (after[0], after[1])) :]
        # A page at a time, within a frame whatever the records' sizes; the
        # client asks again after the last one while `more` says so.
        records: list[dict[str, Any]] = []
        size = 0
        for job in jobs:
            record = job_record(job)
            record_size = len(pack(record))
            if records and size + record_size > LIST_PAGE_BYTES:
                return {"jobs": records, "more": True}
            records.append(record)
            size += record_size
        return {"jobs": records, "more": False}

    async def remove(self, context: RequestContext) -> dict[str, Any]:
        job = self.visible(context)
        await self.manager.remove(job.id)
        return {"id": job.id}

    async def logs(self, context: RequestContext) -> StreamEnd:
        """Stream the job's output.log from `offset`: data within the client's
        credit, then an end with the offset reached and the job's state (final
        when it has ended). With `follow`, until the job has ended."""
        args = context.request.args
        job = self.visible(context)
        offset = arg(args, "offset", int, 0)
        follow = bool(arg(args, "follow", bool, False))
        if offset < 0:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, "offset: must be zero or more")
        if offset:
            await check_offset(job, offset)
        with self.stream_slot(context.identity):
            end = await send_output(context, self.manager, job, offset, follow=follow)
        return StreamEnd({"offset": end, "job": job_record(job, await self.live_status(job))})

    async def live_status(self, job: Job) -> Status:
        """The job's status now: final once it has ended, else its shim's."""
        if job.done.is_set():
            return job.status
        try:
            _, status = await self.manager.status(job.id)
        except OperationError:
            return job.status
        return status


async def send_output(
    context: RequestContext, manager: JobManager, job: Job, offset: int, *, follow: bool
) -> int:
    """Send the job's output.log from `offset` on the request's stream, within
    the client's credit: to its end now, or with `follow` until the job has
    ended and all was sent. Return the offset reached."""
    with manager.open_output(job.id, offset) as reader:
        while True:
            # Credit first, then the read: nothing is read that cannot be sent.
            credit = await context.wait_credit()
            at = reader.offset
            data = await reader.read(min(credit, CHUNK), follow=follow)
            if not data:
                return reader.offset
            await context.send_data(at, data)


async def check_offset(job: Job, offset: int) -> None:
    """invalid_argument, naming the nearest offsets that work, unless a
    record of the job's log begins at `offset`: a stream must start on a
    record, or the client would decode the middle of one as the next."""
    nearest = await trio.to_thread.run_sync(misplaced_offset, job.directory / OUTPUT_FILE, offset)
    if nearest is None:
        return
    below, above = nearest
    nearest_text = (
        f"the nearest that work are {below} and {above}"
        if above is not None
        else f"the nearest that works is {below}, where its complete records end now"
    )
    raise OperationError(
        ErrorCode.INVALID_ARGUMENT,
        f"offset {offset} is not where a record of job {job.short_id}'s log begins; "
        f"{nearest_text} (offsets count bytes of the log, as `logs --json` and the "
        "client library report them)",
        {"offset_below": below, "offset_above": above},
    )

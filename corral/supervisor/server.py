"""corrald's network side: listeners, TLS handshakes, sessions, shutdown.

Theory of operation. Every accepted socket gets its own task. The task runs
the TLS handshake under a deadline (a silent peer cannot hold a slot), then
reads the identity from the verified client certificate. A peer with no
acceptable identity, a user beyond a connection cap (an admin is held
only to their own), or a user when corrald's descriptors are down to the
admins' reserve (`corral.supervisor.descriptors`), gets one
connection-level error frame saying why and is closed; everyone else gets a
`Session`. A handshake the TLS layer itself refuses (unknown CA, expired,
wrong key usage, TLS 1.2) has its alert flushed to the peer, so the client
hears "unknown ca" rather than a bare EOF.

Start-up: `open_listeners()` binds every address before anything else
happens (corrald binds before its job manager touches a cgroup), and
`serve()` accepts on them.

Shutdown, in two steps that may come apart: `stop_accepting()` closes the
listeners while the sessions go on (corrald stops its jobs meanwhile, so
followers get their streams' ends and `wait`s their replies:
`wait_requests_done()`); `shutdown()` then tells every session goodbye
(`unavailable`), gives them `shutdown_grace` seconds to flush, and cancels
what is left. `shutdown()` alone does both at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import corral
from corral.address import Address
from corral.errors import OperationError
from corral.identity import Identity
from corral.protocol import Connection, Error, ErrorCode, Role
from corral.shim.cgroup import Flavour, detect_flavour
from corral.shim.oom import oom_score_pinned
from corral.streams import CLOSE_TIMEOUT, GONE, close_stream
from corral.supervisor.attach import AttachOperations
from corral.supervisor.audit import MAX_SIZE as AUDIT_MAX_SIZE
from corral.supervisor.audit import AuditLog
from corral.supervisor.auditing import AuditObserver
from corral.supervisor.certificates import ServerCertificate
from corral.supervisor.descriptors import FD_DIR, Descriptors
from corral.supervisor.heartbeat import Heartbeat, process_statistics
from corral.supervisor.listeners import listener_address, open_listener, remove_unix_sockets
from corral.supervisor.operations import MAX_STREAMS_PER_USER, JobOperations
from corral.supervisor.policy import Policy, authorize, owner_filter
from corral.supervisor.session import (
    IDLE_TIMEOUT,
    IO_TIMEOUT,
    Handler,
    Observers,
    RequestContext,
    Session,
    StreamEnd,
)
from corral.tls import IdentityError, handshake_refusal, identity_from_certificate

if TYPE_CHECKING:
    from corral.supervisor.metrics import Metrics
from corral.worker.manager import JobManager

log = logging.getLogger(__name__)

# A slow client on a bad link still finishes a TLS 1.3 handshake in well
# under a second; 10 s only ever catches peers that are not trying.
HANDSHAKE_TIMEOUT = 10.0
# Each session costs two tasks and a few KiB; 1024 stays far below the
# default 1024-per-1024 fd limit corrald raises at start.
MAX_CONNECTIONS = 1024
# Enough for a shell with many background follows; bounds one peer's tasks.
MAX_REQUESTS_PER_CONNECTION = 64
# One identity's sessions at once: a quarter of the total, so that one
# user (or one stolen key) cannot take every slot from the others.
MAX_CONNECTIONS_PER_USER = 256
# TLS handshakes in progress at once. A handshake's crypto (~2 ms of CPU
# each) runs on the event loop, and trio runs every task that is ready in
# one batch: 32 handshakes ready together hold the loop ~60 ms at most.
MAX_HANDSHAKES = 32
# Peers accepted and waiting for a handshake slot (an fd and a small task
# each). A peer takes a slot only once its first bytes have come, so silent
# peers never hold one; past this many, new peers are closed at accept.
# Separate from the session cap, so peers that never present a certificate
# cannot lock out those who do.
MAX_WAITING = 512
# Time to flush goodbyes at shutdown before connections are cut.
SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    state_dir: Path
    pki_dir: Path
    listen: Sequence[Address]
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_handshakes: int = MAX_HANDSHAKES
    max_waiting: int = MAX_WAITING
    max_requests_per_connection: int = MAX_REQUESTS_PER_CONNECTION
    max_connections_per_user: int = MAX_CONNECTIONS_PER_USER
    max_streams_per_user: int = MAX_STREAMS_PER_USER
    io_timeout: float = IO_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    # Descriptors below RLIMIT_NOFILE only admins may take (None: the
    # default share, see corral.supervisor.descriptors).
    fd_reserve: int | None = None
    policy: Policy = field(default_factory=Policy)
    mountinfo: Path = field(default=Path("/proc/self/mountinfo"))
    fd_dir: Path = field(default=FD_DIR)
    # STATE/audit.log is rotated beyond this many bytes (corral.supervisor.audit).
    audit_max_size: int = AUDIT_MAX_SIZE


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return "unix"


async def _flush_alert(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the TLS alert a failed server handshake left unsent.

    trio marks the stream broken without sending what OpenSSL queued (the
    alert saying why), so the client would see only EOF. The queued bytes
    sit in trio's outgoing BIO; this reaches into it, and does nothing if a
    later trio changes that.
    """
    outgoing = getattr(tls, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return
    data = outgoing.read()
    if data:
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(*GONE):
                await tls.transport_stream.send_all(data)


class Server:
    """Serves corral sessions on a set of listeners until cancelled or shut down."""

    def __init__(
        self, config: ServerConfig, ssl_context: ssl.SSLContext, jobs: JobManager | None = None
    ) -> None:
        self.config = config
        self._ssl_context = ssl_context
        self._sessions: set[Session] = set()
        self._connecting = 0  # waiting for or in the TLS handshake, or being refused
        self._handshaking = trio.Semaphore(config.max_handshakes)
        self._accepted = 0
        self._opened = 0  # sessions, ever
        self._refused: collections.Counter[str] = collections.Counter()  # handshakes, by reason
        self._idle = trio.Event()
        self._idle.set()
        self._accept_scope = trio.CancelScope()
        self.shutting_down = False  # no longer accepting
        self._goodbye = trio.Event()  # set once sessions have been told goodbye
        self._listeners: list[trio.SocketListener] | None = None
        self.addresses: list[Address] = []
        self.jobs: JobManager | None = None
        self._job_operations: JobOperations | None = None
        self.descriptors = Descriptors(config.fd_reserve, fd_dir=config.fd_dir, held=self._held)
        self.heartbeat = Heartbeat()
        self._requests = 0  # being served, on every session
        self._no_requests = trio.Event()
        self._no_requests.set()
        self._operations: dict[str, Handler] = {}
        self.certificate: ServerCertificate | None = None  # the one in use, for info
        self.audit = AuditLog(config.state_dir, max_size=config.audit_max_size)
        self._observer = AuditObserver(self.audit)
        self.metrics: Metrics | None = None  # with --metrics: enable_metrics()
        self._add_operations({"info": self._info, "ping": self._ping})
        self._add_operations(self._observer.handlers())
        if jobs is not None:
            self.serve_jobs(jobs)

    def enable_metrics(self) -> Metrics:
        """Count what `/metrics` serves, from now on (before serving): only
        then is prometheus_client imported (~80 ms of every start)."""
        from corral.supervisor.metrics import Metrics, Sources  # noqa: PLC0415

        self.metrics = Metrics(
            Sources(
                sessions=lambda: len(self._sessions),
                jobs_running=lambda: self.jobs.running() if self.jobs is not None else 0,
                jobs_ended=lambda: dict(self.jobs.ended) if self.jobs is not None else {},
                handshakes_refused=lambda: dict(self._refused),
                spawner_restarts=lambda: self.jobs.spawner_restarts if self.jobs else 0,
                audit_dropped=lambda: self.audit.dropped + self.audit.lost,
                loop_lag=self.heartbeat.statistics,
            )
        )
        return self.metrics

    def use_tls(self, context: ssl.SSLContext, certificate: ServerCertificate) -> None:
        """Handshakes from now on use `context`; sessions open keep theirs."""
        self._ssl_context = context
        self.certificate = certificate

    def serve_jobs(self, jobs: JobManager) -> None:
        """Answer the job operations with `jobs` (a running manager), from
        now on; before `serve()`, so that no session sees them come."""
        self.jobs = jobs
        operations = JobOperations(
            jobs,
            self.config.policy,
            max_streams_per_user=self.config.max_streams_per_user,
            descriptors=self.descriptors,
        )
        self._job_operations = operations
        self._add_operations(operations.handlers())
        self._add_operations(AttachOperations(operations).handlers())

    def _add_operations(self, operations: dict[str, Handler]) -> None:
        self._operations.update({op: self._counted(handler) for op, handler in operations.items()})

    @property
    def cgroup(self) -> Flavour:
        """The cgroup flavour jobs run under: the manager's; without one (a
        server for tests, running no jobs), the host's."""
        return self.jobs.flavour if self.jobs is not None else detect_flavour(self.config.mountinfo)

    # -- observation ---------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Counts of connections, for `info` and tests."""
        return {
            "sessions": len(self._sessions),
            "connecting": self._connecting,
            "accepted": self._accepted,
            "opened": self._opened,
            "refused": sum(self._refused.values()),
        }

    def refused(self) -> dict[str, int]:
        """TLS handshakes refused or dropped, by reason (see
        corral.tls.handshake_refusal; "timeout" for a peer too slow)."""
        return dict(self._refused)

    def _live(self) -> int:
        return len(self._sessions) + self._connecting

    def _held(self) -> int:
        """The descriptors this server knows it holds: a socket per
        connection, about one per output stream, a pidfd per running job."""
        held = self._live()
        if self._job_operations is not None:
            held += self._job_operations.streams_open
        if self.jobs is not None:
            held += self.jobs.running()
        return held

    async def wait_idle(self) -> None:
        """Return once no connection is open or being set up."""
        await self._idle.wait()

    def _counted(self, handler: Handler) -> Handler:
        async def counted(context: RequestContext) -> dict[str, Any] | StreamEnd:
            self._requests += 1
            if self._no_requests.is_set():
                self._no_requests = trio.Event()
            try:
                return await handler(context)
            finally:
                self._requests -= 1
                if not self._requests:
                    self._no_requests.set()

        return counted

    async def wait_requests_done(self) -> None:
        """Return once no session has a request being served. A reply (or a
        stream's end) is queued as its handler returns, unless the peer's
        queue is full: a peer that does not read may not have it yet."""
        while self._requests:
            await self._no_requests.wait()

    # -- operations ----------------------------------------------------------

    def _process(self) -> dict[str, Any]:
        statistics: dict[str, Any] = process_statistics()
        statistics["descriptors"] = self.descriptors.statistics()
        if self.jobs is not None:
            statistics["spawner"] = {
                "pid": self.jobs.spawner_pid,
                "restarts": self.jobs.spawner_restarts,
            }
        return statistics

    async def _ping(self, context: RequestContext) -> dict[str, Any]:
        """Nothing: a request that keeps an otherwise idle session open."""
        authorize(context.identity, "ping")
        return {}

    def _uids(self) -> dict[str, int] | None:
        if self.jobs is None:
            return None
        pool = self.jobs.uids
        return {"start": pool.range.start, "count": pool.range.count, "in_use": pool.held}

    async def _info(self, context: RequestContext) -> dict[str, Any]:
        identity = context.identity
        owner = owner_filter(identity, "info")  # a user's counts are of their own jobs
        jobs = self.jobs.jobs(owner=owner) if self.jobs is not None else []
        return {
            "version": corral.__version__,
            "identity": {"name": identity.name, "role": identity.role},
            "cgroup": str(self.cgroup),
            "connections": len(self._sessions),
            "jobs": len(jobs),
            "running_jobs": self.jobs.running(owner) if self.jobs is not None else 0,
            # Jobs with live output readers (one inotify watch each).
            "followed_jobs": sum(1 for job in jobs if self.jobs and self.jobs.is_followed(job.id)),
            # The terms the caller's jobs start under.
            "policy": self.config.policy.for_role(identity.role),
            # Starts beyond these are refused (resource_exhausted).
            "max_jobs": self.jobs.admission.max_jobs if self.jobs else None,
            "max_jobs_per_user": self.jobs.admission.max_jobs_per_owner if self.jobs else None,
            # The host uids jobs run as, one per running job.
            "uids": self._uids(),
            # The certificate corrald presents: its serial, its end, a warning near it.
            "server_certificate": self.certificate.to_wire() if self.certificate else None,
            # Whether a job's OOM score of 1000 is a floor it cannot lower.
            "oom_score_pinned": oom_score_pinned(),
            # How late the event loop wakes: what every session waits for.
            "loop_lag": self.heartbeat.statistics(),
            # corrald's own footprint, for admins watching for leaks.
            **({"process": self._process()} if identity.is_admin else {}),
        }

    # -- serving -------------------------------------------------------------

    async def open_listeners(self) -> list[Address]:
        """Listen on every configured address (not accepting yet) and return
        the bound addresses (real ports for port 0).

        Raises ListenError if an address cannot be listened on; then none is
        left open and no socket file is left behind.
        """
        listeners: list[trio.SocketListener] = []
        try:
            for address in self.config.listen:
                listeners.extend(await open_listener(address))
        except BaseException:
            remove_unix_sockets([listener_address(listener) for listener in listeners])
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        self._listeners = listeners
        self.addresses = [listener_address(listener) for listener in listeners]
        return self.addresses

    async def close_listeners(self) -> None:
        """Close listeners `serve()` has not taken over, and remove their socket
        files (for a corrald that bound them, then could not start)."""
        listeners, self._listeners = self._listeners or [], None
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        if listeners:
            remove_unix_sockets(self.addresses)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or shutdown(), listening first unless
        `open_listeners()` has.

        Reports the bound addresses (real ports for port 0) once accepting.
        Raises ListenError if an address cannot be listened on.
        """
        if self._listeners is None:
            await self.open_listeners()
        listeners, self._listeners = self._listeners or [], None  # closed as accepting ends
        try:
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self.heartbeat.run)
                await handlers.start(self.audit.run)
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        await acceptors.start(
                            partial(
                                trio.serve_listeners,
                                self._handle,
                                listeners,
                                handler_nursery=handlers,
                            )
                        )
                        task_status.started(self.addresses)
                # Accepting stopped; sessions go on until they are told goodbye.
                await self._goodbye.wait()
                with trio.move_on_after(self.config.shutdown_grace):
                    await self.wait_idle()
                handlers.cancel_scope.cancel()
        finally:
            for listener in listeners:  # closed already, unless cancelled before accepting
                await trio.aclose_forcefully(listener)
            remove_unix_sockets(self.addresses)

    def stop_accepting(self) -> None:
        """Close the listeners; open sessions are served until `shutdown()`."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("no longer accepting connections: %d sessions open", len(self._sessions))
        self._accept_scope.cancel()

    def shutdown(self, reason: str = "corrald is shutting down") -> None:
        """Stop accepting and say goodbye to every session; `serve` then returns."""
        self.stop_accepting()
        if self._goodbye.is_set():
            return
        self._goodbye.set()
        log.info("shutting down: %d sessions", len(self._sessions))
        for session in list(self._sessions):
            session.shutdown(reason)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # One exception escaping here would end serve_listeners: each
        # connection's failures stay with it.
        peer = _peer_name(stream)
        if (
            self.shutting_down
            or self._connecting >= self.config.max_handshakes + self.config.max_waiting
            or self._unknown_in_reserve()
        ):
            log.info("%s: closed at accept: %d peers before it", peer, self._connecting)
            await trio.aclose_forcefully(stream)
            return
        self._accepted += 1
        self._connecting += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        tls = trio.SSLStream(stream, self._ssl_context, server_side=True)
        session: Session | None = None
        try:
            identity = await self._handshake(tls, peer)
            if identity is None:  # no TLS to say goodbye with (aclose would handshake)
                await trio.aclose_forcefully(tls)
                return
            refusal = self._refusal(identity)
            if refusal is not None:
                who = identity if isinstance(identity, Identity) else None
                self._observer.connection_refused(
                    peer,
                    str(refusal.code),
                    refusal.message,
                    name=who.name if who else None,
                    role=who.role if who else None,
                )
                await self._refuse(tls, peer, refusal)
                return
            assert isinstance(identity, Identity)
            session = Session(
                tls,
                identity,
                peer=f"{identity.name}@{peer}",
                server_name=f"corrald {corral.__version__}",
                operations=self._operations,
                max_requests=self.config.max_requests_per_connection,
                hello_timeout=self.config.handshake_timeout,
                io_timeout=self.config.io_timeout,
                idle_timeout=self.config.idle_timeout,
                address=peer,
                observer=(
                    self._observer
                    if self.metrics is None
                    else Observers(self._observer, self.metrics)
                ),
            )
            self._connecting -= 1
            self._opened += 1
            self._sessions.add(session)
            if self._goodbye.is_set():
                session.shutdown("corrald is shutting down")
            log.info("%s: session opened (%s)", session.peer, identity.role)
            await session.run()
        except* Exception:
            # Plain or grouped (a session's tasks), never past this point:
            # one connection's failure must not end the server.
            log.exception("%s: connection failed", peer)
        finally:
            if session is None:
                self._connecting -= 1
            else:
                self._sessions.discard(session)
                log.info("%s: session closed", session.peer)
            await close_stream(tls)
            if self._live() == 0:
                self._idle.set()

    async def _handshake(
        self, tls: trio.SSLStream[trio.SocketStream], peer: str
    ) -> Identity | IdentityError | None:
        """The peer's identity (or why it has none); None if the handshake failed."""
        timeout = self.config.handshake_timeout
        with trio.move_on_after(timeout) as scope:
            # A slot once the ClientHello is here, so silent peers hold none;
            # the deadline covers the wait for it and the handshake together.
            await trio.lowlevel.wait_readable(tls.transport_stream.socket)
            async with self._handshaking:
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    reason, why = handshake_refusal(exc.__cause__)
                    self._refused[reason] += 1
                    log.info("%s: refused in the TLS handshake: %s", peer, why)
                    self._observer.handshake_refused(peer, reason, why)
                    await _flush_alert(tls)
                    return None
        if scope.cancelled_caught:
            self._refused["timeout"] += 1
            log.info("%s: dropped: TLS handshake not done in %.0f s", peer, timeout)
            self._observer.handshake_refused(peer, "timeout", f"not done in {timeout:g} s")
            return None
        try:
            return identity_from_certificate(tls.getpeercert(binary_form=True))
        except IdentityError as exc:
            return exc

    def _unknown_in_reserve(self) -> bool:
        """Whether a new peer is to be closed at accept because peers not
        yet identified already hold half the admins' reserve of descriptors
        (see corral.supervisor.descriptors)."""
        return (
            self._connecting >= self.descriptors.reserve // 2 and self.descriptors.within_reserve()
        )

    def _refusal(self, identity: Identity | IdentityError) -> Error | None:
        """Why this peer may not have a session, if it may not. An admin is
        refused only beyond their own cap: neither the cap on all sessions
        nor the descriptors' reserve keeps them out, so an admin can always
        look at a corrald its users have filled."""
        if isinstance(identity, IdentityError):
            return Error(id=None, code=ErrorCode.PERMISSION_DENIED, message=str(identity))
        try:
            self.descriptors.check(identity, "connections")
        except OperationError as exc:
            return Error(id=None, code=exc.code, message=str(exc))
        limit = self.config.max_connections
        if len(self._sessions) >= limit and not identity.is_admin:
            message = f"corrald is serving its maximum of {limit} connections; try again later"
            return Error(id=None, code=ErrorCode.RESOURCE_EXHAUSTED, message=message)
        limit = self.config.max_connections_per_user
        if sum(1 for s in self._sessions if s.identity == identity) >= limit:
            message = (
                f"{identity.name} has {limit} connections open, the most one user may have; "
                "close one and try again"
            )
            return Error(id=None, code=ErrorCode.RESOURCE_EXHAUSTED, message=message)
        return None

    async def _refuse(self, tls: trio.SSLStream[trio.SocketStream], peer: str, why: Error) -> None:
        """Tell the peer in one error frame why it may not have a session."""
        log.info("%s: refused: %s", peer, why.message)
        frame = Connection(Role.SERVER).send(why)
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(*GONE):
                await tls.send_all(frame)

"""The async corral client: one mutual-TLS connection carrying many requests.

    async with connect("127.0.0.1:7443", "var/pki/clients/admin") as client:
        info = await client.info()
        print(info.identity.name, info.cgroup)

Theory of operation. `connect` opens the socket, runs the TLS handshake,
sends hello and waits for the welcome: only a welcome means authenticated.
With TLS 1.3 a server that refuses our certificate does so after our side
of the handshake has finished, so the refusal (an error frame, a TLS alert
or a bare EOF) arrives here, and each becomes one clear error. Then a reader
task routes every reply to the request that waits for it, by id.
"""

from __future__ import annotations

import contextlib
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import trio

from corral.address import Address
from corral.client.connecting import CONNECT_TIMEOUT, RECEIVE_SIZE, SEND_TIMEOUT, resolve
from corral.client.errors import (
    ConnectError,
    CorralError,
    InputClosed,
    ServerError,
    TLSError,
)
from corral.client.handshake import handshake, open_transport
from corral.client.job_streams import Attachment, AuditStream, Chunk, LogStream
from corral.client.jobs import JobInfo
from corral.client.operations import (
    LOG_WINDOW,
    ServerInfo,
    list_page,
    start_args,
    stop_args,
    stopped_job,
)
from corral.identity import Identity
from corral.protocol import (
    NEED_DATA,
    Cancel,
    Connection,
    Credit,
    Data,
    Eof,
    Error,
    Message,
    ProtocolError,
    Request,
    Result,
    Signal,
    Welcome,
)
from corral.records import Record
from corral.streams import CLOSE_TIMEOUT, close_stream

# How long a cancelled start waits for corrald's answer, and then for its
# job's stop, before it gives up (the job is then left as it is).
START_UNDO_TIMEOUT = 10.0
# Input sent in one Data frame: what corrald sends the shim in one datagram
# (corral.ipc_input.MAX_INPUT_DATA), well within a frame; each frame costs
# both ends the same whatever its size.
INPUT_CHUNK = 128 << 10


@dataclass(slots=True)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | CorralError | None = None


class Client:
    """A live, authenticated connection to corrald. Use `connect()` to get one."""

    def __init__(
        self,
        tls: trio.SSLStream[trio.SocketStream],
        conn: Connection,
        address: Address,
        welcome: Welcome,
    ) -> None:
        self.address = address
        self.identity = Identity(name=welcome.name, role=welcome.role)
        self.server = welcome.server
        self._tls = tls
        self._conn = conn
        self._ids = count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, trio.MemorySendChannel[Message | CorralError]] = {}
        self._send_lock = trio.Lock()
        # Senders of input waiting for corrald's credit, by request id.
        self._input_waiters: dict[int, trio.lowlevel.ParkingLot] = {}
        self._closed: CorralError | None = None
        self._closed_event = trio.Event()

    @property
    def closed(self) -> CorralError | None:
        """Why the connection is gone (None while it is up): every call raises it."""
        return self._closed

    # -- operations ----------------------------------------------------------

    async def wait_closed(self) -> CorralError:
        """Return once the connection is gone (corrald's goodbye, a loss, our
        close), with why: what every call raises from then on."""
        await self._closed_event.wait()
        assert self._closed is not None
        return self._closed

    async def ping(self) -> None:
        """A request that does nothing but keep an idle connection open."""
        await self.call("ping")

    async def _keep_alive(self, interval: float) -> None:
        """Ping every `interval` s, so corrald's idle timeout never closes us."""
        while True:
            await trio.sleep(interval)
            try:
                await self.ping()
            except CorralError:
                return  # the connection is going; whoever uses it will hear why

    async def info(self) -> ServerInfo:
        """The server's version and cgroup flavour, and who we are to it."""
        return ServerInfo.from_value(await self.call("info"))

    async def start(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        limits: Mapping[str, int | float] | None = None,
        max_runtime: float | None = None,
        writable: Sequence[str | bytes] = (),
        env_clear: bool = False,
        stdin: bool = False,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
        host_root: bool = False,
        seccomp: str | None = None,
    ) -> JobInfo:
        """Start a job; return once its command runs (ServerError if it cannot).

        The job runs as `user` (admins only): by default a uid of its own;
        "root" is root in the job's own user namespace; `host_root` (admins,
        where the policy allows) is root on the host. `seccomp` "unconfined"
        (admins) runs it without the syscall filter.

        `env` adds to the default environment (PATH, HOME, LANG, TERM),
        replacing the names it gives; with `env_clear`, it is all there is.
        The job sees the host read-only except its own /tmp and /dev/shm and
        the `writable` paths (where file permissions still apply).

        With `stdin` the job's stdin is held open for input (`attach`), else
        it is /dev/null. With `tty` the job gets a terminal of its own,
        `tty_size` (columns, rows) at first; its stdout and stderr are the
        terminal's one stream.

        Cancelled or interrupted (a timeout around it, Ctrl+C), a start
        leaves no job behind: corrald's answer is awaited (a few ms; at most
        START_UNDO_TIMEOUT), and the job it started, which nobody else
        knows of, is stopped at once and removed.
        """
        args = start_args(
            argv,
            env=env,
            cwd=cwd,
            user=user,
            limits=limits,
            max_runtime=max_runtime,
            writable=writable,
            env_clear=env_clear,
            stdin=stdin,
            tty=tty,
            tty_size=tty_size,
            host_root=host_root,
            seccomp=seccomp,
        )
        return JobInfo.from_wire((await self.call("start", args, undo=self._undo_start))["job"])

    async def _undo_start(self, reply: dict[str, Any]) -> None:
        """Stop at once and remove the job a start abandoned by its caller made."""
        job_id = str(reply["job"]["id"])
        await self.stop(job_id, 0)
        await self.remove(job_id)

    async def stop(self, job_id: str, grace: float | None = None) -> JobInfo:
        """Stop a job (SIGTERM, then SIGKILL after `grace` s); return its final
        state. A job that has ended already is no error: see `already_ended`."""
        return stopped_job(await self.call("stop", stop_args(job_id, grace)))

    async def wait(self, job_id: str) -> JobInfo:
        """Return once the job has ended, with its final state."""
        return JobInfo.from_wire((await self.call("wait", {"id": job_id}))["job"])

    async def status(self, job_id: str) -> JobInfo:
        return JobInfo.from_wire((await self.call("status", {"id": job_id}))["job"])

    async def list(self, *, everyone: bool = False) -> list[JobInfo]:
        """Our jobs, oldest first; with `everyone` (admins only) every job."""
        jobs: list[JobInfo] = []
        args: dict[str, Any] | None = {"all": everyone}
        while args is not None:  # a page at a time
            page, args = list_page(args, await self.call("list", args))
            jobs += page
        return jobs

    async def remove(self, job_id: str) -> str:
        """Remove a finished job and its files; return its full id."""
        return str((await self.call("remove", {"id": job_id}))["id"])

    def audit(
        self,
        *,
        since: str | None = None,
        user: str | None = None,
        follow: bool = False,
        window: int = LOG_WINDOW,
    ) -> AuditStream:
        """The audit trail (admins): its entries from `since` (an RFC 3339
        time), of `user` alone if given; with `follow`, new ones as they
        come. Use it with `async with`; see `AuditStream`."""
        args: dict[str, Any] = {"follow": follow}
        if since is not None:
            args["since"] = since
        if user is not None:
            args["user"] = user
        return AuditStream(self, args, window)

    def logs(
        self, job_id: str, *, follow: bool = False, offset: int = 0, window: int = LOG_WINDOW
    ) -> LogStream:
        """A job's output from `offset` (a byte offset in output.log): what is
        there now, or with `follow` everything until the job ends. Use it with
        `async with`; see `LogStream`."""
        args = {"id": job_id, "follow": follow, "offset": offset}
        return LogStream(self, args, offset=offset, window=window)

    def attach(
        self,
        job_id: str,
        *,
        input: bool = True,
        offset: int | None = None,
        eof_on_disconnect: bool = False,
        window: int = LOG_WINDOW,
    ) -> Attachment:
        """Attach to a running job: its output from `offset` (default: from
        now), and with `input` our input to it (the job must have been
        started with `stdin`; failed_precondition otherwise). With
        `eof_on_disconnect`, a connection lost while attached ends the job's
        stdin (a detach never does). Use it with `async with`; see
        `Attachment`."""
        args: dict[str, Any] = {"id": job_id, "input": input}
        if offset is not None:
            args["offset"] = offset
        if eof_on_disconnect:
            args["eof_on_disconnect"] = True
        return Attachment(self, job_id, args, window)

    async def resize(self, job_id: str, columns: int, rows: int) -> None:
        """Give a job's terminal a new size, columns by rows (it gets SIGWINCH)."""
        await self.call("resize", {"id": job_id, "size": [columns, rows]})

    async def _open_stream(
        self, op: str, args: dict[str, Any], window: int
    ) -> tuple[int, trio.MemoryReceiveChannel[Message | CorralError]]:
        if self._closed is not None:
            raise self._closed
        request_id = next(self._ids)
        # Unbounded, yet bounded by the credit: corrald sends no more than that.
        send, receive = trio.open_memory_channel[Message | CorralError](math.inf)
        self._streams[request_id] = send
        try:
            await self._send(Request(id=request_id, op=op, args=args))
            # corrald may have refused the request already (not_found...):
            # then there is no stream to grant credit to.
            await self._send(Credit(id=request_id, amount=window), unless_ended=True)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return request_id, receive

    async def _grant(self, request_id: int, amount: int) -> None:
        """Let corrald send `amount` more bytes of output on a stream."""
        await self._send(Credit(id=request_id, amount=amount), unless_ended=True)

    def _input_closed(self, request_id: int) -> bool:
        return self._conn.input_closed(request_id)

    async def _send_input(self, request_id: int, data: bytes) -> None:
        """Send `data` as input on a stream, within the credit corrald grants
        (waiting for more as needed); InputClosed once it takes no more."""
        view = memoryview(data)
        sent = 0

        def piece() -> Data | None:
            """The next piece, as the credit and offset are when it goes
            (corrald's Eof may have come while we waited for our turn)."""
            nonlocal sent
            credit = self._conn.input_credit(request_id)
            if credit <= 0:
                return None
            chunk = bytes(view[: min(credit, INPUT_CHUNK)])
            sent = len(chunk)
            return Data(id=request_id, offset=self._conn.input_offset(request_id), data=chunk)

        while view:
            while self._conn.input_credit(request_id) <= 0:
                if self._closed is not None:
                    raise self._closed
                if self._conn.input_closed(request_id):
                    raise InputClosed("the job takes no more input")
                await self._input_lot(request_id).park()
            sent = 0
            await self._send(piece)
            view = view[sent:]

    async def _end_input(self, request_id: int) -> None:
        """Say the input of a stream has ended (nothing if it has already)."""
        if not self._conn.input_closed(request_id):
            await self._send(Eof(id=request_id), unless_ended=True)

    def _input_lot(self, request_id: int) -> trio.lowlevel.ParkingLot:
        return self._input_waiters.setdefault(request_id, trio.lowlevel.ParkingLot())

    async def _cancel(self, request_id: int) -> None:
        """Tell corrald to drop a request we no longer wait for."""
        if self._streams.pop(request_id, None) is None and request_id not in self._pending:
            return  # it has ended already
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CLOSE_TIMEOUT),
            contextlib.suppress(CorralError),
        ):
            await self._send(Cancel(id=request_id), unless_ended=True)

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        undo: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Run one request and return its result value.

        Raises ServerError if corrald answers with an error, ConnectError if
        the connection is lost. If the caller is cancelled (or interrupted),
        corrald is told to cancel the request too; or, with `undo`, the
        request runs on to its answer, whose value `undo` is called with
        (what the request did is undone) before the cancellation goes on.
        """
        if self._closed is not None:
            raise self._closed
        request_id = next(self._ids)
        pending = _Pending()
        # Registered before sending: the reply may arrive, and be routed by
        # the reader, while send_all is still finishing.
        self._pending[request_id] = pending
        try:
            await self._send(Request(id=request_id, op=op, args=args or {}))
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        try:
            await pending.done.wait()
        except BaseException:
            if undo is not None:
                await self._undo(request_id, pending, undo)
            elif not pending.done.is_set():
                del self._pending[request_id]
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CLOSE_TIMEOUT),
                    contextlib.suppress(CorralError),
                ):
                    await self._send(Cancel(id=request_id))
            raise
        reply = pending.reply
        if isinstance(reply, CorralError):
            raise reply
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message, reply.details)
        if isinstance(reply, Result):
            return reply.value
        raise TLSError(f"unexpected reply to {op!r}: {type(reply).__name__}")

    # -- plumbing ------------------------------------------------------------

    async def _undo(
        self,
        request_id: int,
        pending: _Pending,
        undo: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Wait (shielded, bounded) for an abandoned request's answer and undo it."""
        with trio.CancelScope(shield=True), trio.move_on_after(START_UNDO_TIMEOUT):
            await pending.done.wait()
            if isinstance(pending.reply, Result):
                with contextlib.suppress(CorralError, KeyError, TypeError):
                    await undo(pending.reply.value)
        self._pending.pop(request_id, None)

    async def _send(
        self,
        message: Message | Callable[[], Message | None],
        *,
        unless_ended: bool = False,
    ) -> None:
        """Send one message; with `unless_ended`, nothing if its request has
        had its final reply (credit racing the end of a stream). `message`
        may be a function making it once the send's turn has come (from the
        connection's state then; None: nothing to send)."""
        async with self._send_lock:
            if self._closed is not None:
                raise self._closed
            if callable(message):
                made = message()
                if made is None:
                    return
                message = made
            if unless_ended and getattr(message, "id", None) not in self._conn.open_ids:
                return
            try:
                frame = self._conn.send(message)
            except ProtocolError as exc:
                raise TLSError(f"cannot send to {self.address}: {exc}") from exc
            # A send cancelled halfway would break the TLS stream for every
            # request on it: finish it, unless corrald stops reading for long.
            with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT) as timer:
                try:
                    await self._tls.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise self._close(ConnectError(f"connection to {self.address} lost")) from None
            if timer.cancelled_caught:
                message_text = f"corrald at {self.address} stopped reading for {SEND_TIMEOUT:g} s"
                raise self._close(ConnectError(message_text))

    def _close(self, reason: CorralError) -> CorralError:
        """Fail every waiting request with `reason`; later calls raise it too."""
        if self._closed is None:
            self._closed = reason
            self._closed_event.set()
        for request_id, pending in list(self._pending.items()):
            pending.reply = self._closed
            pending.done.set()
            del self._pending[request_id]
        for stream in self._streams.values():
            stream.send_nowait(self._closed)
        self._streams.clear()
        for lot in self._input_waiters.values():
            lot.unpark_all()
        return self._closed

    async def _read_loop(self) -> None:
        while True:
            try:
                event = self._conn.next_event()
            except ProtocolError as exc:
                self._close(TLSError(f"corrald at {self.address} broke the protocol: {exc}"))
                return
            if event is NEED_DATA:
                try:
                    data = await self._tls.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._conn.receive_data(bytes(data))
                continue
            if isinstance(event, Signal):  # PEER_CLOSED
                self._close(ConnectError(f"corrald at {self.address} closed the connection"))
                return
            if isinstance(event, Error) and event.id is None:
                self._close(ServerError(event.code, event.message))
                return
            request_id = getattr(event, "id", None)
            if isinstance(event, Credit | Eof):  # for a sender of input
                if lot := self._input_waiters.get(event.id):
                    lot.unpark_all()
                continue
            if (stream := self._streams.get(request_id)) is not None:  # type: ignore[arg-type]
                with contextlib.suppress(trio.BrokenResourceError):  # its reader has gone
                    stream.send_nowait(event)
                if not isinstance(event, Data):
                    del self._streams[request_id]  # type: ignore[arg-type]
                    if lot := self._input_waiters.pop(request_id, None):  # type: ignore[arg-type]
                        lot.unpark_all()
                continue
            pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if pending is not None:
                pending.reply = event
                pending.done.set()


@asynccontextmanager
async def connect(
    address: str | Address,
    identity: str | os.PathLike[str] | ssl.SSLContext,
    *,
    server_name: str | None = None,
    timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109 - one budget for connect and handshake
    keepalive: float | None = None,
) -> AsyncIterator[Client]:
    """Connect and authenticate to corrald; close the connection on exit.

    `identity` is a directory with ca.crt, client.crt and client.key, or
    a client SSLContext built elsewhere (keys from a vault, say; tests).
    `server_name` is the name to verify in the server's certificate
    (default: the host of a TCP address, "localhost" for a unix socket).
    corrald closes a connection that sits idle (no request in flight,
    nothing sent) past its idle timeout (10 minutes by default); with
    `keepalive`, a ping every that many seconds keeps it open.
    Raises ConfigError, ConnectError, TLSError or AuthenticationError.
    """
    address, context, server_name = resolve(address, identity, server_name)
    transport = await open_transport(address, timeout)
    tls = trio.SSLStream(transport, context, server_hostname=server_name)
    try:
        conn, welcome = await handshake(tls, address, timeout)
        client = Client(tls, conn, address, welcome)
        try:
            # The reader is shielded from the caller's cancellation: cleanup
            # the caller runs shielded after a cancel (stop a job, remove
            # it) still gets its replies. It ends when the block does.
            reader = trio.CancelScope(shield=True)

            async def read() -> None:
                with reader:
                    await client._read_loop()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                if keepalive is not None:
                    nursery.start_soon(client._keep_alive, keepalive)
                try:
                    yield client
                finally:
                    reader.cancel()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises: the group only wraps what the caller's
            # block raised. Hand that back as it was.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        await close_stream(tls)


__all__ = [
    "CONNECT_TIMEOUT",
    "Attachment",
    "Chunk",
    "Client",
    "LogStream",
    "Record",
    "ServerInfo",
    "connect",
]

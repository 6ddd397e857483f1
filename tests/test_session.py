"""One session driven over an in-memory stream, with handlers made for the test.

No TLS here: the session only sees a byte stream, and in-memory streams let
the tests hold a handler open or stop reading exactly when they want.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.identity import Identity
from corral.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    Connection,
    Error,
    ErrorCode,
    Hello,
    Message,
    Request,
    Result,
    Role,
    Welcome,
)
from corral.supervisor.session import OUTGOING_FRAMES, Handler, RequestContext, Session

# Short, so the tests can tell them apart; the clock is trio's MockClock.
IO_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0


class Peer:
    """The client end: a Connection over the other half of the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)

    async def send(self, message: Message) -> None:
        await self.stream.send_all(self.conn.send(message))

    async def receive(self) -> Message | None:
        """The next message, or None once the session has closed."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, Message):
                return event
            else:
                return None


def make_session(
    stream: trio.abc.Stream, operations: dict[str, Handler], max_requests: int = 4
) -> Session:
    """A session for alice (user) over `stream`."""
    return Session(
        stream,
        Identity(name="alice", role="user"),
        peer="alice@test",
        server_name="corrald test",
        operations=operations,
        max_requests=max_requests,
        hello_timeout=10,
        io_timeout=IO_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
    )


@asynccontextmanager
async def session(
    operations: dict[str, Handler], *, max_requests: int = 4
) -> AsyncIterator[tuple[Peer, Session]]:
    server_end, client_end = trio.testing.memory_stream_pair()
    serving = make_session(server_end, operations, max_requests)
    peer = Peer(client_end)

    async def serve() -> None:  # as the server does: close the stream after
        await serving.run()
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await peer.send(Hello(version=PROTOCOL_VERSION, agent="test"))
        welcome = await peer.receive()
        assert isinstance(welcome, Welcome)
        assert (welcome.name, welcome.role) == ("alice", "user")
        yield peer, serving
        nursery.cancel_scope.cancel()


async def echo(context: RequestContext) -> dict[str, Any]:
    return {"args": context.request.args}


async def test_replies_echo_request_ids() -> None:
    async with session({"echo": echo}) as (peer, _):
        for request_id in (7, 3, 2**64 - 1):
            await peer.send(Request(id=request_id, op="echo", args={"n": request_id}))
            assert await peer.receive() == Result(id=request_id, value={"args": {"n": request_id}})


async def test_requests_over_the_cap_are_resource_exhausted() -> None:
    release = trio.Event()

    async def block(context: RequestContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with session({"block": block}, max_requests=2) as (peer, serving):
        for request_id in (1, 2, 3):
            await peer.send(Request(id=request_id, op="block", args={}))
        refused = await peer.receive()
        assert isinstance(refused, Error)
        assert (refused.id, refused.code) == (3, ErrorCode.RESOURCE_EXHAUSTED)
        assert "limit 2" in refused.message
        assert serving.statistics()["requests_in_flight"] == 2
        release.set()
        replies = [await peer.receive(), await peer.receive()]
        assert sorted(replies, key=repr) == [Result(id=1, value={}), Result(id=2, value={})]


async def test_cancel_ends_a_request_with_cancelled() -> None:
    started = trio.Event()

    async def forever(context: RequestContext) -> dict[str, Any]:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("not reached")

    async with session({"forever": forever, "echo": echo}) as (peer, serving):
        await peer.send(Request(id=1, op="forever", args={}))
        await started.wait()
        await peer.send(Cancel(id=1))
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (1, ErrorCode.CANCELLED)
        assert serving.statistics()["requests_in_flight"] == 0


async def test_a_failing_handler_is_internal_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(context: RequestContext) -> dict[str, Any]:
        raise ZeroDivisionError("oops")

    async with session({"broken": broken, "echo": echo}) as (peer, _):
        await peer.send(Request(id=1, op="broken", args={}))
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (1, ErrorCode.INTERNAL)
        assert "oops" not in reply.message  # internals stay in the log
        await peer.send(Request(id=2, op="echo", args={}))
        assert await peer.receive() == Result(id=2, value={"args": {}})
    assert "ZeroDivisionError" in caplog.text


async def test_a_reply_too_large_to_send_becomes_internal() -> None:
    async def huge(context: RequestContext) -> dict[str, Any]:
        return {"blob": b"x" * (2 << 20)}  # beyond the 1 MiB frame limit

    async with session({"huge": huge, "echo": echo}) as (peer, _):
        await peer.send(Request(id=1, op="huge", args={}))
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (1, ErrorCode.INTERNAL)
        assert "could not be sent" in reply.message
        await peer.send(Request(id=2, op="echo", args={}))
        assert await peer.receive() == Result(id=2, value={"args": {}})


async def test_a_huge_unknown_operation_name_is_answered_briefly() -> None:
    async with session({"echo": echo}) as (peer, _):
        await peer.send(Request(id=1, op="\0" * 300_000, args={}))
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (1, ErrorCode.UNIMPLEMENTED)
        assert "(300000 characters)" in reply.message
        assert len(reply.message) < 400
        await peer.send(Request(id=2, op="echo", args={}))
        assert await peer.receive() == Result(id=2, value={"args": {}})


async def test_a_slow_reader_is_not_mistaken_for_one_that_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def big(context: RequestContext) -> dict[str, Any]:
        return {"padding": b"x" * 60_000}

    server_end, client_end = trio.testing.lockstep_stream_pair()
    serving = make_session(server_end, {"big": big}, max_requests=64)
    peer = Peer(client_end)
    replies: list[Message] = []

    async def read_slowly() -> None:
        while (message := await peer.receive()) is not None:
            replies.append(message)
            await trio.sleep(0.005)

    with trio.fail_after(60):  # virtual seconds: a dropped session fails, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serving.run)
            await peer.send(Hello(version=PROTOCOL_VERSION, agent="test"))
            assert isinstance(await peer.receive(), Welcome)
            nursery.start_soon(read_slowly)
            for request_id in range(1, 65):
                await peer.send(Request(id=request_id, op="big", args={}))
            # Replies back up the queue; a refusal still finds room in the reserve.
            await peer.send(Request(id=65, op="unknown", args={}))
            while len(replies) < 65:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert sum(isinstance(reply, Result) for reply in replies) == 64
    assert next(r for r in replies if isinstance(r, Error)).code is ErrorCode.UNIMPLEMENTED


async def test_a_peer_that_stops_reading_is_dropped(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.supervisor.session")

    async def chatty(context: RequestContext) -> dict[str, Any]:
        return {"padding": b"x" * 4096}

    # A lockstep stream holds no bytes: a peer that does not read blocks
    # the session's writer at once, as a full TCP window would.
    server_end, client_end = trio.testing.lockstep_stream_pair()
    serving = make_session(server_end, {"chatty": chatty})
    peer = Peer(client_end)

    async def flood() -> None:
        await peer.send(Hello(version=PROTOCOL_VERSION, agent="test"))
        assert isinstance(await peer.receive(), Welcome)
        # Far more requests than the outgoing queue holds, never reading:
        # the queue fills with replies and refusals, and the session drops us.
        for request_id in range(1, OUTGOING_FRAMES * 4):
            await peer.send(Request(id=request_id, op="chatty", args={}))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await serving.run()
            assert serving.statistics()["requests_in_flight"] == 0
            nursery.cancel_scope.cancel()
    assert "dropped: not reading its replies" in caplog.text


# -- deadlines (virtual time: trio's autojump clock) ---------------------------------


async def test_an_idle_session_is_closed_but_not_while_a_request_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def block(context: RequestContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with session({"block": block, "echo": echo}) as (peer, _):
        await peer.send(Request(id=1, op="block", args={}))
        await trio.sleep(IDLE_TIMEOUT * 10)  # a long wait is not idleness
        release.set()
        assert await peer.receive() == Result(id=1, value={})
        replied = trio.current_time()
        # Anything the peer sends starts the idle time again.
        await trio.sleep(IDLE_TIMEOUT * 0.8)
        await peer.send(Request(id=2, op="echo", args={}))
        assert await peer.receive() == Result(id=2, value={"args": {}})
        goodbye = await peer.receive()
        closed = trio.current_time()
        assert goodbye == Error(
            id=None,
            code=ErrorCode.UNAVAILABLE,
            message=f"idle for {IDLE_TIMEOUT:g} s with no request in flight; closing",
        )
        assert await peer.receive() is None
        assert closed - replied == pytest.approx(IDLE_TIMEOUT * 1.8, abs=0.1)


async def test_a_frame_dribbled_in_is_dropped_after_the_io_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session({"echo": echo}) as (peer, _):
        frame = peer.conn.send(Request(id=1, op="echo", args={"pad": "x" * 100}))
        began = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):  # until the session closes
            for byte in frame[:-1]:  # one byte a second, never the last
                await peer.stream.send_all(bytes([byte]))
                await trio.sleep(1)
        assert trio.current_time() - began == pytest.approx(IO_TIMEOUT, abs=1.1)
        goodbye = await peer.receive()
        assert goodbye == Error(
            id=None,
            code=ErrorCode.FAILED_PRECONDITION,
            message=f"a frame took longer than {IO_TIMEOUT:g} s to arrive; closing",
        )
        assert await peer.receive() is None


async def test_a_busy_peer_whose_frames_straddle_receives_is_not_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Frames that keep arriving, each finished in the receive that starts
    the next, are each well within the timeout, however long it goes on."""
    async with session({"echo": echo}) as (peer, _):
        frames = b"".join(peer.conn.send(Request(id=i, op="echo", args={})) for i in range(1, 41))
        half = len(frames) // 40 // 2
        began = trio.current_time()
        for start in range(0, len(frames), half * 2):
            await peer.stream.send_all(frames[start : start + half * 2])
            await trio.sleep(IO_TIMEOUT * 0.4)
        assert trio.current_time() - began > IO_TIMEOUT * 10
        await peer.stream.send_all(frames[len(frames) - len(frames) % (half * 2) :])
        replies = [await peer.receive() for _ in range(40)]
        assert {r.id for r in replies if isinstance(r, Result)} == set(range(1, 41))


async def test_a_peer_that_takes_no_replies_is_dropped_after_the_io_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.supervisor.session")
    server_end, client_end = trio.testing.lockstep_stream_pair()
    serving = make_session(server_end, {"echo": echo})
    peer = Peer(client_end)
    with trio.fail_after(IO_TIMEOUT * 4):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serving.run)
            await peer.send(Hello(version=PROTOCOL_VERSION, agent="test"))
            # Never reading the welcome: the writer is stuck with its
            # first frame, and nothing else happens.
            began = trio.current_time()
    assert trio.current_time() - began >= IO_TIMEOUT
    assert f"dropped: took no replies for {IO_TIMEOUT:g} s" in caplog.text

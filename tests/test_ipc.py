"""corral.ipc: the messages between corrald, the spawner, the shims and
init; descriptors passed between them; and corrald's end of a shim's
channels (corral.worker.shim_link), against real sockets and pipes."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from corral import ipc, ipc_fds, ipc_input
from corral.errors import OperationError
from corral.job import Limits, State, Status, Usage
from corral.protocol.errors import ErrorCode
from corral.shim.deadlines import Deadlines, Due
from corral.store import SOCKET_FILE, pack, unpack
from corral.worker.shim_link import ShimVersionError, ask_shim, read_start_report

V = ipc.IPC_VERSION
texts = st.text(max_size=20)
byte_strings = st.binary(max_size=20)
counts = st.integers(min_value=0, max_value=2**31)
statuses = st.builds(
    Status,
    state=st.sampled_from(State),
    reason=texts,
    exit_code=st.none() | st.integers(0, 255),
    pid=st.none() | counts,
    usage=st.builds(Usage, cpu_seconds=st.floats(0, 1e6), memory_peak_bytes=counts),
)
sandbox = {
    "id": texts,
    "flavour": st.sampled_from(["v1", "v2"]),
    "cgroup_root": texts,
    "cgroup_parent": texts,
    "devices": st.lists(st.tuples(counts, counts), max_size=3).map(tuple),
    "slice": texts,
    "slice_limits": st.none()
    | st.builds(Limits, pids=st.none() | st.integers(2, 4096), memory=st.none() | st.just(1 << 30)),
}
MESSAGES = st.one_of(
    st.builds(ipc.Prepare, **sandbox),
    st.builds(ipc.Start, **sandbox, job_dir=texts),
    st.builds(ipc.Discard, id=texts),
    st.builds(ipc.Spawned, pid=counts),
    st.builds(ipc.Refused, message=texts),
    st.builds(ipc.Claim, job_dir=texts),
    st.builds(
        ipc.JobConfig,
        argv=st.lists(byte_strings, min_size=1, max_size=4).map(tuple),
        env=st.lists(st.tuples(byte_strings, byte_strings), max_size=4).map(tuple),
        cwd=byte_strings,
        uid=counts,
        gid=counts,
        groups=st.lists(counts, max_size=4).map(tuple),
        tmp_size=counts,
        writable=st.lists(byte_strings, max_size=3).map(tuple),
        stdin=st.booleans(),
        tty=st.booleans(),
        tty_size=st.tuples(st.integers(1, 2**16), st.integers(1, 2**16)),
        userns=st.booleans(),
        inside_uid=counts,
        inside_gid=counts,
        passwd=byte_strings,
        group=byte_strings,
    ),
    st.builds(ipc.MapUser),
    st.builds(ipc.UserMapped),
    st.builds(ipc.Started),
    st.builds(ipc.InitFailure, step=texts, errno=st.integers(0, 200), message=texts),
    st.builds(ipc.StartReport.running, statuses),
    st.builds(
        ipc.StartReport.failed,
        st.sampled_from(ErrorCode),
        texts,
        st.none() | texts,
        st.integers(0, 200),
    ),
    st.builds(ipc.Hello, version=counts),
    st.builds(ipc.StatusRequest),
    st.builds(ipc.StopRequest, grace=st.none() | st.floats(0, 1e6), by=texts),
    st.builds(ipc.StatusReply, status=statuses),
    st.builds(ipc.Stopping),
    st.builds(ipc.Refusal, message=texts),
)
INPUT_MESSAGES = st.one_of(
    st.builds(ipc_input.InputEnd, kind=st.sampled_from([ipc_input.PIPE, ipc_input.TTY])),
    st.builds(ipc_input.AttachInput),
    st.builds(ipc_input.InputAttached),
    st.builds(ipc_input.Input, data=st.binary(max_size=ipc_input.MAX_INPUT_DATA)),
    st.builds(ipc_input.InputClose),
    st.builds(ipc_input.InputClosed, reason=texts),
    st.builds(ipc_input.Resize, columns=counts, rows=counts),
    st.builds(ipc_input.Resized),
)
EVERY_TYPE: tuple[type[ipc.MessageBase], ...] = (*ipc.MESSAGES.values(), *ipc_input.MESSAGES)


def _decode_any(data: bytes) -> ipc.MessageBase:
    tag = unpack(data)["t"]
    (cls,) = [kind for kind in EVERY_TYPE if tag == kind.TAG]
    return ipc.decode_any(data, (cls,))


@given(MESSAGES | INPUT_MESSAGES)
def test_every_message_survives_the_wire(message: ipc.MessageBase) -> None:
    assert _decode_any(message.encode()) == message


def test_every_message_type_is_in_the_round_trip() -> None:
    tags = {cls.TAG for cls in EVERY_TYPE}
    assert len(tags) == len(EVERY_TYPE) == 18 + 8


def test_input_the_shim_cannot_read_whole_is_refused() -> None:
    """An Input over MAX_INPUT_DATA would not fit the datagram the shim reads."""
    too_much = pack({"t": "input", "data": bytes(ipc_input.MAX_INPUT_DATA + 1)})
    with pytest.raises(ipc.IPCError, match="more than"):
        ipc.decode_any(too_much, (ipc_input.Input,))
    largest = ipc_input.Input(data=bytes(ipc_input.MAX_INPUT_DATA)).encode()
    assert len(largest) <= ipc_input.MAX_INPUT_MESSAGE


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        ({"t": "input_end", "version": ipc.IPC_VERSION, "kind": "socket"}, "'pipe' or 'tty'"),
        ({"t": "input_end", "kind": "pipe"}, "lacks field 'version'"),
        ({"t": "input", "data": "text"}, "must be bytes"),
        ({"t": "resize", "columns": -1, "rows": 2}, "must not be negative"),
        ({"t": "resize", "columns": True, "rows": 2}, "must be int"),
    ],
)
def test_malformed_input_messages_say_what_is_wrong(wire: object, words: str) -> None:
    with pytest.raises(ipc.IPCError, match=words):
        ipc.decode_any(pack(wire), tuple(ipc_input.MESSAGES))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tty_size": [80]}, "must be \\[columns, rows\\]"),
        ({"tty_size": [0, 24]}, "must be \\[columns, rows\\]"),
        ({"tty_size": [80, True]}, "must be a list of int"),
        ({"stdin": 1}, "field 'stdin' of 'job' must be bool"),
        ({"tty": None}, "field 'tty' of 'job' must be bool"),
    ],
)
def test_a_job_config_with_a_wrong_input_field_is_refused(
    fields: dict[str, object], words: str
) -> None:
    job = ipc.JobConfig(
        argv=(b"true",), env=(), cwd=b"/", uid=0, gid=0, groups=(), tmp_size=1, tty=True
    )
    with pytest.raises(ipc.IPCError, match=words):
        ipc.decode(pack({**job.to_wire(), **fields}), (ipc.JobConfig,))


@given(st.binary(max_size=64))
def test_random_bytes_are_an_ipc_error_or_nothing_else(data: bytes) -> None:
    with contextlib.suppress(ipc.IPCError):
        ipc.decode(data, (ipc.StartReport, ipc.Hello))


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | texts
    | byte_strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)


@given(st.sampled_from(EVERY_TYPE), st.dictionaries(texts, JSONISH, max_size=6))
def test_a_map_of_the_right_type_with_random_fields_is_an_ipc_error_or_a_message(
    cls: type[ipc.MessageBase], fields: dict[str, Any]
) -> None:
    """Whatever a peer puts beside "t" (and a right version), only IPCError escapes."""
    for version in (ipc.IPC_VERSION, fields.get("version")):
        data = pack({**fields, "t": cls.TAG, "version": version})
        try:
            message = ipc.decode_any(data, (cls,))
        except ipc.IPCError:
            continue
        assert isinstance(message, cls)


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        ([1, 2], "must be a map"),
        ({"ok": True}, "lacks a string type field"),
        ({"t": "nonsense"}, "unknown message type"),
        ({"t": "spawned", "pid": 1}, "expected a 'start_report' message"),
        ({"t": "start_report", "ok": True}, "lacks field 'version'"),
        ({"t": "start_report", "version": V, "ok": 1}, "must be bool"),
        ({"t": "start_report", "version": V, "ok": True}, "lacks field 'status'"),
        ({"t": "start_report", "version": V, "ok": True, "status": {}}, "unreadable status"),
        ({"t": "start_report", "version": V, "ok": False, "message": "x"}, "lacks field 'code'"),
        ({"t": "start_report", "version": V, "ok": False, "code": "nope", "message": ""}, "code"),
    ],
)
def test_malformed_messages_say_what_is_wrong(wire: object, words: str) -> None:
    with pytest.raises(ipc.IPCError, match=words):
        ipc.decode(pack(wire), (ipc.StartReport,))


def test_a_message_of_another_version_is_refused_before_it_is_read() -> None:
    # A version-2 report may look nothing like ours: not one field is read.
    data = pack({"t": "start_report", "version": ipc.IPC_VERSION + 1, "whatever": 1})
    with pytest.raises(ipc.VersionError) as caught:
        ipc.decode(data, (ipc.StartReport,))
    assert caught.value.version == ipc.IPC_VERSION + 1


def test_an_init_failure_keeps_the_errno_of_the_step() -> None:
    failure = ipc.InitFailure.of("cwd", FileNotFoundError(2, "No such file or directory"))
    assert (failure.step, failure.errno, failure.message) == ("cwd", 2, "No such file or directory")
    assert ipc.InitFailure.of("init", "a bug").errno == 0


def test_a_job_config_is_framed_by_its_length() -> None:
    job = ipc.JobConfig(
        argv=(b"true",), env=((b"A", b"1"),), cwd=b"/", uid=0, gid=0, groups=(), tmp_size=1
    )
    frame = job.frame()
    (size,) = ipc.JOB_HEADER.unpack(frame[: ipc.JOB_HEADER.size])
    assert size == len(frame) - ipc.JOB_HEADER.size
    assert ipc.decode(frame[ipc.JOB_HEADER.size :], (ipc.JobConfig,)) == job


# -- descriptors -----------------------------------------------------------------------


@pytest.fixture
def seqpacket() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        yield left, right


def test_a_descriptor_passes_with_its_message_close_on_exec(
    seqpacket: tuple[socket.socket, socket.socket],
) -> None:
    left, right = seqpacket
    read_end, write_end = os.pipe()
    try:
        ipc_fds.send_message(left, ipc.Claim(job_dir="/jobs/x"), [write_end])
        received = ipc_fds.receive_message(right, (ipc.Claim,))
        assert received is not None
        message, fds = received
        assert message == ipc.Claim(job_dir="/jobs/x")
        assert len(fds) == 1
        assert not os.get_inheritable(fds[0])  # MSG_CMSG_CLOEXEC
        os.write(fds[0], b"through the passed end")
        os.close(fds[0])
        assert os.read(read_end, 100) == b"through the passed end"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_descriptors_beyond_the_ancillary_buffer_are_refused_not_dropped(
    seqpacket: tuple[socket.socket, socket.socket],
) -> None:
    left, right = seqpacket
    many = [os.open("/dev/null", os.O_RDONLY) for _ in range(ipc.MAX_FDS * 4)]
    before = len(os.listdir("/proc/self/fd"))
    try:
        ipc_fds.send_message(left, ipc.Spawned(pid=1), many)
        with pytest.raises(ipc.IPCError, match="truncated"):
            ipc_fds.receive_message(right, (ipc.Spawned,))
        assert len(os.listdir("/proc/self/fd")) == before  # what did arrive was closed
    finally:
        ipc_fds.close_all(many)


def test_a_malformed_message_closes_the_descriptors_that_came_with_it(
    seqpacket: tuple[socket.socket, socket.socket],
) -> None:
    left, right = seqpacket
    fd = os.open("/dev/null", os.O_RDONLY)
    before = len(os.listdir("/proc/self/fd"))
    try:
        socket.send_fds(left, [pack({"t": "claim", "version": ipc.IPC_VERSION})], [fd])
        with pytest.raises(ipc.IPCError, match="job_dir"):
            ipc_fds.receive_message(right, (ipc.Claim,))
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)


def test_eof_is_none(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    left, right = seqpacket
    left.shutdown(socket.SHUT_WR)
    assert ipc_fds.receive_message(right, (ipc.Claim,)) is None


# -- the shim's clock -------------------------------------------------------------------


def test_a_second_shorter_stop_brings_the_kill_closer_and_says_so() -> None:
    deadlines = Deadlines()
    assert deadlines.request_stop("alice", 10.0, now=100.0) is Due.TERM
    assert deadlines.request_stop("bob", 2.0, now=101.0) is None
    assert deadlines.stop is not None
    assert (deadlines.stop.by, deadlines.stop.grace) == ("alice", 3.0)
    assert deadlines.due(102.9) == []
    assert deadlines.due(103.0) == [Due.KILL]
    assert deadlines.timeout_ms(103.0) is None


def test_setup_and_runtime_deadlines_fire_once() -> None:
    deadlines = Deadlines()
    deadlines.setup_began(0.0, 30.0)
    assert deadlines.timeout_ms(0.0) == 30_001
    assert deadlines.due(30.0) == [Due.SETUP_EXPIRED]
    assert deadlines.due(31.0) == []
    deadlines.running(40.0, max_runtime=5.0)
    assert deadlines.due(45.0) == [Due.RUNTIME_EXPIRED]
    assert deadlines.request_stop("max runtime 5 s", 0.0, now=45.0) is Due.KILL


# -- corrald's end: the start report ---------------------------------------------------


async def test_a_start_report_is_read_whole() -> None:
    read_end, write_end = os.pipe()
    status = Status(state=State.RUNNING, reason="running", pid=7)
    os.write(write_end, ipc.StartReport.running(status).encode())
    os.close(write_end)
    report = await read_start_report(read_end, timeout=5)
    assert report.ok
    assert report.status == status


async def test_a_failed_start_report_keeps_its_step_and_errno() -> None:
    read_end, write_end = os.pipe()
    sent = ipc.StartReport.failed(ErrorCode.INVALID_ARGUMENT, "cannot run 'x'", "exec", 2)
    os.write(write_end, sent.encode())
    os.close(write_end)
    report = await read_start_report(read_end, timeout=5)
    assert (report.ok, report.code, report.step, report.errno) == (
        False,
        ErrorCode.INVALID_ARGUMENT,
        "exec",
        2,
    )


async def test_eof_before_a_report_means_the_shim_died() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    report = await read_start_report(read_end, timeout=5)
    assert (report.ok, report.code) == (False, ErrorCode.INTERNAL)
    assert "died while starting" in report.message


async def test_no_report_in_time_is_a_failed_report() -> None:
    read_end, write_end = os.pipe()
    try:
        report = await read_start_report(read_end, timeout=0.05)
    finally:
        os.close(write_end)
    assert (report.ok, report.code) == (False, ErrorCode.INTERNAL)
    assert "did not report in 0.05 s" in report.message


# -- corrald's end: the control socket --------------------------------------------------


class FakeShim:
    """A shim.sock served by the test: answers a Hello with `hello`, then
    each request with `reply`, and records every message it was sent."""

    def __init__(self, job_dir: Path, hello: dict[str, Any], reply: ipc.ControlReply) -> None:
        self.hello = hello
        self.reply = reply
        self.received: list[dict[str, Any]] = []
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.path = str(job_dir / SOCKET_FILE)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.sock:
            await self.sock.bind(self.path)
            self.sock.listen(1)
            task_status.started()
            while True:
                client, _ = await self.sock.accept()
                with client:
                    while data := await client.recv(65536):
                        wire = msgpack.unpackb(data)
                        self.received.append(wire)
                        if wire.get("t") == "hello":
                            await client.send(pack(self.hello))
                        else:
                            await client.send(self.reply.encode())


@pytest.fixture
def job_dir() -> Iterator[Path]:
    # Short: a unix socket path holds 108 bytes, and pytest's tmp paths are long.
    with tempfile.TemporaryDirectory(prefix="ipc") as directory:
        yield Path(directory)


async def test_a_shim_of_this_version_answers(job_dir: Path) -> None:
    status = Status(state=State.RUNNING, reason="running")
    shim = FakeShim(job_dir, ipc.Hello().to_wire(), ipc.StatusReply(status=status))
    async with trio.open_nursery() as nursery:
        await nursery.start(shim.serve)
        reply = await ask_shim(job_dir, ipc.StatusRequest(), timeout=5)
        nursery.cancel_scope.cancel()
    assert reply == ipc.StatusReply(status=status)
    assert [m["t"] for m in shim.received] == ["hello", "status"]


@pytest.mark.parametrize(
    "hello",
    [
        {"t": "hello", "version": ipc.IPC_VERSION + 1},  # a newer shim (corrald downgraded)
        {"ok": False, "error": "bad request: 'op'"},  # a shim from before versions
    ],
    ids=["unknown", "unversioned"],
)
async def test_a_corrald_that_meets_a_shim_of_a_version_it_does_not_speak_leaves_it_running(
    job_dir: Path, hello: dict[str, Any]
) -> None:
    shim = FakeShim(job_dir, hello, ipc.Stopping())
    async with trio.open_nursery() as nursery:
        await nursery.start(shim.serve)
        with pytest.raises(ShimVersionError) as caught:
            await ask_shim(job_dir, ipc.StopRequest(grace=1.0, by="alice"), timeout=5)
        nursery.cancel_scope.cancel()
    error = caught.value
    assert error.code is ErrorCode.FAILED_PRECONDITION
    assert isinstance(error, OperationError)
    assert f"version {ipc.IPC_VERSION + 1}" in str(error) or "version 0" in str(error)
    assert f"speaks version {ipc.IPC_VERSION}" in str(error)
    assert "left running" in str(error)
    # It was never told to stop: only the Hello reached it.
    assert [m.get("t") for m in shim.received] == ["hello"]


async def test_a_shim_of_the_version_before_input_is_still_asked_and_stopped(
    job_dir: Path,
) -> None:
    """Version 1 shims (their jobs take no input) keep running under this
    corrald: status and stop are asked of them as of any."""
    assert 1 in ipc.SHIM_VERSIONS
    shim = FakeShim(job_dir, {"t": "hello", "version": 1}, ipc.Stopping())
    async with trio.open_nursery() as nursery:
        await nursery.start(shim.serve)
        reply = await ask_shim(job_dir, ipc.StopRequest(grace=1.0, by="alice"), timeout=5)
        nursery.cancel_scope.cancel()
    assert reply == ipc.Stopping()
    assert [m.get("t") for m in shim.received] == ["hello", "stop"]


async def test_a_shim_that_is_gone_is_none(job_dir: Path) -> None:
    assert await ask_shim(job_dir, ipc.StatusRequest(), timeout=5) is None  # no socket
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(job_dir / SOCKET_FILE))
    stale.close()  # a socket file nobody listens on: refused
    assert await ask_shim(job_dir, ipc.StatusRequest(), timeout=5) is None


async def test_a_shim_that_answers_nonsense_is_an_internal_error(job_dir: Path) -> None:
    shim = FakeShim(job_dir, {"t": "hello", "version": "one"}, ipc.Stopping())
    async with trio.open_nursery() as nursery:
        await nursery.start(shim.serve)
        with pytest.raises(OperationError, match="answered nonsense") as caught:
            await ask_shim(job_dir, ipc.StatusRequest(), timeout=5)
        nursery.cancel_scope.cancel()
    assert caught.value.code is ErrorCode.INTERNAL
    assert not isinstance(caught.value, ShimVersionError)


async def test_a_silent_shim_is_an_internal_error_after_the_timeout(job_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        listener.bind(str(job_dir / SOCKET_FILE))
        listener.listen(1)  # accepted by the kernel, never answered
        with pytest.raises(OperationError, match=r"did not answer in 0\.1 s"):
            await ask_shim(job_dir, ipc.StatusRequest(), timeout=0.1)

"""Jobs that take input, from the shim's side: real jobs through the worker
library, and the test speaking to each job's shim.sock itself (AttachInput,
Input, InputClose, Resize) as corrald would.

Needs root, namespaces and cgroups, as tests/test_jobs.py does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import socket
import sys
import termios
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from corral import ipc, ipc_input
from corral.job import JobSpec, State
from corral.records import STREAM_MARKER, STREAM_STDERR, STREAM_STDOUT
from corral.shim.cgroup import detect_flavour, open_cgroup
from corral.shim.input_relay import MAX_ATTACHED, InputRelay
from corral.shim.input_relay import State as State_
from corral.shim.loop import Loop
from corral.shim.output_log import MARKER_RESERVE, OutputLog
from corral.shim.terminal import Terminal, get_size
from corral.store import OUTPUT_FILE, socket_path
from corral.worker.manager import Job, JobManager

from .conftest import TEST_CGROUP_PARENT, managed_jobs, until

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

FLAVOUR = detect_flavour()
PARENT = TEST_CGROUP_PARENT
# How long a blocking call on a shim's socket may take before the test fails.
SOCKET_TIMEOUT = 10.0
PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture(params=[1, 0], ids=["warm", "cold"])
async def jobs(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobManager]:
    """A JobManager on a fresh state directory with a sandbox built ahead (warm)
    or none (cold): the input channel is made before the job is known, or with
    it. Afterwards: every job has ended and no cgroup of ours is left."""
    async with managed_jobs(tmp_path / "state", warm=request.param) as manager:
        yield manager


def records(job_dir: Path) -> list[list[object]]:
    """The msgpack records of a job's output.log."""
    with open(job_dir / OUTPUT_FILE, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False))


def output(job_dir: Path, stream: int = STREAM_STDOUT) -> bytes:
    return b"".join(r[2] for r in records(job_dir) if r[0] == stream)  # type: ignore[misc]


def markers(job_dir: Path) -> list[object]:
    return [r[2] for r in records(job_dir) if r[0] == STREAM_MARKER]


# -- speaking to shim.sock ---------------------------------------------------------------


def connect(job_dir: Path) -> socket.socket:
    """A control connection to the job's shim, past the Hellos."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(SOCKET_TIMEOUT)
    with socket_path(job_dir) as address:
        sock.connect(address)
    sock.send(ipc.Hello().encode())
    hello = ipc.decode(sock.recv(ipc.MAX_CONTROL_MESSAGE), (ipc.Hello,))
    assert hello.version == ipc.IPC_VERSION
    return sock


def ask(job_dir: Path, request: ipc.MessageBase) -> ipc.MessageBase:
    """One request on a new control connection, and its answer."""
    with connect(job_dir) as sock:
        sock.send(request.encode())
        return receive(sock)


def receive(sock: socket.socket) -> ipc.MessageBase:
    """The shim's next message on `sock`: any the control or attached channel has."""
    expected = (
        ipc.Refusal, ipc.StatusReply, ipc.Stopping,
        ipc_input.InputAttached, ipc_input.InputClosed, ipc_input.Resized,
    )  # fmt: skip
    return ipc.decode_any(sock.recv(ipc.MAX_CONTROL_MESSAGE), expected)


def attach(job_dir: Path) -> socket.socket:
    """A connection that writes the job's input."""
    sock = connect(job_dir)
    sock.send(ipc_input.AttachInput().encode())
    assert receive(sock) == ipc_input.InputAttached()
    return sock


def send(sock: socket.socket, data: bytes) -> None:
    """`data` as Input datagrams, blocking while the job does not read."""
    for start in range(0, len(data), ipc_input.MAX_INPUT_DATA):
        sock.send(ipc_input.Input(data=data[start : start + ipc_input.MAX_INPUT_DATA]).encode())


def closed_with(sock: socket.socket) -> str:
    """The reason of the InputClosed the shim sends `sock`, which must then be at EOF."""
    message = receive(sock)
    assert isinstance(message, ipc_input.InputClosed)
    assert sock.recv(ipc.MAX_CONTROL_MESSAGE) == b""
    return message.reason


def refusal(job_dir: Path, request: ipc.MessageBase) -> str:
    answer = ask(job_dir, request)
    assert isinstance(answer, ipc.Refusal), answer
    return answer.message


def vm_rss(pid: int) -> int:
    """A process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        (kib,) = re.findall(r"^VmRSS:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(kib) * 1024


def job_runs(job: Job, program: str) -> bool:
    """Whether a process of `program` runs in the job (its cgroup)."""
    for pid in open_cgroup(FLAVOUR, job.id, parent=PARENT, slice=job.spec.slice).procs():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == program:
                    return True
        except FileNotFoundError:
            continue
    return False


async def start(jobs: JobManager, *argv: str, **spec: object) -> Job:
    return await jobs.start(JobSpec(argv=list(argv), **spec))  # type: ignore[arg-type]


# -- a stdin pipe ------------------------------------------------------------------------


@pytest.mark.cgroup  # the v2 lane too: input and terminals on a v2 host
async def test_binary_input_reaches_the_job_byte_for_byte(jobs: JobManager) -> None:
    job = await start(jobs, "sha256sum", stdin=True)
    data = os.urandom(8 << 20)
    with attach(job.directory) as sock:
        await trio.to_thread.run_sync(send, sock, data)
        sock.send(ipc_input.InputClose().encode())
        assert await trio.to_thread.run_sync(closed_with, sock) == "stdin closed"
    status = await jobs.wait(job.id)
    assert status.exit_code == 0
    assert output(job.directory).split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_input_close_is_the_jobs_eof_and_later_attaches_are_refused(
    jobs: JobManager,
) -> None:
    job = await start(jobs, "sh", "-c", "wc -c; echo done; exec sleep 1000", stdin=True)
    with attach(job.directory) as sock:
        send(sock, b"hello")
        sock.send(ipc_input.InputClose().encode())
        assert closed_with(sock) == "stdin closed"
    await until(lambda: b"done" in output(job.directory))
    assert output(job.directory) == b"5\ndone\n"
    message = refusal(job.directory, ipc_input.AttachInput())
    assert message == "the job has closed its stdin"


async def test_every_attached_connection_reaches_the_job(jobs: JobManager) -> None:
    job = await start(jobs, "cat", stdin=True)
    with attach(job.directory) as first, attach(job.directory) as second:
        send(first, b"from the first\n")
        await until(lambda: output(job.directory) == b"from the first\n")
        send(second, b"from the second\n")
        await until(lambda: output(job.directory).endswith(b"from the second\n"))
        second.send(ipc_input.InputClose().encode())
        # The job's stdin is closed for everyone: each writer hears so.
        assert closed_with(first) == closed_with(second) == "stdin closed"
    status = await jobs.wait(job.id)
    assert status.exit_code == 0


async def test_a_detached_connection_leaves_the_jobs_stdin_open(jobs: JobManager) -> None:
    job = await start(jobs, "cat", stdin=True)
    with attach(job.directory) as sock:
        send(sock, b"one\n")
    await until(lambda: output(job.directory) == b"one\n")
    with attach(job.directory) as sock:
        sock.send(b"\x93not a message")
        assert sock.recv(ipc.MAX_CONTROL_MESSAGE) == b""  # dropped, without a word
    with attach(job.directory) as sock:
        send(sock, b"two\n")
        sock.send(ipc_input.InputClose().encode())
        assert closed_with(sock) == "stdin closed"
    assert (await jobs.wait(job.id)).exit_code == 0
    assert output(job.directory) == b"one\ntwo\n"


async def test_a_job_that_does_not_read_makes_the_sender_wait_not_the_shim_grow(
    jobs: JobManager,
) -> None:
    job = await start(jobs, "sleep", "1000", stdin=True)
    shim_pid = job.status.shim_pid
    assert shim_pid is not None
    with attach(job.directory) as sock:
        before = vm_rss(shim_pid)
        sock.setblocking(False)
        chunk = ipc_input.Input(data=os.urandom(ipc_input.MAX_INPUT_DATA)).encode()
        sent = 0
        waiting = select.poll()
        waiting.register(sock, select.POLLOUT)
        while sent < 64 << 20:
            try:
                sock.send(chunk)
            except BlockingIOError:
                # Full: does the shim take more when given time? It must not.
                if not waiting.poll(200):
                    break
                continue
            sent += ipc_input.MAX_INPUT_DATA
        assert sent < 64 << 20, "the shim read everything a job that does not read was sent"
        growth = vm_rss(shim_pid) - before
        assert growth < 4 << 20, f"the shim grew by {growth} bytes"
        sock.setblocking(True)
        sock.settimeout(SOCKET_TIMEOUT)
        await jobs.stop(job.id, grace=0)
        # The shim was waiting to write: the job's stdin closing as it dies
        # may reach it before init's exit does.
        assert closed_with(sock) in {"the job has ended", "the job closed its stdin"}


async def test_a_job_that_closes_its_stdin_tells_the_writers(jobs: JobManager) -> None:
    script = "head -c 5; exec 0<&-; echo; echo closed; exec sleep 1000"
    job = await start(jobs, "sh", "-c", script, stdin=True)
    with attach(job.directory) as sock:
        send(sock, b"hello, world\n")
        await until(lambda: b"closed" in output(job.directory))
        send(sock, b"more")  # nobody reads it: EPIPE
        assert closed_with(sock) == "the job closed its stdin"
    assert output(job.directory) == b"hello\nclosed\n"
    assert refusal(job.directory, ipc_input.AttachInput()) == "the job has closed its stdin"


async def test_a_job_without_stdin_takes_no_input_and_has_no_terminal(jobs: JobManager) -> None:
    job = await start(jobs, "sleep", "1000")
    message = refusal(job.directory, ipc_input.AttachInput())
    assert message == "the job takes no input: it was started without -i"
    message = refusal(job.directory, ipc_input.Resize(columns=80, rows=24))
    assert message == "the job has no terminal: it was started without -t"


async def test_attached_connections_hear_that_the_job_ended(jobs: JobManager) -> None:
    job = await start(jobs, "cat", stdin=True)
    with attach(job.directory) as first, attach(job.directory) as second:
        await jobs.stop(job.id, grace=0)
        assert closed_with(first) == closed_with(second) == "the job has ended"


async def test_attached_connections_are_capped(jobs: JobManager) -> None:
    job = await start(jobs, "cat", stdin=True)
    attached = [attach(job.directory) for _ in range(MAX_ATTACHED)]
    try:
        message = refusal(job.directory, ipc_input.AttachInput())
        assert message == "too many clients attached to the job (64)"
        attached.pop().close()
        # One left: there is room for another (once the shim has read its EOF).
        with connect(job.directory) as sock:
            await until(lambda: _attach_once(sock))
    finally:
        for sock in attached:
            sock.close()


def _attach_once(sock: socket.socket) -> bool:
    sock.send(ipc_input.AttachInput().encode())
    return receive(sock) == ipc_input.InputAttached()


# -- a terminal ----------------------------------------------------------------------------


@pytest.mark.cgroup  # the v2 lane too: input and terminals on a v2 host
async def test_a_terminal_job_has_its_own_terminal_of_the_size_asked(jobs: JobManager) -> None:
    job = await start(
        jobs, "sh", "-c", "tty; stty size; echo err >&2", tty=True, tty_size=(100, 30)
    )
    status = await jobs.wait(job.id)
    assert status.exit_code == 0
    logged = records(job.directory)
    assert logged[0][0] == STREAM_MARKER
    assert logged[0][2] == {"resize": [100, 30]}  # first: the log replays as a terminal
    assert output(job.directory) == b"/dev/pts/0\r\n30 100\r\nerr\r\n"
    assert output(job.directory, STREAM_STDERR) == b""  # one stream: the terminal's


@pytest.mark.cgroup  # the v2 lane too: input and terminals on a v2 host
async def test_a_resize_reaches_the_job_and_the_log(jobs: JobManager) -> None:
    script = 'trap "stty size; echo WINCH" WINCH; echo ready; while :; do sleep 0.05; done'
    job = await start(jobs, "sh", "-c", script, tty=True, tty_size=(80, 24))
    await until(lambda: b"ready" in output(job.directory))
    assert ask(job.directory, ipc_input.Resize(columns=132, rows=43)) == ipc_input.Resized()
    await until(lambda: b"43 132\r\nWINCH" in output(job.directory))
    assert markers(job.directory) == [{"resize": [80, 24]}, {"resize": [132, 43]}]
    for columns, rows in [(0, 10), (10, 0), (4097, 10)]:
        message = refusal(job.directory, ipc_input.Resize(columns=columns, rows=rows))
        assert message == (
            f"a terminal's size must be between 1 and 4096 columns and rows, not {columns}x{rows}"
        )


async def test_input_to_a_terminal_is_typed_and_ctrl_c_interrupts(jobs: JobManager) -> None:
    script = (
        'trap "echo interrupted" INT; read line; echo "got $line"; '
        "sleep 1000; echo survived; read line; echo bye"
    )
    job = await start(jobs, "sh", "-c", script, stdin=True, tty=True)
    with attach(job.directory) as sock:
        send(sock, b"hello\n")
        await until(lambda: b"got hello" in output(job.directory))
        await until(lambda: job_runs(job, "sleep"))
        send(sock, b"\x03")  # the line discipline makes it SIGINT to the foreground group
        await until(lambda: b"survived" in output(job.directory))
        # A terminal has no end of input: an InputClose ends this connection only.
        sock.send(ipc_input.InputClose().encode())
        assert closed_with(sock) == "stdin closed; the job's terminal stays open"
    with attach(job.directory) as sock:
        send(sock, b"\n")
        assert await trio.to_thread.run_sync(closed_with, sock) == "the job has ended"
    status = await jobs.wait(job.id)
    assert (status.state, status.exit_code) == (State.EXITED, 0)
    assert b"hello\r\ngot hello\r\n^Cinterrupted\r\nsurvived\r\n" in output(job.directory)
    assert output(job.directory).endswith(b"bye\r\n")


async def test_an_interactive_bash_controls_its_terminal(jobs: JobManager) -> None:
    """Job control needs the terminal to be the session's controlling one:
    bash puts `sleep` in a process group of its own in the foreground, and
    Ctrl+C reaches that group alone."""
    job = await start(jobs, "bash", "--norc", "--noprofile", "-i", stdin=True, tty=True)
    with attach(job.directory) as sock:
        send(sock, b"sleep 1000\n")
        await until(lambda: job_runs(job, "sleep"))
        send(sock, b"\x03")  # (an interactive bash drops the rest of a line it interrupts)
        send(sock, b"echo after-$?\n")
        await until(lambda: b"after-130" in output(job.directory))
        send(sock, b"exit 7\n")
        assert await trio.to_thread.run_sync(closed_with, sock) == "the job has ended"
    assert (await jobs.wait(job.id)).exit_code == 7


async def test_a_terminal_job_without_stdin_takes_no_input(jobs: JobManager) -> None:
    job = await start(jobs, "sleep", "1000", tty=True)
    message = refusal(job.directory, ipc_input.AttachInput())
    assert message == "the job takes no input: it was started without -i"
    assert ask(job.directory, ipc_input.Resize(columns=10, rows=5)) == ipc_input.Resized()


# -- the pieces, without a job ----------------------------------------------------------


@pytest.fixture
def relay() -> Iterator[tuple[Loop, InputRelay, int]]:
    """An InputRelay of a stdin pipe in a loop of its own, and the pipe's read end."""
    loop = Loop()
    relay = InputRelay(loop, tty=False)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PAGE)  # the least a pipe holds
    relay.connect(write_end)
    yield loop, relay, read_end
    relay.job_ended()
    os.close(read_end)


def attached_pair(relay: InputRelay) -> tuple[socket.socket, socket.socket]:
    """A connection the relay has taken over: its end, and the test's."""
    relays, tests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relays.setblocking(False)
    tests.settimeout(SOCKET_TIMEOUT)
    assert relay.attach(relays) is None
    assert receive(tests) == ipc_input.InputAttached()
    return relays, tests


def unread(sock: socket.socket) -> int:
    """Bytes queued on `sock` that its owner has not read (FIONREAD)."""
    if sock.fileno() < 0:  # closed by the relay
        return 0
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    return int.from_bytes(raw, sys.byteorder)


def test_the_relay_reads_nothing_while_the_input_end_is_full(
    relay: tuple[Loop, InputRelay, int],
) -> None:
    loop, relay_, read_end = relay
    (first_in, first), (second_in, second) = attached_pair(relay_), attached_pair(relay_)
    pieces = [bytes([n]) * (PAGE - 1000) for n in range(4)]
    for n, piece in enumerate(pieces):  # more than the pipe holds
        (first if n % 2 == 0 else second).send(ipc_input.Input(data=piece).encode())
    while not relay_.statistics()["pending"]:
        loop.run_once(1000)
    # The pipe is full and one datagram waits: the others stay in the sockets.
    queued = (unread(first_in), unread(second_in))
    loop.run_once(0)
    assert (unread(first_in), unread(second_in)) == queued
    assert sum(queued) > 0
    received = b""
    while len(received) < sum(map(len, pieces)):
        loop.run_once(1000)
        with contextlib.suppress(BlockingIOError):
            received += os.read(read_end, 1 << 20)
    # Whole datagrams, never interleaved; each connection's in its order.
    size = len(pieces[0])
    chunks = [received[i : i + size] for i in range(0, len(received), size)]
    assert sorted(chunks) == pieces
    assert chunks.index(pieces[0]) < chunks.index(pieces[2])
    assert chunks.index(pieces[1]) < chunks.index(pieces[3])
    first.send(ipc_input.InputClose().encode())
    while relay_.state is not State_.CLOSED:
        loop.run_once(1000)
    assert closed_with(first) == closed_with(second) == "stdin closed"
    assert os.read(read_end, 10) == b""  # the job's EOF


def test_a_resize_before_the_terminal_comes_is_applied_when_it_does() -> None:
    logged: list[dict[str, object]] = []
    terminal = Terminal((80, 24), logged.append)
    master, slave = os.openpty()
    try:
        assert terminal.resize(100, 40) == ipc_input.Resized()
        assert logged == []  # nothing to replay before the job's first byte
        terminal.connect(master)
        assert get_size(slave) == (100, 40)
        assert terminal.resize(120, 50) == ipc_input.Resized()
        assert get_size(slave) == (120, 50)
        assert logged == [{"resize": [100, 40]}, {"resize": [120, 50]}]
        terminal.close()
        assert terminal.resize(10, 10) == ipc.Refusal(message="the job has ended")
    finally:
        os.close(slave)


def test_markers_count_towards_the_cap_but_not_as_output(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / OUTPUT_FILE, limit=MARKER_RESERVE + 100)
    log.mark({"resize": [80, 24]})
    size = log.size
    assert 0 < size < 100
    log.append(STREAM_STDOUT, b"x" * 40)
    for _ in range(10):  # past the cap: left out, and no output counted as dropped
        log.mark({"resize": [80, 24]})
    assert log.size <= 100
    assert (log.relayed, log.dropped) == (40, 0)
    log.close()
    assert [r[0] for r in records(tmp_path)][:2] == [STREAM_MARKER, STREAM_STDOUT]

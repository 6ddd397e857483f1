"""Input to jobs end to end: `run -i`, `attach`, terminals and resizes, over
mutual TLS against a real corrald, with real jobs, pipes and ptys.

The library (`Client.attach`) where the wire is the point; the real
`corral` CLI, in a real pty (pexpect) where the terminal is.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import termios
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pexpect
import pytest
import trio

from corral.client.client import Attachment, Client, connect
from corral.client.errors import InputClosed, ServerError
from corral.protocol import ErrorCode
from corral.records import STREAM_STDOUT, Record

from .conftest import Daemon, identity, running_corrald, until
from .test_cli import CORRAL

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]


@pytest.fixture
def daemon(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(pki_dir, short_dir) as daemon:
        yield daemon


@pytest.fixture
async def alice(daemon: Daemon, pki_dir: Path) -> AsyncIterator[Client]:
    async with connect(daemon.tcp, identity(pki_dir, "alice")) as client:
        yield client


def stdout_of(records: list[Record]) -> bytes:
    return b"".join(r.data for r in records if r.stream == STREAM_STDOUT)  # type: ignore[misc]


async def collect(attachment: Attachment, into: list[Record]) -> None:
    async for record in attachment:
        into.append(record)


async def read_attached(client: Client, job_id: str) -> None:
    """Attach and read to the end (an attach is refused in its stream)."""
    async with client.attach(job_id) as attached:
        async for _ in attached:
            pass


# -- the library ----------------------------------------------------------------------


async def test_input_reaches_the_job_byte_exact_and_eof_ends_it(alice: Client) -> None:
    data = os.urandom(8 << 20) + bytes(range(256))
    job = await alice.start(["sha256sum"], stdin=True)
    records: list[Record] = []
    async with alice.attach(job.id, offset=0) as attached, trio.open_nursery() as nursery:
        nursery.start_soon(collect, attached, records)
        await attached.send(data)
        await attached.close()
    assert attached.job is not None
    assert attached.job.exit_code == 0
    assert stdout_of(records).split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_a_job_without_stdin_refuses_input_and_an_ended_one_too(alice: Client) -> None:
    job = await alice.start(["sleep", "60"])
    with pytest.raises(ServerError) as refused:
        await read_attached(alice, job.id)
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION
    assert "takes no input: it was started without -i" in str(refused.value)
    await alice.stop(job.id, grace=0)
    ended = await alice.start(["true"], stdin=True)
    await alice.wait(ended.id)
    with pytest.raises(ServerError) as late:
        await read_attached(alice, ended.id)
    assert late.value.code is ErrorCode.FAILED_PRECONDITION
    assert "has ended" in str(late.value)


async def test_two_attached_clients_see_the_same_output_and_both_reach_the_job(
    daemon: Daemon, pki_dir: Path, alice: Client
) -> None:
    job = await alice.start(["cat"], stdin=True)
    seen: dict[str, list[Record]] = {"first": [], "second": []}
    async with (
        connect(daemon.tcp, identity(pki_dir, "alice")) as other,
        alice.attach(job.id, offset=0) as first,
        other.attach(job.id, offset=0) as second,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, first, seen["first"])
        nursery.start_soon(collect, second, seen["second"])
        await first.send(b"one\n")
        await until(lambda: stdout_of(seen["second"]) == b"one\n")
        await second.send(b"two\n")
        await until(lambda: stdout_of(seen["first"]) == b"one\ntwo\n")
        await second.close()
    assert stdout_of(seen["first"]) == stdout_of(seen["second"]) == b"one\ntwo\n"


async def test_input_and_eof_sent_just_before_a_detach_still_reach_the_job(
    alice: Client,
) -> None:
    """close() then leaving at once: the Eof came before the cancel, so the
    job gets the input and the end of its stdin (it was lost in a race)."""
    for _ in range(20):
        job = await alice.start(["cat"], stdin=True)
        async with alice.attach(job.id) as attached:
            await attached.send(b"last words\n")
            await attached.close()
        with trio.fail_after(30):
            ended = await alice.wait(job.id)
        assert ended.exit_code == 0
        async with alice.logs(job.id) as stream:
            assert stdout_of([record async for record in stream]) == b"last words\n"


async def test_a_detach_leaves_stdin_open_for_the_next_attach(alice: Client) -> None:
    job = await alice.start(["cat"], stdin=True)
    async with alice.attach(job.id, offset=0) as attached:
        await attached.send(b"before\n")
        async for record in attached:
            if stdout_of([record]):
                break
    # Detached (the block left early): the job still reads its stdin.
    assert (await alice.status(job.id)).state == "running"
    records: list[Record] = []
    async with alice.attach(job.id) as again, trio.open_nursery() as nursery:
        nursery.start_soon(collect, again, records)
        await again.send(b"after\n")
        await again.close()
    assert stdout_of(records) == b"after\n"  # from the moment of attaching
    assert again.job is not None
    assert again.job.exit_code == 0


async def test_a_job_closing_its_stdin_ends_the_sending_quietly(alice: Client) -> None:
    job = await alice.start(["head", "-c", "5"], stdin=True)
    records: list[Record] = []
    async with alice.attach(job.id, offset=0) as attached, trio.open_nursery() as nursery:
        nursery.start_soon(collect, attached, records)
        with pytest.raises(InputClosed):
            await send_forever(attached)
    assert stdout_of(records) == b"y\ny\ny"
    assert attached.job is not None
    assert attached.job.exit_code == 0


async def send_forever(attached: Attachment) -> None:
    while True:  # as `yes | head`: until the job takes no more
        await attached.send(b"y\n" * 4096)


async def test_another_users_job_answers_like_a_missing_one(
    daemon: Daemon, pki_dir: Path, alice: Client
) -> None:
    job = await alice.start(["cat"], stdin=True)
    async with connect(daemon.tcp, identity(pki_dir, "bob")) as bob:

        async def attach() -> None:
            async with bob.attach(job.id) as attached:
                async for _ in attached:
                    pass

        async def resize() -> None:
            await bob.resize(job.id, 80, 24)

        for call in (resize, attach):
            with pytest.raises(ServerError) as refused:
                await call()
            assert refused.value.code is ErrorCode.NOT_FOUND
            assert str(refused.value) == f"no job {job.id!r}"
    await alice.stop(job.id, grace=0)


async def test_a_terminal_job_has_our_size_and_follows_resizes(alice: Client) -> None:
    # A trapped signal interrupts `read`: read again until a line comes.
    script = "stty size; trap 'stty size' WINCH; until read line; do :; done; echo got:$line"
    job = await alice.start(["sh", "-c", script], stdin=True, tty=True, tty_size=(100, 30))
    records: list[Record] = []
    async with alice.attach(job.id, offset=0) as attached, trio.open_nursery() as nursery:
        nursery.start_soon(collect, attached, records)
        await until(lambda: b"30 100" in stdout_of(records))
        await attached.resize(132, 43)
        await until(lambda: b"43 132" in stdout_of(records))
        await attached.send(b"hello\r")
    output = stdout_of(records)
    assert b"got:hello" in output
    sizes = [r.data["resize"] for r in records if isinstance(r.data, dict)]
    assert sizes == [[100, 30], [132, 43]]
    for size in ([0, 10], [10, 5000]):
        with pytest.raises(ServerError) as bad:
            await alice.call("resize", {"id": job.id, "size": size})
        assert bad.value.code is ErrorCode.INVALID_ARGUMENT


async def test_a_job_that_never_reads_holds_the_client_not_corrald(
    daemon: Daemon, alice: Client
) -> None:
    job = await alice.start(["sleep", "600"], stdin=True)
    rss_before = _rss(daemon.process.pid)
    sent = 0
    async with alice.attach(job.id) as attached:
        with trio.move_on_after(3):  # the window fills at once; then it waits
            while True:
                await attached.send(b"\0" * (1 << 20))
                sent += 1 << 20
    assert sent < 8 << 20  # credit, socket and pipe buffers: far less than offered
    assert _rss(daemon.process.pid) - rss_before < 16 << 20
    await alice.stop(job.id, grace=0)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- the CLI ---------------------------------------------------------------------------


def corral(daemon: Daemon, pki_dir: Path, *args: str, **options: object) -> list[str]:
    return [*CORRAL, "--addr", daemon.tcp, "--identity", str(identity(pki_dir, "alice")), *args]


def test_run_i_feeds_stdin_and_eof_reaches_the_job(daemon: Daemon, pki_dir: Path) -> None:
    command = corral(daemon, pki_dir, "run", "-i", "--", "wc", "-l")
    done = subprocess.run(command, input=b"a\nb\n", capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, b"2"), done.stderr


def test_run_i_carries_64_mib_byte_exact(daemon: Daemon, pki_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 << 20))
    with data.open("rb") as stdin:  # a regular file: read in a thread, not polled
        done = subprocess.run(
            corral(daemon, pki_dir, "run", "-i", "--", "sha256sum"),
            stdin=stdin, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data.read_bytes()).hexdigest()
    piped = subprocess.run(
        f"cat {data} | {' '.join(corral(daemon, pki_dir, 'run', '-i', '--', 'sha256sum'))}",
        shell=True, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert piped.stdout == done.stdout, piped.stderr


def test_run_t_without_a_terminal_is_one_clear_error(daemon: Daemon, pki_dir: Path) -> None:
    done = subprocess.run(
        corral(daemon, pki_dir, "run", "-it", "--", "bash"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "needs a terminal on stdin" in done.stderr


def test_logs_asciicast_is_json_lines_with_times_in_order(daemon: Daemon, pki_dir: Path) -> None:
    started = subprocess.run(
        corral(daemon, pki_dir, "start", "-t", "--", "sh", "-c", "echo one; sleep 0.1; echo two"),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    job_id = started.stdout.strip()
    subprocess.run(
        corral(daemon, pki_dir, "logs", "-f", job_id), capture_output=True, timeout=60, check=True
    )
    cast = subprocess.run(
        corral(daemon, pki_dir, "logs", "--asciicast", job_id),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = [json.loads(line) for line in cast.stdout.splitlines()]
    header, events = lines[0], lines[1:]
    assert header["version"] == 2
    assert header["width"] >= 1
    assert header["height"] >= 1
    times = [event[0] for event in events]
    assert times == sorted(times)
    assert "".join(e[2] for e in events if e[1] == "o") == "one\r\ntwo\r\n"


# Terminal sessions through a real pty: pexpect spawns the CLI in one.


def spawn(daemon: Daemon, pki_dir: Path, *args: str) -> object:
    child = pexpect.spawn(
        corral(daemon, pki_dir, *args)[0],
        corral(daemon, pki_dir, *args)[1:],
        env={**os.environ, "TERM": "xterm"},
        dimensions=(25, 90),
        timeout=30,
    )
    return child


def test_run_it_drives_bash_ctrl_c_reaches_the_job_and_ctrl_d_ends_it(
    daemon: Daemon, pki_dir: Path
) -> None:
    child = spawn(daemon, pki_dir, "run", "-it", "--", "bash", "--norc", "-i")
    child.sendline("stty size; echo $TERM")  # type: ignore[attr-defined]
    child.expect("25 90")  # type: ignore[attr-defined]
    child.expect("xterm")  # type: ignore[attr-defined]
    # Once the child says so, it is the terminal's foreground group (bash
    # puts it there before it runs anything): Ctrl+C is then its SIGINT.
    child.sendline("sh -c 'echo started-$((6*7)); exec sleep 100'")  # type: ignore[attr-defined]
    child.expect("started-42")  # type: ignore[attr-defined]
    child.sendintr()  # type: ignore[attr-defined]  # Ctrl+C: a byte for the job's terminal
    child.sendline("echo after-$?")  # type: ignore[attr-defined]
    child.expect("after-130")  # type: ignore[attr-defined]  # bash survived, sleep did not
    child.setwinsize(40, 120)  # type: ignore[attr-defined]
    child.sendline("stty size")  # type: ignore[attr-defined]
    child.expect("40 120")  # type: ignore[attr-defined]
    assert_raw(child)
    child.sendline("exit 7")  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)  # type: ignore[attr-defined]
    assert_cooked(child)
    child.close()  # type: ignore[attr-defined]
    assert child.exitstatus == 7  # type: ignore[attr-defined]


def test_detach_keys_leave_the_job_running_and_attach_resumes_it(
    daemon: Daemon, pki_dir: Path
) -> None:
    child = spawn(daemon, pki_dir, "run", "-it", "--", "bash", "--norc", "-i")
    child.sendline("echo ready-$((6*7))")  # type: ignore[attr-defined]
    child.expect("ready-42")  # type: ignore[attr-defined]  # the job's, not our terminal's echo
    child.send("\x10\x11")  # type: ignore[attr-defined]  # Ctrl+P Ctrl+Q
    child.expect(r"detached from job (\w+)")  # type: ignore[attr-defined]
    job_id = child.match.group(1).decode()  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)  # type: ignore[attr-defined]
    assert_cooked(child)
    child.close()  # type: ignore[attr-defined]
    assert child.exitstatus == 0  # type: ignore[attr-defined]
    again = spawn(daemon, pki_dir, "attach", job_id)
    again.sendline("echo back-$((6*7))")  # type: ignore[attr-defined]
    again.expect("back-42")  # type: ignore[attr-defined]
    again.sendcontrol("d")  # type: ignore[attr-defined]  # Ctrl+D: the job's bash reads EOF
    again.expect(pexpect.EOF)  # type: ignore[attr-defined]
    assert_cooked(again)
    again.close()  # type: ignore[attr-defined]
    assert again.exitstatus == 0  # type: ignore[attr-defined]
    # Attaching to it now that it has ended is an error, said with the
    # terminal as it was.
    late = spawn(daemon, pki_dir, "attach", job_id)
    late.expect("has ended")  # type: ignore[attr-defined]
    late.expect(pexpect.EOF)  # type: ignore[attr-defined]
    assert_cooked(late)
    late.close()  # type: ignore[attr-defined]
    assert late.exitstatus == 1  # type: ignore[attr-defined]


def test_a_key_that_may_begin_the_detach_keys_is_held_not_the_end_of_input(
    daemon: Daemon, pki_dir: Path
) -> None:
    """Ctrl+P alone is held while it may begin Ctrl+P Ctrl+Q; what follows
    shows it was not, and both reach the job, input going on."""
    script = (
        'read go; echo "ready-$go"; read line; echo "got:${#line}"; read line; echo "then:$line"'
    )
    child = spawn(daemon, pki_dir, "run", "-it", "--", "sh", "-c", script)
    child.send("x\r")  # type: ignore[attr-defined]
    child.expect("ready-x")  # type: ignore[attr-defined]  # attached, reading our keys
    child.send("\x10")  # type: ignore[attr-defined]  # Ctrl+P: maybe the detach keys
    child.send("ab\r")  # type: ignore[attr-defined]  # no: the line is Ctrl+P, a, b
    child.expect("got:3")  # type: ignore[attr-defined]
    child.send("more\r")  # type: ignore[attr-defined]
    child.expect("then:more")  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)  # type: ignore[attr-defined]
    child.close()  # type: ignore[attr-defined]
    assert child.exitstatus == 0  # type: ignore[attr-defined]


def test_sigterm_ends_an_attached_session_with_the_terminal_restored(
    daemon: Daemon, pki_dir: Path
) -> None:
    child = spawn(daemon, pki_dir, "run", "-it", "--", "bash", "--norc", "-i")
    child.sendline("echo ready-$((6*7))")  # type: ignore[attr-defined]
    child.expect("ready-42")  # type: ignore[attr-defined]
    assert_raw(child)
    child.kill(signal.SIGTERM)  # type: ignore[attr-defined]
    child.expect("SIGTERM: detached")  # type: ignore[attr-defined]
    child.expect(pexpect.EOF)  # type: ignore[attr-defined]
    assert_cooked(child)
    child.close()  # type: ignore[attr-defined]
    assert child.exitstatus == 128 + signal.SIGTERM  # type: ignore[attr-defined]
    # The job lives on, detached; an interactive bash ignores SIGTERM, so
    # corrald's shutdown would wait out its grace: end it here.
    ids = run_corral(daemon, pki_dir, "ps", "-q", "--state", "running").split()
    assert len(ids) == 1
    run_corral(daemon, pki_dir, "stop", "--grace", "0", *ids)


def run_corral(daemon: Daemon, pki_dir: Path, *args: str) -> str:
    command = corral(daemon, pki_dir, *args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_run_i_client_that_dies_gives_its_job_eof(
    daemon: Daemon, pki_dir: Path, alice: Client
) -> None:
    script = "cat > /dev/null; echo got-eof"
    client = subprocess.Popen(
        corral(daemon, pki_dir, "run", "-i", "--", "sh", "-c", script),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert client.stdin is not None
        client.stdin.write(b"some input\n")
        client.stdin.flush()

        async def running() -> list[str]:
            return [job.id for job in await alice.list() if job.state == "running"]

        await until_running(running)
        (job_id,) = await running()
    finally:
        client.kill()  # SIGKILL: no EOF of its own, no detach; its connection drops
        client.wait()
    job = await alice.wait(job_id)
    assert job.exit_code == 0
    async with alice.logs(job_id) as stream:
        assert b"got-eof" in b"".join([chunk.data async for chunk in stream.chunks()])


async def until_running(running: Callable[[], Awaitable[list[str]]]) -> None:
    for _ in range(200):  # each try is a round trip to corrald
        if await running():
            return
        await trio.sleep(0.05)  # a pause between tries, not a synchronisation
    raise AssertionError("the job never ran")


def test_a_job_closing_its_stdin_ends_run_i_quietly(daemon: Daemon, pki_dir: Path) -> None:
    command = f"yes | {' '.join(corral(daemon, pki_dir, 'run', '-i', '--', 'head', '-c', '5'))}"
    done = subprocess.run(command, shell=True, capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"y\ny\ny", b"")


def test_the_terminal_is_restored_after_corrald_is_killed(pki_dir: Path, short_dir: Path) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        child = spawn(daemon, pki_dir, "run", "-it", "--", "bash", "--norc", "-i")
        child.sendline("echo ready-$((6*7))")  # type: ignore[attr-defined]
        child.expect("ready-42")  # type: ignore[attr-defined]  # the job's: we are attached
        assert_raw(child)
        daemon.process.send_signal(signal.SIGKILL)
        child.expect("keeps running")  # type: ignore[attr-defined]
        child.expect(pexpect.EOF)  # type: ignore[attr-defined]
        assert_cooked(child)
        child.close()  # type: ignore[attr-defined]
        assert child.exitstatus == 69  # type: ignore[attr-defined]


def _local_flags(child: object) -> int:
    """The terminal's local modes as corral left them (a pty's master
    reports its slave's settings)."""
    return int(termios.tcgetattr(child.child_fd)[3])  # type: ignore[attr-defined]


def assert_raw(child: object) -> None:
    assert not _local_flags(child) & (termios.ICANON | termios.ECHO | termios.ISIG)


def assert_cooked(child: object) -> None:
    flags = termios.ICANON | termios.ECHO | termios.ISIG
    assert _local_flags(child) & flags == flags


async def test_attach_works_again_after_corrald_is_killed_and_restarted(
    pki_dir: Path, short_dir: Path
) -> None:
    """The shim holds the job's stdin and terminal: a corrald killed
    mid-session closes neither, and the next one attaches to them."""
    alice_id = identity(pki_dir, "alice")
    with running_corrald(pki_dir, short_dir, end_its_jobs=False) as first:
        async with connect(first.tcp, alice_id) as client:
            job = await client.start(["cat"], stdin=True)
            async with client.attach(job.id, offset=0) as attached:
                await attached.send(b"before\n")
                async for record in attached:
                    if stdout_of([record]):
                        break
                first.process.kill()  # SIGKILL: mid-session, no goodbye
                await trio.to_thread.run_sync(first.process.wait)
    with running_corrald(pki_dir, short_dir) as second:
        async with connect(second.tcp, alice_id) as client:
            records: list[Record] = []
            async with client.attach(job.id, offset=0) as again, trio.open_nursery() as nursery:
                nursery.start_soon(collect, again, records)
                await again.send(b"after\n")
                await again.close()
            assert stdout_of(records) == b"before\nafter\n"
            assert again.job is not None
            assert again.job.exit_code == 0

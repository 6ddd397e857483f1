"""`corral shell` at a terminal: a real pty, a real corrald, real jobs.

Every wait reads the terminal until the expected text appears, with a
deadline. Expected texts are chosen so that the echo of what the test types
cannot match them (the jobs print `ready`, the lines say `rea""dy`).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from corral.client.client import connect

from .conftest import Daemon, identity, until, until_async
from .test_cli import CORRAL

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

PROMPT = "corral> "
JOB_ID = re.compile(r"\b[0-9a-f]{32}\b")
# Wide enough that readline never wraps (and redraws) a line the tests type.
COLUMNS = 250


class Shell:
    """`corral shell` on a pty of its own, as a person at a terminal runs it."""

    def __init__(self, env: dict[str, str]) -> None:
        master, terminal = os.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
        # setsid --ctty makes the pty the shell's controlling terminal, so
        # that the line discipline turns ^C into SIGINT for it.
        self.process = subprocess.Popen(
            ["setsid", "--ctty", "--wait", *CORRAL, "shell"],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=env,
        )
        os.close(terminal)
        self.master = master
        self.unread = ""

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, text: str, timeout: float = 10.0) -> str:
        """Everything up to and including `text`, once it has appeared."""
        deadline = time.monotonic() + timeout
        while text not in self.unread:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.master], [], [], max(left, 0))
            if not readable:
                pytest.fail(f"no {text!r} within {timeout} s; the terminal shows {self.unread!r}")
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the shell has gone, and the terminal with it
                data = b""
            if not data:
                pytest.fail(f"the shell ended before {text!r}; the terminal shows {self.unread!r}")
            self.unread += data.decode(errors="replace")
        end = self.unread.index(text) + len(text)
        seen, self.unread = self.unread[:end], self.unread[end:]
        return seen

    def run(self, line: str, until: str = PROMPT) -> str:
        """At the prompt: type a line, press Enter, and read from its echo
        until `until` (a prompt redrawn before the echo is not the one after
        the line)."""
        self.send(line + "\r")
        self.expect(line + "\r\n")
        return self.expect(until)

    def wait_until_reading(self) -> None:
        """Until readline sleeps in select(). A SIGINT that lands while it is
        still busy with the last key is noticed by CPython only after the next
        key; a person cannot press ^C that fast, a test can."""
        wchan = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/wchan")
        trio.run(until, lambda: any(w in wchan.read_text() for w in ("poll", "select")))

    def wait(self) -> int:
        return self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def history(tmp_path: Path) -> Path:
    return tmp_path / "history"


@pytest.fixture
def shell(corrald: Daemon, pki_dir: Path, history: Path, tmp_path: Path) -> Iterator[Shell]:
    """A shell connected as admin, at its first prompt; afterwards no shell
    and no job of the test is left running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        CORRAL_ADDR=corrald.tcp,
        CORRAL_IDENTITY=str(identity(pki_dir, "admin")),
        CORRAL_HISTORY=str(history),
        HOME=str(tmp_path),
        TERM="xterm",
        INPUTRC=os.devnull,  # no one's key bindings but readline's own
    )
    process = Shell(env)
    try:
        process.expect(PROMPT)
        yield process
    finally:
        process.close()
        if corrald.process.poll() is None:
            trio.run(stop_every_job, corrald, pki_dir)


async def stop_every_job(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        for job in await admin.list(everyone=True):
            if job.state == "running":
                await admin.stop(job.id, grace=0)


async def only_the_checker_is_connected(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as checker:
        await until_async(checker.info, lambda info: info.connections == 1)


def start_job(shell: Shell, script: str) -> str:
    """Start `sh -c SCRIPT` from the shell; return the job's id."""
    found = JOB_ID.search(shell.run(shlex.join(["start", "--", "sh", "-c", script])))
    assert found is not None
    return found.group()


@pytest.fixture
def gate() -> Iterator[Path]:
    """A fifo the job (as nobody) waits on until the test writes to it."""
    directory = Path(tempfile.mkdtemp(prefix="corral-test-", dir="/var/tmp"))
    directory.chmod(0o777)
    fifo = directory / "gate"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    yield fifo
    shutil.rmtree(directory, ignore_errors=True)


def test_a_background_follow_prints_prefixed_lines_while_other_commands_run(
    shell: Shell, gate: Path, corrald: Daemon, pki_dir: Path
) -> None:
    job = start_job(shell, f'echo fi""rst; read x < {gate}; echo sec""ond; echo oo""ps >&2')
    short = job[:12]
    assert re.search(rf"{short}\s+admin\s+running", shell.run("ps"))

    shell.send(f"logs -f {short} &\r")
    shell.expect(f"[{short}] following in the background")
    shell.expect(f"[{short}] first\r\n")
    shell.expect(PROMPT)  # before it, or redrawn after it: now what is typed is the prompt's
    assert f"{short}  following  sh -c" in shell.run("jobs")
    assert re.search(r"state:\s+running", shell.run(f"status {short}"))

    gate.write_bytes(b"go\n")
    shell.expect(f"[{short}] second\r\n")
    shell.expect(f"[{short} stderr] oops\r\n")
    shell.expect(f"[{short}] job exited: exited with code 0\r\n{PROMPT}")
    assert "no background follows" in shell.run("jobs")

    shell.send("exit\r")
    assert shell.wait() == 0
    trio.run(only_the_checker_is_connected, corrald, pki_dir)


def test_ctrl_c_clears_the_prompt_and_interrupts_a_foreground_follow(shell: Shell) -> None:
    shell.send("garbage")
    shell.expect("garbage")
    shell.wait_until_reading()
    shell.send("\x03")
    shell.expect(PROMPT)
    assert "cgroup:" in shell.run("info")  # not `garbageinfo`

    short = start_job(shell, 'echo rea""dy; exec sleep 1000')[:12]
    shell.send(f"logs -f {short}\r")
    shell.expect("ready\r\n")
    shell.send("\x03")
    shell.expect(PROMPT)
    assert re.search(r"state:\s+running", shell.run(f"status {short}"))


def test_ctrl_c_stops_a_foreground_run_and_a_second_kills_it(shell: Shell) -> None:
    polite = 'trap \'echo b""ye; exit 5\' TERM; echo rea""dy; while :; do sleep 0.05; done'
    shell.send(shlex.join(["run", "--grace", "30s", "--", "sh", "-c", polite]) + "\r")
    shell.expect("ready\r\n")
    shell.send("\x03")
    shell.expect("stopping job")
    shell.expect("bye\r\n")
    shell.expect("corral: exit status 5\r\n" + PROMPT)

    stubborn = "trap '' TERM; echo rea\"\"dy; exec sleep 1000"
    shell.send(shlex.join(["run", "--", "sh", "-c", stubborn]) + "\r")
    shell.expect("ready\r\n")
    shell.send("\x03")
    shell.expect("stopping job")
    shell.send("\x03")
    shell.expect("killing job")
    shell.expect(f"corral: exit status {128 + signal.SIGKILL}\r\n" + PROMPT)


def test_tab_completes_commands_and_job_ids_and_lines_are_kept_in_the_history(
    shell: Shell, history: Path
) -> None:
    shell.send("inf\t")
    shell.expect("info ")
    assert "cgroup:" in shell.run("")

    job = start_job(shell, "exec sleep 1000")
    shell.send(f"status {job[:5]}\t")
    shell.expect(f"{job[5:12]} ")  # completed to the short id
    assert re.search(rf"id:\s+{job}", shell.run(""))

    shell.send("exit\r")
    assert shell.wait() == 0
    lines = history.read_text().splitlines()
    assert lines == ["info ", "start -- sh -c 'exec sleep 1000'", f"status {job[:12]} ", "exit"]


def test_a_bad_line_says_why_and_the_shell_goes_on(
    shell: Shell, corrald: Daemon, pki_dir: Path
) -> None:
    assert "the following arguments are required: ID" in shell.run("logs")
    assert "error: no job 'nope'" in shell.run("status nope")
    assert "error: No closing quotation" in shell.run("status 'nope")
    refused = shell.run("--addr 127.0.0.1:1 ps")
    assert f"error: --addr cannot change the shell's connection (to {corrald.tcp})" in refused
    assert "only `logs -f ID &` runs in the background" in shell.run("ps &")
    listing = shell.run("help")
    for text in ("run ", "logs -f ID &", "jobs", "exit, quit"):
        assert text in listing
    shell.send("\x04")  # Ctrl+D
    assert shell.wait() == 0
    trio.run(only_the_checker_is_connected, corrald, pki_dir)


def _shell_script(corrald: Daemon, pki_dir: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_ADDR=corrald.tcp, CORRAL_IDENTITY=str(identity(pki_dir, "admin")))
    return subprocess.run(
        [*CORRAL, "shell"], input=script, capture_output=True, text=True, env=env, timeout=30,
        check=False,
    )  # fmt: skip


def test_without_a_terminal_lines_are_read_from_stdin_without_a_prompt(
    corrald: Daemon, pki_dir: Path
) -> None:
    result = _shell_script(corrald, pki_dir, "info\nstatus nope\n")
    assert result.stdout.startswith("server:")
    assert PROMPT not in result.stdout
    assert result.stderr == "error: no job 'nope'\n"
    assert result.returncode == 1  # the last failure's status, as a script's


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("info\n", 0),
        ("status nope\ninfo\n", 1),  # a failure earlier in the script still counts
        ("status nope\nstatus --bogus x\n", 2),  # the last failure's status
        ("run -- sh -c 'exit 7'\ninfo\n", 7),
    ],
)
def test_a_script_fed_to_the_shell_exits_with_its_last_failure(
    corrald: Daemon, pki_dir: Path, script: str, status: int
) -> None:
    result = _shell_script(corrald, pki_dir, script)
    assert result.returncode == status, result.stderr


def test_a_lost_connection_ends_the_shell_with_69(shell: Shell, corrald: Daemon) -> None:
    short = start_job(shell, 'echo rea""dy; exec sleep 1000')[:12]
    shell.send(f"logs -f {short} &\r")
    shell.expect(f"[{short}] ready\r\n")
    shell.expect(PROMPT)
    shell.send("sta")  # at the prompt, typing
    shell.expect("sta")
    corrald.process.terminate()
    # corrald stops its jobs before it says goodbye: the follow sees the end.
    shell.expect(f"[{short}] job stopped: stopped by corrald shutting down")
    shell.expect("corrald is shutting down (connection lost; leaving the shell)")
    assert shell.wait() == 69
    assert corrald.process.wait(timeout=30) == 0
    # corrald stopped the job on its way out.


def test_run_it_and_attach_take_the_terminal_and_give_the_prompt_back(shell: Shell) -> None:
    """A terminal job in the shell: keys are the job's (raw), the window's
    size follows ours, the detach keys leave it running and give the prompt
    back, and `attach` returns to it until it ends."""
    # A trapped signal interrupts `read` (then the loop reads again).
    script = (
        'trap "stty size" WINCH; '
        "while :; do read line || continue; case $line in quit) exit 5;; esac; "
        "echo got-$line; done"
    )
    shell.send(f"run -it -- sh -c '{script}'\r")
    shell.send("hello\r")
    shell.expect("got-hello")  # the job's, not our echo
    # The kernel sends our session SIGWINCH; the job's terminal follows.
    fcntl.ioctl(shell.master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    shell.expect("33 111")
    shell.send("\x10\x11")  # Ctrl+P Ctrl+Q
    found = re.search(r"detached from job (\w+)", shell.expect(PROMPT))
    assert found is not None
    job = found.group(1)
    shell.send(f"attach {job}\r")
    shell.send("again\r")
    shell.expect("got-again")
    shell.send("quit\r")
    shell.expect("exit status 5")
    shell.expect(PROMPT)  # the prompt is back: what is typed now is the shell's
    assert re.search(rf"{job}\w*\s+admin\s+exited \(5\)", shell.run("ps"))

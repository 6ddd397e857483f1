"""`corral shell`: every corral command on one connection, with line editing,
history, completion of command names and job ids, and background follows.

Theory of operation. readline has to own the main thread: Python reads the
terminal there, and runs signal handlers only there. The connection lives
in trio, so trio runs in a second thread for the whole shell (`_Session`):
it connects once, runs what the main thread hands it in one nursery, and
closes the connection when the main thread leaves or the connection is lost.

The main thread reads a line with `input()` and hands it over with
`TrioToken.run_sync_soon`, which never blocks, then waits on the line's
`threading.Event`. Our SIGINT handler decides what Ctrl+C means: at the
prompt it raises KeyboardInterrupt, which clears the line as in bash; while a
line runs it forwards the press to trio (`run_sync_soon` is safe in a signal
handler) and lets the wait go on. There a foreground `run` gets the press as
one item of its `args.interrupts` (the first stops the job with its grace,
the second kills it, and the shell follows the job to its end); any other
command is cancelled. SIGINT (and SIGWINCH, readline's) is blocked in the
trio thread, and so in every thread trio starts, so that the kernel always
delivers it to the main thread, whose waits it interrupts. (CPython's
readline notices a signal only when it interrupts its select(): one that
lands while readline is still busy with the previous key waits for the next
key. People do not type that fast; tests have to wait for the select().)

Commands print from the trio thread only. A background follow that prints
while the prompt is on the screen clears the prompt's line, prints, and
redraws the prompt with what has been typed so far.

When the trio thread ends (exit, a lost connection, a bug) it wakes the main
thread: it sets the event of every line still waiting, or, if the main
thread is at the prompt, sends it SIGINT (until it has left the prompt, for
the reason above) to end its `input()`. A lost connection is noticed by the
next command, or at once by a background follow.

Connection options on a line are refused, not ignored: `--addr other rm ID`
must not quietly remove a job on the server the shell is connected to.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import trio

from corral.client.client import Client, connect
from corral.client.errors import EXIT_UNAVAILABLE, EXIT_USAGE, CorralError
from corral.client.jobs import JobInfo
from corral.client.parser import build_parser
from corral.client.shell_output import PrefixedLines, Screen
from corral.records import STREAM_STDERR

PROMPT = "corral> "
# A Tab that waits longer on corrald completes nothing rather than hang the terminal.
COMPLETION_TIMEOUT = 2.0
# How often the ending session repeats its SIGINT until input() has returned.
WAKE_INTERVAL = 0.05
# A shell sits at its prompt for as long as its user likes: a ping this
# often keeps corrald's idle timeout (10 minutes unless set lower) away.
KEEPALIVE = 60.0
# A foreground `run` needs two presses (stop, then kill); more mean nothing.
RUN_INTERRUPTS = 2
# Options that choose the connection: the shell's is fixed when it starts.
CONNECTION_OPTIONS = {
    "addr": "--addr",
    "identity": "--identity",
    "server_name": "--server-name",
    "connect_timeout": "--connect-timeout",
}
SHELL_HELP = """\
in the shell:
  logs -f ID &      follow a job in the background, each line prefixed with [ID]
  follow ID         the same
  jobs              list the background follows
  help [COMMAND]    this list, or a command's options
  exit, quit        leave (Ctrl+D too); background follows stop
Ctrl+C stops a foreground `run`'s job (a second one kills it) and interrupts
any other command. The shell keeps the connection it started with: --addr,
--identity, --server-name and --connect-timeout are refused on its lines.
"""
HELP_WIDTH = 18  # the column SHELL_HELP's texts start at
BUILTINS = ["exit", "follow", "help", "jobs", "quit"]


@dataclass(eq=False)
class _Line:
    """One line the main thread hands to trio, and what became of it."""

    text: str
    done: threading.Event = field(default_factory=threading.Event)
    leave: bool = False  # exit, quit, or the connection was lost
    scope: trio.CancelScope | None = None  # set once trio has it
    interrupts: trio.MemorySendChannel[None] | None = None  # while a `run` runs
    resizes: trio.MemorySendChannel[None] | None = None  # while a job's terminal is ours
    interrupted: bool = False  # Ctrl+C cancelled it


class _Session:
    """The trio thread: one connection, the lines run on it, the background
    follows. Methods without a leading underscore are for the main thread."""

    def __init__(self, connect_args: dict[str, Any], screen: Screen) -> None:
        self.failure: CorralError | None = None  # could not connect
        self.lost = False  # the connection went away under the shell
        # The exit status of the last line that failed: a script fed to the
        # shell exits with it, as `sh` does with its last command's.
        self.failure_status = 0
        self.ended = threading.Event()
        self._connect_args = connect_args
        self._screen = screen
        self._parser = build_parser()
        self._lock = threading.Lock()  # between the threads: `_waiting`, prompt, end
        self._waiting: set[_Line] = set()
        self._running: _Line | None = None  # only the main thread sets it
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="corral-shell", daemon=True)
        self._started = threading.Event()  # the trio token is known
        self._connected = threading.Event()  # or the connection failed
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: Client | None = None
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._follows: dict[str, JobInfo] = {}

    # -- the main thread ----------------------------------------------------------

    def start(self) -> None:
        """Start the trio thread and wait until it is connected (or has failed)."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGWINCH})
        try:
            self._thread.start()  # it inherits the mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            self._started.wait()
            self._connected.wait()
        except KeyboardInterrupt:
            self._started.wait()
            self.close()  # cancels the connect
            raise

    def read(self, prompt: str) -> str | None:
        """The next line, or None once the session has ended. EOFError on Ctrl+D."""
        with self._lock:
            if self.ended.is_set():
                return None
            self._screen.prompt_shown = True
        try:
            return input(prompt)
        finally:
            self._screen.prompt_shown = False

    def submit(self, line: _Line) -> None:
        """Run the line in trio; Ctrl+C goes to it from now until it is done."""
        self._running = line
        with self._lock:
            if self.ended.is_set():
                line.done.set()
                return
            self._waiting.add(line)
            self._call_soon(self._start_line, line)

    def wait_done(self, line: _Line) -> None:
        line.done.wait()
        self._running = None

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl+C: the running line's, else the prompt's (a KeyboardInterrupt)."""
        line = self._running
        if line is not None:
            self._call_soon(self._interrupt_line, line)
        elif self._screen.prompt_shown or not self.ended.is_set():
            raise KeyboardInterrupt
        # Else it is a late wake-up from the ended session, the prompt already left.

    def on_sigwinch(self, signum: int, frame: FrameType | None) -> None:
        """The window changed: a job attached to our terminal follows it
        (readline, which calls this from its own handler, has its news)."""
        line = self._running
        if line is not None and line.resizes is not None:
            self._call_soon(self._resize_line, line.resizes)

    def job_ids(self) -> list[str]:
        """Our jobs' short ids, for completion; none if corrald does not say soon."""
        if self._token is None:
            return []
        try:
            return trio.from_thread.run(self._job_ids, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            return []

    def close(self) -> None:
        """Stop the follows, close the connection, end the thread."""
        self._call_soon(self._close)
        while self._thread.is_alive():
            with contextlib.suppress(KeyboardInterrupt):  # closing takes at most a second
                self._thread.join()
        if self._crash is not None:
            raise self._crash

    def _call_soon(self, function: Any, *args: Any) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(function, *args)

    # -- the trio thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # a bug: the main thread raises it
            self._crash = exc
        finally:
            with self._lock:
                self.ended.set()
                for line in self._waiting:
                    line.done.set()
            self._started.set()
            self._connected.set()
            self._wake_the_prompt()

    def _wake_the_prompt(self) -> None:
        """End the main thread's input(). A signal that lands as readline
        enters its select() goes unnoticed until the next one: send again
        until the prompt has been left."""
        main = threading.main_thread().ident
        assert main is not None
        while self._screen.prompt_shown:
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(WAKE_INTERVAL)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._started.set()
        with self._scope:
            try:
                async with connect(**self._connect_args, keepalive=KEEPALIVE) as client:
                    self._client = client
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        self._connected.set()
                        # A goodbye while nothing runs (corrald shutting
                        # down) ends the shell now, not at the next command.
                        self._report(await client.wait_closed())
            except CorralError as exc:
                if self._client is not None:
                    raise  # the lines catch theirs: this one is a bug
                self.failure = exc

    @property
    def _connection(self) -> Client:
        assert self._client is not None, "used before the connection is made"
        return self._client

    def _close(self) -> None:
        if self._follows and not self.lost:
            ids = ", ".join(job.short_id for job in self._follows.values())
            self._screen.write(f"corral: stopped following {ids}\n")
        self._scope.cancel()

    def _start_line(self, line: _Line) -> None:
        line.scope = trio.CancelScope()
        if line.interrupted:  # Ctrl+C right after Enter: the line runs no further
            line.scope.cancel()
        try:
            assert self._nursery is not None
            self._nursery.start_soon(self._run_line, line)
        except RuntimeError:  # the nursery has closed: the connection is going
            self._finish(line)

    def _interrupt_line(self, line: _Line) -> None:
        if line.interrupts is not None:
            if self._screen.redraw:
                self._screen.write("\n")  # `run` says what it does: on a line of its own
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                line.interrupts.send_nowait(None)
        else:
            line.interrupted = True
            if line.scope is not None:
                line.scope.cancel()

    @staticmethod
    def _resize_line(resizes: trio.MemorySendChannel[None]) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            resizes.send_nowait(None)  # one pending is enough: the size is read then

    def _finish(self, line: _Line) -> None:
        with self._lock:
            self._waiting.discard(line)
            line.done.set()

    async def _run_line(self, line: _Line) -> None:
        assert line.scope is not None
        try:
            with line.scope:
                line.leave = await self._execute(line)
            if line.interrupted:
                self._screen.write("\n")  # after the terminal's ^C, as a shell does
        except (CorralError, BaseExceptionGroup) as exc:
            error = _corral_error(exc)
            self.failure_status = int(error.exit_status)
            self._report(error)
            line.leave = self.lost
        finally:
            sys.stdout.flush()  # a command's last words, even when stdout is a pipe
            self._finish(line)

    def _report(self, exc: CorralError, prefix: str = "") -> None:
        """A failed command says why; a lost connection ends the shell, said once."""
        # The client marks itself closed when its connection goes; a command's
        # own error leaves it open. (Only the client knows which happened.)
        if self._connection.closed is None:
            self._screen.error(f"{prefix}error: {exc}\n")
            return
        if not self.lost:
            self.lost = True
            self._screen.error(f"corral: error: {exc} (connection lost; leaving the shell)\n")
        self._scope.cancel()

    async def _execute(self, line: _Line) -> bool:
        """Run one line; True if the shell should leave."""
        text = line.text.rstrip()
        background = text.endswith("&")
        try:
            words = shlex.split(text.removesuffix("&"))
        except ValueError as exc:
            self._screen.error(f"error: {exc}\n")
            self.failure_status = EXIT_USAGE
            return False
        if not words:
            return False
        name, rest = words[0], words[1:]
        if name in {"exit", "quit"}:
            return True
        if name == "help":
            self._help(rest)
            return False
        if name == "jobs":
            self._list_follows()
            return False
        if name == "follow":
            words, background = ["logs", "--follow", *rest], True
        args = self._parse(words)
        if args is None:
            return False
        refused = True
        given = [flag for dest, flag in CONNECTION_OPTIONS.items() if hasattr(args, dest)]
        if given:
            self._screen.error(
                f"error: {', '.join(given)} cannot change the shell's connection "
                f"(to {self._connection.address}); start another `corral shell` for another\n"
            )
        elif args.command == "shell":
            self._screen.error("error: this is the shell already\n")
        elif background and not (args.command == "logs" and args.follow):
            self._screen.error("error: only `logs -f ID &` runs in the background\n")
        elif background:
            refused = False
            await self._start_follow(args)
        else:
            refused = False
            status = await self._run_command(args, line)
            if status:
                self.failure_status = status
                self._screen.error(f"corral: exit status {status}\n")
        if refused:
            self.failure_status = EXIT_USAGE
        return False

    def _parse(self, words: list[str]) -> argparse.Namespace | None:
        """The CLI's own parsing; None when argparse has said what is wrong
        (or printed the help asked for)."""
        try:
            args = self._parser.parse_args(words)
            args.reconnect_for = 0  # the shell's connection is the shell's: lost, it ends
            return args
        except SystemExit as stop:
            if stop.code:  # not --help
                self.failure_status = int(stop.code)
            return None

    async def _run_command(self, args: argparse.Namespace, line: _Line) -> int:
        if not getattr(args, "connects", True):
            return int(await args.run(args, sys.stdout))
        if args.command not in {"run", "attach"}:
            return int(await args.run(self._connection, args, sys.stdout))
        # `run -it` and `attach` take the terminal over until the job ends or
        # we detach: SIGWINCH (the main thread's) reaches them through here.
        resizes_in, resizes = trio.open_memory_channel[None](1)
        send, receive = trio.open_memory_channel[None](RUN_INTERRUPTS)
        with send, receive, resizes_in, resizes:
            args.resizes = resizes
            line.resizes = resizes_in
            if args.command == "run":
                args.interrupts = receive
                line.interrupts = send
            try:
                return int(await args.run(self._connection, args, sys.stdout))
            finally:
                line.interrupts = line.resizes = None

    async def _start_follow(self, args: argparse.Namespace) -> None:
        assert self._nursery is not None
        # Resolved now, so a wrong id is said at once rather than in the background.
        job = await self._connection.status(args.id)
        if job.id in self._follows:
            self._screen.error(f"error: already following {job.short_id}\n")
            return
        self._follows[job.id] = job
        self._nursery.start_soon(self._follow, job, args)
        self._screen.write(f"[{job.short_id}] following in the background\n")

    async def _follow(self, job: JobInfo, args: argparse.Namespace) -> None:
        lines = PrefixedLines(job, args)
        client = self._connection
        try:
            async with client.logs(job.id, follow=True, offset=args.since_offset) as stream:
                async for record in stream:
                    self._print_job_output(*lines.feed(record))
            for stream_id, text in lines.rest():
                self._print_job_output(stream_id, text)
            final = stream.job
            assert final is not None
            self._screen.write(f"[{job.short_id}] job {final.state}: {final.reason}\n")
        except CorralError as exc:
            self.failure_status = int(exc.exit_status)
            self._report(exc, prefix=f"[{job.short_id}] ")
        finally:
            del self._follows[job.id]

    def _print_job_output(self, stream: int, text: str) -> None:
        if text:
            self._screen.write(text, sys.stderr if stream == STREAM_STDERR else sys.stdout)

    def _list_follows(self) -> None:
        if not self._follows:
            self._screen.write("no background follows\n")
        for job in self._follows.values():
            self._screen.write(f"{job.short_id}  following  {job.command}\n")

    def _help(self, command: list[str]) -> None:
        if command:
            self._parse([*command, "--help"])
            return
        rows = [(name, text) for name, text in _commands(self._parser) if name != "shell"]
        listed = "".join(f"  {name:<{HELP_WIDTH}}{text}\n" for name, text in rows)
        self._screen.write(f"commands (`help COMMAND` for one's options):\n{listed}{SHELL_HELP}")

    async def _job_ids(self) -> list[str]:
        with trio.move_on_after(COMPLETION_TIMEOUT), contextlib.suppress(CorralError):
            return [job.short_id for job in await self._connection.list()]
        return []


def _corral_error(exc: BaseException) -> CorralError:
    """The CorralError in what a command raised (nurseries wrap it in groups);
    anything else is a bug and goes on up."""
    if isinstance(exc, CorralError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(CorralError)
        if matched is not None and rest is None:
            return _corral_error(matched.exceptions[0])
    raise exc


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The CLI's commands with their one-line help, as `corral --help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [(sub.dest, sub.help or "") for sub in action._get_subactions()]
    return []


def _loop(session: _Session, prompt: str) -> None:
    """Read lines and run them until exit, Ctrl+D or the end of the session."""
    while True:
        try:
            text = session.read(prompt)
            if text is None:
                return
            line = _Line(text)
            session.submit(line)  # from here Ctrl+C is the line's: nothing raises below
        except KeyboardInterrupt:
            sys.stdout.write("\n")  # as bash: what was typed is dropped
            if session.ended.is_set():
                return
            continue
        except EOFError:
            if prompt:
                sys.stdout.write("\n")  # Ctrl+D: the next prompt is the caller's
            return
        session.wait_done(line)
        if line.leave:
            return


def run_shell(args: argparse.Namespace, connect_args: dict[str, Any]) -> int:
    """Run the interactive shell until exit or EOF; return the exit status:
    69 when the connection was lost; otherwise 0 at a terminal, and for
    lines read from elsewhere (a script) the status of the last that failed.
    Raises the CorralError of a connection that could not be made."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    prompt = PROMPT if interactive else ""
    session = _Session(connect_args, Screen(prompt, redraw=interactive))
    previous = signal.signal(signal.SIGINT, session.on_sigint)
    # Before readline loads: its SIGWINCH handler calls the one it replaces,
    # so the prompt and an attached job's terminal both follow the window.
    # (It stays: readline keeps calling it, and with no line running it does nothing.)
    signal.signal(signal.SIGWINCH, session.on_sigwinch)
    from corral.client import line_editing  # noqa: PLC0415 - loads readline: see above

    try:
        session.start()
        if session.failure is not None:
            raise session.failure
        history = line_editing.history_path() if interactive else None
        if history is not None:
            names = [name for name, _ in _commands(build_parser()) if name != "shell"]
            line_editing.set_up(
                history, line_editing.Completer(session.job_ids, [*names, *BUILTINS])
            )
        try:
            _loop(session, prompt)
        finally:
            session.close()
            if history is not None:
                line_editing.save_history(history)
    finally:
        signal.signal(signal.SIGINT, previous)
    if session.lost:
        return EXIT_UNAVAILABLE
    # Lines from a script: its exit status is the last failure's, so a
    # pipeline or CI step sees that something failed. At a terminal the
    # person saw each error as it came.
    return 0 if interactive else session.failure_status

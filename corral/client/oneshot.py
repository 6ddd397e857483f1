"""The CLI's one-shot commands, run without trio: `info`, `ps`, `status`
and a plain `run` (neither -i nor -t), each on one blocking connection
(`corral.client.blocking`).

Why: such a command does a few milliseconds of work, and importing trio and
the async client would cost it several times that (issue 19 asks for at
most 3.5 times `python -c pass`; bench/cli.py measures it). They print what
the async commands print (the same `corral.client.reports` functions) and
fail with the same errors; the shell, and every other command, run the
async ones (`corral.client.commands`).

`run` here is `commands.cmd_run`'s plain case step for step: start the job
with Ctrl+C already the job's (a press while it starts stops it once it
has), follow its output to its end across lost connections (reconnecting
for `--reconnect-for`, resuming at the first record not written whole),
stop it on the first Ctrl+C with its grace and kill it on the second, stop
it with its grace if our reader goes away, and exit with its status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Self, TextIO

from corral.client.blocking import BlockingClient, LogStream, connect
from corral.client.errors import ConnectError, CorralError, ServerError
from corral.client.jobs import JobInfo
from corral.client.operations import stop_args
from corral.client.output import (
    RECONNECT_BACKOFF,
    JobOutput,
    LogWriter,
    OutputClosed,
    is_connection_loss,
    note,
)
from corral.client.reports import (
    exit_status,
    naming_its_job,
    show_info,
    show_ps,
    show_status,
    start_failure,
    start_options,
)
from corral.client.settings import connect_args


def handles(args: argparse.Namespace) -> bool:
    """Whether the command `args` names runs here, without trio."""
    command = getattr(args, "command", None)
    if command == "run":
        return not (args.stdin or args.tty)
    return command in _COMMANDS


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Connect, run the command, return its exit status (CorralError on failure)."""
    with connect(**connect_args(args)) as client:
        return _COMMANDS[args.command](client, args, out)


def _info(client: BlockingClient, args: argparse.Namespace, out: TextIO) -> int:
    return show_info(client.info(), client.address, args, out)


def _ps(client: BlockingClient, args: argparse.Namespace, out: TextIO) -> int:
    return show_ps(client.list(everyone=args.all), args, out)


def _status(client: BlockingClient, args: argparse.Namespace, out: TextIO) -> int:
    return show_status(client.status(args.id), args, out)


def _run(client: BlockingClient, args: argparse.Namespace, out: TextIO) -> int:
    output = JobOutput(args, out)
    with Interrupts() as interrupts:  # from here Ctrl+C is the job's
        try:
            job = client.start(**start_options(args))
        except ServerError as exc:
            return start_failure(naming_its_job(exc))
        with _Follower(client, args, output, job.id, interrupts) as follow:
            try:
                follow.run()
            except OutputClosed:
                # Nobody reads the job's output any more: stop it, as Ctrl+C
                # would, then end quietly (see cli.run).
                with contextlib.suppress(CorralError):
                    follow.client.stop(job.id, args.grace)
                raise
    assert follow.job is not None
    return exit_status(follow.job, stopped_by_us=interrupts.count > 0)


_COMMANDS: dict[str, Callable[[BlockingClient, argparse.Namespace, TextIO], int]] = {
    "info": _info,
    "ps": _ps,
    "status": _status,
    "run": _run,
}


class Interrupts:
    """Ctrl+C (SIGINT) counted, not raised, inside the block: `count`
    presses so far; `fd` becomes readable at each, for a select() to
    return on (`signal.set_wakeup_fd`), until `drain`ed."""

    def __init__(self) -> None:
        self.count = 0
        self.fd = -1
        self._write = -1
        self._handler: Callable[[int, FrameType | None], object] | int | None = None
        self._wakeup = -1

    def __enter__(self) -> Self:
        self.fd, self._write = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write, False)
        self._wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._handler = signal.signal(signal.SIGINT, self._pressed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._handler)
        signal.set_wakeup_fd(self._wakeup)
        os.close(self.fd)
        os.close(self._write)

    def _pressed(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def drain(self) -> None:
        """Empty `fd`: it becomes readable again at the next press."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 64):
                pass


class _Follower:
    """A job's output written out to its end across lost connections, and
    Ctrl+C answered meanwhile: `corral.client.follow.Follower` and
    `commands._stop_on_interrupt`, blocking. `client` is the live
    connection (the one a stop must use); connections it opens are closed
    with it."""

    def __init__(
        self,
        client: BlockingClient,
        args: argparse.Namespace,
        output: JobOutput,
        job_id: str,
        interrupts: Interrupts,
    ) -> None:
        self.client = client
        self.args = args
        self.output = output
        self.job_id = job_id
        self.offset = 0
        self.job: JobInfo | None = None
        self._interrupts = interrupts
        self._answered = 0
        self._opened: list[BlockingClient] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for client in self._opened:
            client.close()

    def run(self) -> None:
        reconnect_for = float(getattr(self.args, "reconnect_for", 0) or 0)
        while True:
            try:
                self._read()
                return
            except (ConnectError, ServerError) as exc:
                if not (reconnect_for > 0 and is_connection_loss(exc)):
                    raise
                self.client = self._reconnect(exc, reconnect_for)

    def _read(self) -> None:
        writer = LogWriter(self.output, self.job_id, self.offset)
        stream = LogStream(self.client, self.job_id, self.offset)
        while True:
            self._answer_interrupts()
            data = stream.receive(wakeup=self._interrupts.fd)
            if data is None:
                continue  # a Ctrl+C
            if not data:
                break
            writer.write(data)
            self.offset = writer.offset
        self.offset, self.job = writer.offset, stream.job
        self.output.end(self.offset, stream.job)

    def _answer_interrupts(self) -> None:
        """Ctrl+C stops the job, like ssh's remote end: first with its grace,
        then at once. The stop's answer is not waited for: the stream's
        end (or its loss) tells the rest."""
        self._interrupts.drain()
        while self._answered < self._interrupts.count:
            self._answered += 1
            if self._answered == 1:
                note(f"stopping job {self.job_id[:12]} (Ctrl+C again to kill it now)")
                grace = self.args.grace
            else:
                note(f"killing job {self.job_id[:12]}")
                grace = 0.0
            with contextlib.suppress(CorralError):
                self.client.request("stop", stop_args(self.job_id, grace))

    def _reconnect(self, lost: CorralError, seconds: float) -> BlockingClient:
        note(f"{lost}; reconnecting (for up to {seconds:g} s)")
        deadline = time.monotonic() + seconds
        delay = 0.1
        while True:
            try:
                client = connect(**connect_args(self.args))
            except (ConnectError, ServerError) as exc:
                if not is_connection_loss(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # a pause between tries, not a synchronisation
                delay = min(2 * delay, RECONNECT_BACKOFF)
                continue
            self._opened.append(client)
            note(f"reconnected; resuming job {self.job_id[:12]}'s output at byte {self.offset}")
            return client

"""Attached to a job from the command line: our stdin to its input, its
output to our stdout, and with a terminal, the terminal's keys and size.

Theory of operation. One `Attachment` (corral.client.job_streams) carries
both directions on one request. Three tasks share a nursery: the output
(records to our stdout and stderr until the job's end, which ends the
session), the input (our stdin to the job, until EOF, the job taking no
more, or the detach keys) and, with a terminal, its size (SIGWINCH becomes
a resize). With a terminal the local one is in raw mode for the whole
session, so every key is a byte for the job (Ctrl+C, Ctrl+Z and Ctrl+\\
act on the job, through its own line discipline) and `raw_mode` restores
it on every way out; SIGTERM and SIGHUP end the session (restoring it)
instead of killing us with the terminal raw. Leaving the attachment
early is a detach: the job runs on, its stdin open for the next attach.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import trio

from corral.client.detach_keys import DetachMatcher
from corral.client.errors import CorralError, InputClosed
from corral.client.job_streams import Attachment
from corral.client.jobs import JobInfo
from corral.client.output import JobOutput
from corral.client.terminal import open_input, raw_mode, window_size
from corral.records import RecordDecoder

# Our stdin is read this much at a time: a Data frame's worth (a pipe gives
# at most its 64 KiB a read; a file, all of it).
READ_SIZE = 128 << 10
# Signals that end an attached session, the terminal restored first.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass(slots=True)
class Session:
    """How an attached session ended: the job's end, a detach, or a signal."""

    job: JobInfo | None = None
    detached: bool = False
    signal: int | None = None


async def attached(
    attachment: Attachment,
    output: JobOutput,
    *,
    terminal: bool,
    detach_keys: bytes,
    stdin_fd: int = 0,
    resizes: AsyncIterator[object] | None = None,
    signals: bool = True,
) -> Session:
    """Drive `attachment` until the job ends, we detach, or a signal comes.

    With `terminal`, our terminal on `stdin_fd` is raw meanwhile and its
    size follows ours: on every SIGWINCH, or every item of `resizes` (the
    shell, whose signals its main thread takes). Without `signals` we
    install no signal handlers (not the main thread)."""
    session = Session()
    with raw_mode(stdin_fd) if terminal else contextlib.nullcontext(), _one_error():
        async with trio.open_nursery() as nursery:
            if attachment.input:
                nursery.start_soon(
                    _send_input, attachment, stdin_fd, detach_keys if terminal else b"", session,
                    nursery.cancel_scope,
                )  # fmt: skip
            if terminal:
                if resizes is None and signals:
                    nursery.start_soon(_follow_size_by_signal, attachment, stdin_fd)
                elif resizes is not None:
                    nursery.start_soon(_follow_size, attachment, stdin_fd, resizes)
            if signals:
                nursery.start_soon(_end_on_signal, session, nursery.cancel_scope)
            decoder = RecordDecoder()
            job_id = attachment.job_id
            async for chunk in attachment.chunks():
                try:
                    records = decoder.feed(chunk.data)
                except ValueError as exc:
                    raise InputClosed(f"the job's log is damaged: {exc}") from None
                output.write(records, job_id)
            session.job = attachment.job
            nursery.cancel_scope.cancel()
    return session


async def _send_input(
    attachment: Attachment,
    fd: int,
    detach_keys: bytes,
    session: Session,
    scope: trio.CancelScope,
) -> None:
    """Our stdin to the job until EOF (the job's stdin ends), the job takes
    no more (quietly), or the detach keys (the session ends, job running)."""
    matcher = DetachMatcher(detach_keys)
    source = open_input(fd)
    try:
        while True:
            chunk = await source.receive_some(READ_SIZE)
            # At EOF, what the matcher held (a prefix of the detach keys)
            # was never the sequence: it goes to the job.
            data, detach = matcher.feed(chunk) if chunk else (matcher.pending, False)
            try:
                if data:
                    await attachment.send(data)
                if not chunk:  # EOF: the job's stdin ends
                    await attachment.close()
                    return
            except CorralError:
                # The job takes no more input (quietly, as `yes | head`), or the
                # connection is gone: the output's end says which, and how.
                return
            if detach:
                session.detached = True
                scope.cancel()
                return
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


async def _follow_size_by_signal(attachment: Attachment, fd: int) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as winches:
        await _follow_size(attachment, fd, winches)


async def _follow_size(attachment: Attachment, fd: int, resizes: AsyncIterator[object]) -> None:
    """The job's terminal takes our terminal's size whenever it changes."""
    last = window_size(fd)
    async for _ in resizes:
        size = window_size(fd)
        if size is not None and size != last:
            last = size
            with contextlib.suppress(CorralError):  # the job may have just ended
                await attachment.resize(*size)


async def _end_on_signal(session: Session, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(*ENDING_SIGNALS) as signals:
        async for number in signals:
            session.signal = number
            scope.cancel()
            return


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """The session's one error as itself, not in the group its nursery
    wraps it in (its other tasks end quietly)."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        if len(errors) == 1:
            raise errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


def detached_note(job_id: str) -> None:
    """What a detach leaves behind, and how to return."""
    short = job_id[:12]
    with contextlib.suppress(BrokenPipeError):
        sys.stderr.write(
            f"corral: detached from job {short}; it runs on (`corral attach {short}` to return)\n"
        )
        sys.stderr.flush()

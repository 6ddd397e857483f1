"""A job's output followed to its end (or its current end) from trio,
across lost connections: `logs`, and `run` in the shell or with a terminal
(the CLI's plain `run` is `corral.client.oneshot`'s). Where the output goes
is `corral.client.output`'s.
"""

from __future__ import annotations

import argparse
import contextlib

import trio

from corral.client.client import Client, connect
from corral.client.errors import ConnectError, CorralError, ServerError
from corral.client.jobs import JobInfo
from corral.client.output import (
    RECONNECT_BACKOFF,
    JobOutput,
    LogWriter,
    is_connection_loss,
    note,
)
from corral.client.settings import connect_args


class Follower:
    """A job's output written out to its end (or its current end), across
    lost connections: with `args.reconnect_for` > 0, a connection lost or a
    corrald saying goodbye is followed by new connections, tried for that
    long, and the stream resumes at the first record not yet written whole.
    Offsets are exact, so nothing is lost or repeated."""

    def __init__(
        self, client: Client, args: argparse.Namespace, output: JobOutput, job_id: str
    ) -> None:
        self.client = client  # the live connection: the one a stop must use
        self.args = args
        self.output = output
        self.job_id = job_id
        self.offset = int(getattr(args, "since_offset", 0) or 0)
        self.job: JobInfo | None = None

    async def run(self, *, follow: bool) -> None:
        reconnect_for = float(getattr(self.args, "reconnect_for", 0) or 0)
        async with contextlib.AsyncExitStack() as connections:
            while True:
                try:
                    await self._read(follow)
                    return
                except (ConnectError, ServerError) as exc:
                    if not (follow and reconnect_for > 0 and is_connection_loss(exc)):
                        raise
                    self.client = await self._reconnect(connections, exc, reconnect_for)

    async def _read(self, follow: bool) -> None:
        writer = LogWriter(self.output, self.job_id, self.offset)
        async with self.client.logs(self.job_id, follow=follow, offset=self.offset) as stream:
            async for chunk in stream.chunks():
                writer.write(chunk.data)
                self.offset = writer.offset
        self.offset, self.job = writer.offset, stream.job
        self.output.end(self.offset, stream.job)

    async def _reconnect(
        self, connections: contextlib.AsyncExitStack, lost: CorralError, seconds: float
    ) -> Client:
        note(f"{lost}; reconnecting (for up to {seconds:g} s)")
        deadline = trio.current_time() + seconds
        delay = 0.1
        while True:
            try:
                client = await connections.enter_async_context(connect(**connect_args(self.args)))
            except (ConnectError, ServerError) as exc:
                if not is_connection_loss(exc) or trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)  # a pause between tries, not a synchronisation
                delay = min(2 * delay, RECONNECT_BACKOFF)
                continue
            note(f"reconnected; resuming job {self.job_id[:12]}'s output at byte {self.offset}")
            return client

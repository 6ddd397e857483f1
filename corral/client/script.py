"""Running a client script under trio so that Ctrl+C is a clean stop.

trio turns SIGINT into KeyboardInterrupt wherever the main task happens to
be, even inside a library's bookkeeping, so a script interrupted mid-request
can leave a job it started unknown to its own cleanup. `run_script` turns
Ctrl+C into cancellation instead: every `finally` and shielded cleanup runs
as for any cancellation, and a start in flight is undone (see
`Client.start`).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import trio

from corral.client.errors import EXIT_INTERRUPTED


def run_script(main: Callable[[], Awaitable[int]]) -> int:
    """Run `main` under trio and return its exit status; on Ctrl+C cancel it
    and return 130 (128 + SIGINT, as a shell reports it). Further presses
    while it cleans up are ignored: its cleanup is bounded by its own
    timeouts."""

    async def supervised() -> int:
        status = EXIT_INTERRUPTED
        with trio.open_signal_receiver(signal.SIGINT) as presses:
            async with trio.open_nursery() as nursery:

                async def body() -> None:
                    nonlocal status
                    status = await main()
                    nursery.cancel_scope.cancel()

                async def interrupt() -> None:
                    async for _ in presses:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(body)
                nursery.start_soon(interrupt)
        return status

    return trio.run(supervised)

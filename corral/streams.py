"""Small trio stream helpers shared by corrald and the client."""

from __future__ import annotations

import contextlib

import trio

# Long enough for a close_notify round trip on a slow link; a peer that
# takes longer is cut off.
CLOSE_TIMEOUT = 1.0

GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


async def close_stream(stream: trio.abc.AsyncResource, timeout: float = CLOSE_TIMEOUT) -> None:  # noqa: ASYNC109 - bounds a shielded close
    """Close gracefully if the peer lets us within `timeout`, else forcefully.

    Shielded: it runs to the end even inside a cancelled scope, so it is
    safe in `finally` blocks.
    """
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(timeout) as scope,
        contextlib.suppress(*GONE),
    ):
        await stream.aclose()
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)

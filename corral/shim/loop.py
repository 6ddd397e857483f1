"""The shim's one poll loop: descriptors and what to call when they are ready."""

from __future__ import annotations

import select
from collections.abc import Callable

Handler = Callable[[int], None]


class Loop:
    """poll() over the descriptors being watched, each with its handler.

    No threads and no signal handlers: everything the shim waits on is a
    descriptor (pipes, sockets, init's pidfd), so one poll() waits for all.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._handlers: dict[int, Handler] = {}

    def watch(self, fd: int, handler: Handler, events: int = select.POLLIN) -> None:
        """Call `handler(fd)` whenever `fd` is ready for `events`."""
        self._handlers[fd] = handler
        self._poll.register(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed); nothing if it was not watched."""
        if self._handlers.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def run_once(self, timeout_ms: int | None, only: set[int] | None = None) -> None:
        """Wait up to `timeout_ms` (None: for ever) and call the handlers of
        the descriptors that are ready (with `only`, of those alone).

        At EOF poll() reports POLLHUP alone, not POLLIN: the handler is
        called then too, and its read returns b"".
        """
        for fd, _ in self._poll.poll(timeout_ms):
            handler = self._handlers.get(fd)  # an earlier handler may have unwatched it
            if handler is not None and (only is None or fd in only):
                handler(fd)

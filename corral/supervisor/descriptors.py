"""corrald's open descriptors against its limit, and the reserve kept for admins.

Theory of operation. Every connection, output stream and running job holds
descriptors of corrald's, and at RLIMIT_NOFILE accept() fails (EMFILE) for
everyone alike: an admin could no longer connect to see why. So the last
descriptors below the limit are the admins': once corrald's open
descriptors reach the limit less the reserve, a user's new session, output
stream or job is refused (`resource_exhausted`) and an admin's is served.
A connection is still accepted then, since whose it is is known only after
its TLS handshake, but peers not yet known may hold at most half the
reserve (the server closes the rest at accept), so the other half is
always left for admins' sessions.

Counting. On Linux 6.2 and later the size of /proc/self/fd is the number
of descriptors open: one stat, ~10 us whatever the number. Earlier kernels
say 0 there, and listing the directory costs ~1.5 us a descriptor (28 ms
at 19,000), so it is listed at most every RECOUNT_INTERVAL (longer if a
listing is slow), and between listings the count moves with what the
server knows it holds (`held`: connections, streams, running jobs).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import OperationError
from corral.identity import Identity
from corral.protocol import ErrorCode

FD_DIR = Path("/proc/self/fd")
# The admins' share of the limit: at corrald's usual 20,000 or more, a
# thousand descriptors, beyond the 544 peers that may be mid-handshake.
RESERVE_SHARE = 20
# A floor for low limits: a few admin sessions and streams, and the
# descriptors a start or a status takes for a moment.
MIN_RESERVE = 64
# Seconds between listings where the count cannot be had from one stat;
# a listing is also kept for 50 times what it took, so it costs at most
# ~2 % of the event loop.
RECOUNT_INTERVAL = 0.25
RECOUNT_COST_FACTOR = 50


def default_reserve(limit: int) -> int:
    """The reserve at a limit of `limit` descriptors: a RESERVE_SHARE of
    it, at least MIN_RESERVE, at most half of it."""
    return min(max(MIN_RESERVE, limit // RESERVE_SHARE), limit // 2)


class Descriptors:
    """corrald's descriptors, counted against RLIMIT_NOFILE (read at each
    count: it may be changed while corrald runs, by prlimit(1) say).

    `reserve`: descriptors only admins may take (None: `default_reserve`).
    `fd_dir`: the directory of this process's descriptors. `held`: the
    descriptors the caller holds and counts itself, for kernels where a
    count is a listing."""

    def __init__(
        self,
        reserve: int | None = None,
        *,
        fd_dir: Path = FD_DIR,
        held: Callable[[], int] = lambda: 0,
    ) -> None:
        self._reserve = reserve
        self._fd_dir = fd_dir
        self._held = held
        self._listed = 0  # the last listing's count, and `held` then
        self._listed_held = 0
        self._listed_until = -1.0  # time.monotonic() until which the listing stands

    @property
    def limit(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft if soft != resource.RLIM_INFINITY else 1 << 30

    @property
    def reserve(self) -> int:
        return default_reserve(self.limit) if self._reserve is None else self._reserve

    def count(self) -> int:
        """The descriptors open now (an estimate between listings on a
        kernel older than 6.2; see the module's doc)."""
        size = os.stat(self._fd_dir).st_size
        if size:
            return size
        held = self._held()
        now = time.monotonic()
        if now >= self._listed_until:
            began = time.perf_counter()
            listed = len(os.listdir(self._fd_dir)) - 1  # less the listing's own
            took = time.perf_counter() - began
            self._listed, self._listed_held = listed, held
            self._listed_until = now + max(RECOUNT_INTERVAL, RECOUNT_COST_FACTOR * took)
        return self._listed + held - self._listed_held

    def within_reserve(self) -> bool:
        """Whether only admins may take more descriptors now."""
        return self.count() >= self.limit - self.reserve

    def check(self, identity: Identity, what: str) -> None:
        """Raise OperationError resource_exhausted, saying that corrald has
        no more `what` ("connections", "output streams", "jobs") for users
        now, if `identity` is a user's and the count is within the reserve.
        An admin may always take more (up to the limit itself)."""
        if identity.is_admin:
            return
        count, limit, reserve = self.count(), self.limit, self.reserve
        if count >= limit - reserve:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"corrald has {count} of its {limit} descriptors open and keeps the last "
                f"{reserve} for admins: it takes no more {what} from users now; "
                "try again when some have closed",
            )

    def statistics(self) -> dict[str, Any]:
        """The count, the limit and the reserve, for `info`."""
        return {"open": self.count(), "limit": self.limit, "reserve": self.reserve}


__all__ = ["FD_DIR", "MIN_RESERVE", "RESERVE_SHARE", "Descriptors", "default_reserve"]

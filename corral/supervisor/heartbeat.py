"""How late corrald's event loop wakes: the measure of "it never blocks".

One task sleeps until a deadline every `interval` and notes how late it woke.
Every task in corrald shares the loop, so a wake-up that is late by 50 ms
means something held the loop for 50 ms (a blocking call, a long pure-Python
stretch) and every session and job watcher waited with it. The figures are
in `info` (`loop_lag`); a wake-up later than `WARN_AFTER` is logged with
its lateness, so a stall shows in the log at the time it happened.

A late wake-up has two causes: corrald's own work held the loop, or the
host had no CPU for it (the kernel counts the time a thread waits on a run
queue: /proc/thread-self/schedstat). The figures keep them apart: `max_ms`
and `late` count both, `max_own_ms` and `late_own` only the lateness not
spent waiting for a CPU, which is corrald's to answer for.

Ten wake-ups a second cost a few microseconds each: an idle corrald stays
idle.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import trio

log = logging.getLogger(__name__)

INTERVAL = 0.1
WINDOW = 60.0  # seconds the recent maximum covers
LATE = 0.05  # the target: a wake-up later than this counts as late
WARN_AFTER = 0.25


class Heartbeat:
    def __init__(self, interval: float = INTERVAL, window: float = WINDOW) -> None:
        self.interval = interval
        self.window = window
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag), within the window
        self._last = 0.0
        self._max = 0.0
        self._late = 0
        self._beats = 0
        self._max_own = 0.0
        self._late_own = 0
        self._waited = _run_queue_wait()

    async def run(self) -> None:
        """Beat until cancelled."""
        deadline = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(deadline)
            now = trio.current_time()
            waited = _run_queue_wait()
            self.record(now, now - deadline, waited - self._waited)
            self._waited = waited
            deadline = now + self.interval

    def record(self, now: float, lag: float, waited: float = 0.0) -> None:
        """A wake-up `lag` s late, after `waited` s on a run queue since the last."""
        self._beats += 1
        self._last = lag
        self._max = max(self._max, lag)
        own = max(0.0, lag - waited)
        self._max_own = max(self._max_own, own)
        if lag > LATE:
            self._late += 1
        if own > LATE:
            self._late_own += 1
        if lag > WARN_AFTER:
            log.warning(
                "the event loop woke %.0f ms late (%.0f ms of it waiting for a CPU)",
                lag * 1000,
                min(waited, lag) * 1000,
            )
        # Only lags that may become the window's maximum are kept: each
        # sample drops those before it that it beats (a monotonic queue).
        while self._recent and self._recent[-1][1] <= lag:
            self._recent.pop()
        self._recent.append((now, lag))
        while self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def statistics(self) -> dict[str, float | int]:
        recent = self._recent[0][1] if self._recent else 0.0
        return {
            "interval_ms": round(self.interval * 1000, 3),
            "last_ms": round(self._last * 1000, 3),
            "max_recent_ms": round(recent * 1000, 3),  # over the last WINDOW seconds
            "max_ms": round(self._max * 1000, 3),  # since corrald started
            "late": self._late,  # wake-ups later than LATE
            "max_own_ms": round(self._max_own * 1000, 3),  # not spent waiting for a CPU
            "late_own": self._late_own,
            "beats": self._beats,
        }


def _run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 if unknown)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def live_tasks() -> int:
    """Tasks alive in this trio run (the root's tree): a leak shows as growth."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    return 0 if root is None else count(root)


def process_statistics() -> dict[str, int]:
    """corrald's own footprint: tasks, open descriptors, resident memory."""
    rss = 0
    with open("/proc/self/statm", "rb") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"tasks": live_tasks(), "fds": len(os.listdir("/proc/self/fd")), "rss_bytes": rss}

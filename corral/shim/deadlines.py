"""The shim's clock: when setup times out, when the max runtime ends the
job, and where a stop is (SIGTERM sent, SIGKILL due).

Sans-IO, like a protocol: it takes the time and says what to do; the
shim sends the signals. One object, so the poll loop has one question to
ask ("how long may I sleep?") and one answer to act on ("what is due?").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# poll() takes an int of ms: wake at least hourly for far deadlines.
MAX_POLL_MS = 3_600_000


class Due(enum.Enum):
    """What the shim must do now."""

    SETUP_EXPIRED = "setup_expired"  # fail the start and kill init
    RUNTIME_EXPIRED = "runtime_expired"  # stop the job (max runtime)
    TERM = "term"  # send SIGTERM: a stop with a grace began
    KILL = "kill"  # send SIGKILL: a stop's grace ran out, or it had none


@dataclass(frozen=True, slots=True)
class Stop:
    """A stop under way: who asked, the grace the job had, and when it began."""

    by: str
    grace: float
    began: float


class Deadlines:
    """The timers of one job. Times are time.monotonic() seconds."""

    def __init__(self) -> None:
        self._setup: float | None = None
        self._runtime: float | None = None
        self._kill: float | None = None
        self.stop: Stop | None = None  # the first stop asked for, if any

    def setup_began(self, now: float, timeout: float) -> None:
        """Setup must end (the command exec) within `timeout` seconds."""
        self._setup = now + timeout

    def running(self, now: float, max_runtime: float | None) -> None:
        """The command runs: setup is over, and it may run `max_runtime` seconds."""
        self._setup = None
        if max_runtime is not None:
            self._runtime = now + max_runtime

    def request_stop(self, by: str, grace: float, now: float) -> Due | None:
        """A stop asked for by `by`: TERM (then KILL after `grace`), KILL
        at once for no grace, or None when a stop is already under way.

        Stopping twice is safe; a shorter grace the second time brings the
        kill closer, and the stop's grace then says what the job really had.
        """
        if self.stop is not None:
            if self._kill is not None and now + grace < self._kill:
                self._kill = now + grace
                self.stop = Stop(
                    self.stop.by, round(self._kill - self.stop.began, 3), self.stop.began
                )
            return None
        self.stop = Stop(by, grace, now)
        if grace <= 0:
            return Due.KILL
        self._kill = now + grace
        return Due.TERM

    def timeout_ms(self, now: float) -> int | None:
        """How long the poll loop may sleep (None: until something happens)."""
        times = [t for t in (self._setup, self._runtime, self._kill) if t is not None]
        if not times:
            return None
        return min(MAX_POLL_MS, max(0, int((min(times) - now) * 1000) + 1))

    def due(self, now: float) -> list[Due]:
        """What is due at `now`, in the order to act on it; each once."""
        due = []
        if self._setup is not None and now >= self._setup:
            self._setup = None
            due.append(Due.SETUP_EXPIRED)
        if self._runtime is not None and now >= self._runtime:
            self._runtime = None
            due.append(Due.RUNTIME_EXPIRED)
        if self._kill is not None and now >= self._kill:
            self._kill = None
            due.append(Due.KILL)
        return due

"""How a job ended, in words: its exit code or signal from the wait
statuses init and the command left, and the one-line reason a status
carries ("stopped by alice; killed by SIGKILL after 10 s grace").

Pure: wait statuses and the stop in, words out. The shim does the waiting.
"""

from __future__ import annotations

import os
import signal

from corral.errors import ErrorCode
from corral.shim.deadlines import Stop
from corral.shim.sandbox import StartFailure


def signal_name(number: int) -> str:
    """SIGKILL for 9; "signal N" for a number without a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(command_status: int | None, init_status: int) -> tuple[int | None, str | None]:
    """The job's exit code, or the name of the signal that killed it: from
    the command's wait status, which init passed on, else from init's."""
    exit_code: int | None = None
    killed_by: str | None = None
    status = command_status if command_status is not None else init_status
    if os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        killed_by = signal_name(os.WTERMSIG(status))
    if command_status is None and killed_by is None:
        # init ended without the command's status: it was killed (stop,
        # OOM); the command died with it.
        exit_code, killed_by = None, "SIGKILL"
    return exit_code, killed_by


def reason(
    exit_code: int | None, killed_by: str | None, oom: bool, stop: Stop | None, killed: bool
) -> str:
    """The reason of an end: how the command ended, and who stopped it
    (`stop`), after its grace if it had to be `killed`."""
    if killed_by is not None:
        how = f"killed by {killed_by}"
        if oom:
            how += ": out of memory"
    else:
        how = f"exited with code {exit_code}"
    if stop is None:
        return how
    if stop.by.startswith("max runtime"):
        stopped = f"stopped: {stop.by} reached"
    else:
        stopped = f"stopped by {stop.by}"
    if killed:
        return f"{stopped}; {how} after {stop.grace:g} s grace"
    return f"{stopped}; {how}"


def setup_ended(init_status: int, stop: Stop | None) -> StartFailure:
    """Why the job failed when init ended before the command started,
    without saying why (a stop during setup, or init's own death)."""
    if stop is not None:
        message = f"stopped by {stop.by} before the command started"
        return StartFailure("setup", message, ErrorCode.FAILED_PRECONDITION)
    if os.WIFSIGNALED(init_status):
        how = f"killed by {signal_name(os.WTERMSIG(init_status))}"
    else:
        how = f"exited with code {os.waitstatus_to_exitcode(init_status)}"
    return StartFailure("init", f"init {how} before the command started", ErrorCode.INTERNAL)

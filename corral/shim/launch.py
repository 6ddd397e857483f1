"""How a shim process begins: cold, or warm and waiting for its claim.

The spawner forks the shim and calls `run_shim`. A cold shim (a Start)
builds its sandbox and starts the job at once. A warm one (a Prepare)
builds the sandbox ahead of the next start, at a low priority and with
the spawner's death as its own, then waits on its claim socket: the
spawner hands it the job directory and report descriptor, or closes the
socket (nobody will claim it) and the sandbox goes. Either way `Shim`
(corral.shim.shim) then owns the job to its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import NoReturn

from corral import ipc, ipc_fds
from corral.errors import ErrorCode
from corral.job import SpecError
from corral.shim import libc, proctitle
from corral.shim.sandbox import Sandbox, StartFailure
from corral.shim.shim import Shim

# A warm shim builds its sandbox this much nicer than the spawner: CFS then
# gives it about a tenth of a CPU that the urgent work wants, and all of one
# that is idle.
WARM_NICENESS = 10
MAX_NICE = 19


def log_stderr_to(job_dir: Path) -> None:
    """A shim's own crash (a bug) leaves its traceback beside the job."""
    log = os.open(
        job_dir / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    os.dup2(log, 2)
    os.close(log)


def run_shim(
    request: ipc.Prepare | ipc.Start,
    report_fd: int | None,
    claim: socket.socket | None,
    spawner_pid: int | None = None,
) -> NoReturn:
    """Body of the shim process. Never returns.

    Cold (a Start, its `report_fd`, no `claim`): build the sandbox and start
    the job at once. Warm (a Prepare, `claim`): build the sandbox for the
    job id, then wait for the spawner (`spawner_pid`) to hand over the job
    directory and report descriptor; EOF instead means nobody will, and the
    sandbox goes. A warm shim dies with the spawner until it is claimed.
    """
    # `ps` on the host shows which job's shim this is, not the spawner's command line.
    proctitle.set_title(ipc.SHIM_COMM, request.id)
    inherited = [report_fd] if report_fd is not None else []
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    if claim is not None:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spawner_pid:
            os._exit(0)  # the spawner died before the death signal was set
        inherited.append(claim.fileno())
        # Built ahead for the next start, so behind everything that is
        # urgent now: the start that just took the last sandbox, its job,
        # and its end, which the caller is waiting for. Put back on claim.
        os.setpriority(os.PRIO_PROCESS, 0, min(priority + WARM_NICENESS, MAX_NICE))
    sandbox = Sandbox(request, inherited)
    if claim is not None:
        job_dir, report_fd = _wait_for_claim(claim, sandbox)
        libc.prctl(libc.PR_SET_PDEATHSIG, 0)  # the job outlives the spawner
        _restore_priority(priority, sandbox)
        log_stderr_to(job_dir)
    elif isinstance(request, ipc.Start):
        job_dir = Path(request.job_dir)
    else:
        raise ValueError("a cold shim needs a Start")
    assert report_fd is not None
    try:
        shim = Shim(sandbox, job_dir, request, report_fd)
    except (OSError, ValueError, TypeError, KeyError, SpecError) as exc:
        message = f"cannot read the job's spec: {exc}"
        report = ipc.StartReport.failed(ErrorCode.INTERNAL, message, "spec")
        with contextlib.suppress(OSError):
            os.write(report_fd, report.encode())
        sandbox.discard()
    try:
        shim.start()
    except StartFailure as failure:
        shim._end_failed(failure)
    except Exception as exc:
        shim._end_failed(StartFailure("shim", f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL))
    shim.run()


def _restore_priority(priority: int, sandbox: Sandbox) -> None:
    """Give the claimed shim and its init (which inherited the warm
    niceness) back the spawner's scheduling priority, before the job runs."""
    for pid in (0, sandbox.init_pid):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):  # init died: the start says why
                os.setpriority(os.PRIO_PROCESS, pid, priority)


def _wait_for_claim(claim: socket.socket, sandbox: Sandbox) -> tuple[Path, int]:
    """The job directory and report descriptor the spawner hands over; if
    none comes (EOF: nobody will claim this sandbox), discard it and exit."""
    try:
        received = ipc_fds.receive_message(claim, (ipc.Claim,))
    except (OSError, ipc.IPCError):
        received = None
    claim.close()
    if received is None or len(received[1]) != 1:
        # Told to go: finish going even if the spawner dies meanwhile (its
        # death signal would leave the cgroup behind, and nobody records it
        # any more).
        libc.prctl(libc.PR_SET_PDEATHSIG, 0)
        if received is not None:
            ipc_fds.close_all(received[1])
        sandbox.discard()
    message, fds = received
    return Path(message.job_dir), fds[0]

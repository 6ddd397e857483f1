"""The OOM score a job runs with, and whether the job can lower it.

init writes COMMAND_OOM_SCORE_ADJ for the command (the process the OOM
killer should pick, never init). Written with CAP_SYS_RESOURCE, the kernel
also makes it the floor (oom_score_adj_min) for the process and its
children; without the capability (hosts that take it from root: some
container and VM sandboxes) the job may lower its own. corrald says which
at start and in `info`, from here.
"""

from __future__ import annotations

from corral.shim import libc

COMMAND_OOM_SCORE_ADJ = b"1000"


def oom_score_pinned() -> bool:
    """Whether jobs' OOM score is a floor they cannot lower: init writes it
    with corrald's capabilities, which hold CAP_SYS_RESOURCE."""
    return libc.has_capability(libc.CAP_SYS_RESOURCE)


__all__ = ["COMMAND_OOM_SCORE_ADJ", "oom_score_pinned"]

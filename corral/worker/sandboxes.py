"""Records of the sandboxes a manager builds ahead of its starts.

A warm sandbox is a cgroup named by a job id that has no job directory
yet. Without a record, a cgroup like that under the manager's parent could
be anyone's (another corrald's job, a sandbox of another manager), so the
manager writes `STATE/sandboxes/<id>` *before* it asks for the sandbox,
drops it once the id is a job (its job directory holds it from then on)
or the sandbox is gone, and at start-up removes only recorded sandboxes.

A record has to outlive corrald, not the machine: a cgroup does not
survive a reboot, so a record lost with the page cache loses nothing. It
is a file holding the name of the slice the sandbox is built in (empty
for none, as records from before slices are), written without fsync.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from pathlib import Path

from corral.directories import make_directories
from corral.job import is_job_id
from corral.shim.cgroup import CgroupError, Flavour, open_cgroup, orphans

log = logging.getLogger(__name__)

SANDBOXES_DIR = "sandboxes"


class SandboxRecords:
    """The sandbox records of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / SANDBOXES_DIR
        self.jobs_dir = state_dir / "jobs"

    def record(self, job_id: str, slice: str = "") -> None:
        """Record that a sandbox is about to be built for `job_id`, in `slice`.

        Raises OSError if the record cannot be written: then the sandbox
        must not be built.
        """
        make_directories(self.directory, 0o700)
        fd = os.open(self.directory / job_id, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, slice.encode())
        finally:
            os.close(fd)

    def slice_of(self, job_id: str) -> str:
        """The slice the sandbox of `job_id` was recorded in ("" if none or unreadable)."""
        try:
            return (self.directory / job_id).read_text()
        except (OSError, UnicodeDecodeError):
            return ""

    def drop(self, job_id: str) -> None:
        """Forget the sandbox of `job_id` (a job now, or gone); fine if unrecorded."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / job_id).unlink()

    def recorded(self) -> list[str]:
        """The job ids with a recorded sandbox, in name order."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_job_id(name))

    def sweep(
        self, flavour: Flavour, root: Path, parent: str, *, building: Collection[str] = ()
    ) -> None:
        """Remove the cgroups of the recorded sandboxes that never became jobs
        (their spawner died: they are dead or dying) and drop their records.

        Blocks (a cgroup's removal waits for its processes to die): run it
        in a thread. Nothing else under `parent` is touched: a cgroup with
        neither a record nor a job directory is not provably ours (another
        manager's job, say); those, but for sandboxes `building`, are named
        in a warning.
        """
        for name in self.recorded():
            if not (self.jobs_dir / name).exists():
                try:
                    open_cgroup(flavour, name, root, parent, self.slice_of(name)).remove()
                except CgroupError as exc:
                    log.warning("cannot remove the cgroup of an unused sandbox %s: %s", name, exc)
                    continue
            self.drop(name)
        strangers = [
            f"{slice}/{name}" if slice else name
            for slice, name in orphans(flavour, root, parent)
            if not (self.jobs_dir / name).exists() and name not in building
        ]
        if strangers:
            log.warning(
                "cgroup parent %s holds %s this corrald did not make, left alone: %s",
                parent,
                "1 cgroup" if len(strangers) == 1 else f"{len(strangers)} cgroups",
                ", ".join(strangers[:10]) + (", ..." if len(strangers) > 10 else ""),
            )


__all__ = ["SANDBOXES_DIR", "SandboxRecords"]

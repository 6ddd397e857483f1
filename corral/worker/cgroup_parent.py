"""The cgroup parent a state directory's jobs live under, and the claim on it.

Two managers sharing a parent could not tell their cgroups apart, so each
state directory gets a parent of its own by default, and corrald claims
the one it uses for as long as it runs:

- default: the parent recorded in `STATE/cgroup-parent` by an earlier run
  (kept, so a corrald finds its jobs' cgroups again whatever changed
  since); else `corral` for a state directory with unfinished jobs and no
  record (made before parents were recorded, when that was the default);
  else `corral-` and 8 hex digits of the SHA-256 of the state directory's
  resolved path.
- claim: an `flock` on `/run/corral/cgroup-<parent>.lock`, held while the
  process lives (the kernel lets go however it ends) and holding its pid.
  A second claim on the same parent is refused, naming that pid. A clean
  exit removes the file; one left by a crash is taken over as it is.

The claim is an agreement between corralds on one host (one /run): it
keeps a second corrald out, it does not make the cgroups private.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from corral.directories import make_directories
from corral.pidlock import LockHeld, take_lock
from corral.shim.cgroup import SLICE_PREFIX, CgroupError, Flavour, check_component, open_cgroup
from corral.store import read_status, write_atomically

PARENT_FILE = "cgroup-parent"
# What every corrald used before parents were derived and recorded.
LEGACY_PARENT = "corral"
RUN_DIR = Path("/run/corral")
# 32 bits of the path: no two of a host's few state directories collide.
HASH_DIGITS = 8


class ParentError(Exception):
    """The parent cannot be chosen or claimed; the message says why, in one line."""


def derived_parent(state_dir: Path) -> str:
    """`corral-` and a short hash of the state directory's resolved path."""
    digest = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()
    return f"corral-{digest[:HASH_DIGITS]}"


def recorded_parent(state_dir: Path) -> str | None:
    """The parent an earlier run recorded; None if none did.

    Raises ParentError if the record cannot be read or names no parent.
    """
    path = state_dir / PARENT_FILE
    try:
        parent = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParentError(f"cannot read the cgroup parent recorded in {path}: {exc}") from None
    try:
        check_component("parent", parent)
    except CgroupError as exc:
        raise ParentError(f"{path}: {exc}; remove it, or give --cgroup-parent") from None
    return parent


def _has_unfinished_jobs(state_dir: Path) -> bool:
    try:
        directories = list((state_dir / "jobs").iterdir())
    except FileNotFoundError:
        return False
    for directory in directories:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            status = read_status(directory)
            if status is None or not status.state.finished:
                return True
    return False


def default_parent(state_dir: Path) -> str:
    """The parent for a state directory given none (see the module's docstring).

    Raises ParentError if a recorded parent cannot be read.
    """
    recorded = recorded_parent(state_dir)
    if recorded is not None:
        return recorded
    if _has_unfinished_jobs(state_dir):
        return LEGACY_PARENT
    return derived_parent(state_dir)


def record_parent(state_dir: Path, parent: str) -> str | None:
    """Record the parent in use, for the next run's default; return the one
    recorded before, if any.

    Not flushed to disk: cgroups do not outlive a reboot, and neither need
    the records of where they were. Raises OSError if it cannot be written.
    """
    previous = None
    with contextlib.suppress(ParentError):
        previous = recorded_parent(state_dir)
    if previous != parent:
        write_atomically(state_dir / PARENT_FILE, f"{parent}\n".encode(), durable=False)
    return previous


class ParentClaim:
    """This process's claim on a cgroup parent; `close()` (or exit) lets go."""

    def __init__(self, parent: str, path: Path, fd: int) -> None:
        self.parent = parent
        self.path = path
        self._fd: int | None = fd

    def close(self) -> None:
        """Let go, removing the lock file while still holding it (a claimant
        that opened it meanwhile sees it gone, and tries again)."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def claim_parent(parent: str, run_dir: Path = RUN_DIR) -> ParentClaim:
    """Claim `parent` for this process, or raise ParentError naming the
    corrald that has it and how to choose another."""
    path = run_dir / f"cgroup-{parent}.lock"
    while True:
        try:
            make_directories(run_dir, 0o755)
            fd = take_lock(path)
        except OSError as exc:
            raise ParentError(
                f"cannot claim cgroup parent {parent}: cannot open {path}: {exc.strerror}"
            ) from None
        except LockHeld as held:
            raise ParentError(
                f"cgroup parent {parent} is in use by another corrald (pid {held.holder}); "
                "give this one its own with --cgroup-parent NAME"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return ParentClaim(parent, path, fd)
        os.close(fd)  # its holder removed it as it let go: a new one is there, or will be


def remove_if_empty(flavour: Flavour, parent: str, root: Path) -> None:
    """Remove the parent's directory, and its owners' slices, in every
    hierarchy where they hold no job and no process (the kernel refuses
    otherwise); keep the rest."""
    try:
        paths = open_cgroup(flavour, "probe", root, parent).paths()
    except CgroupError:
        return
    for path in paths:
        with contextlib.suppress(OSError):
            for child in path.parent.iterdir():
                if child.name.startswith(SLICE_PREFIX) and child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
        with contextlib.suppress(OSError):
            path.parent.rmdir()


__all__ = [
    "LEGACY_PARENT",
    "PARENT_FILE",
    "ParentClaim",
    "ParentError",
    "claim_parent",
    "default_parent",
    "derived_parent",
    "record_parent",
    "recorded_parent",
    "remove_if_empty",
]

"""Directories with the mode asked for, whatever the umask.

`Path.mkdir(mode, parents=True)` gives only the last directory `mode`;
the parents it makes get 0777 less the umask, so under umask 0 they are
writable by everyone (a state directory's parent, the PKI's). Here every
directory made gets exactly `mode`; existing ones are left as they are.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_directories(path: Path, mode: int) -> None:
    """Make `path` and its missing parents, each with exactly `mode`.

    Raises OSError as mkdir does (NotADirectoryError if `path` is a file)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(directory, mode)  # the umask took bits off
    if not path.is_dir():
        raise NotADirectoryError(20, "not a directory", str(path))


__all__ = ["make_directories"]

"""The shell's line editing: readline's history (0600, as bash's) and Tab
completion of command names and job ids."""

from __future__ import annotations

import os
import readline
import sys
from collections.abc import Callable
from pathlib import Path

HISTORY_ENV = "CORRAL_HISTORY"
HISTORY_FILE = "~/.corral_history"
HISTORY_LENGTH = 1000  # enough to search back through; small enough to load at once


class Completer:
    """Tab: command names for the first word, our jobs' short ids after it."""

    def __init__(self, job_ids: Callable[[], list[str]], names: list[str]) -> None:
        self._job_ids = job_ids
        self._names = sorted(names)
        self._matches: list[str] = []

    def complete(self, text: str, state: int) -> str | None:
        if state == 0:
            self._matches = self._candidates(text)
        return self._matches[state] if state < len(self._matches) else None

    def _candidates(self, text: str) -> list[str]:
        before = readline.get_line_buffer()[: readline.get_begidx()].split()
        if before in ([], ["help"]):
            words = self._names
        elif text.startswith("-"):
            return []
        else:
            words = self._job_ids()
        return [word + " " for word in words if word.startswith(text)]


def history_path() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or HISTORY_FILE).expanduser()


def set_up(history: Path, completer: Completer) -> None:
    readline.set_history_length(HISTORY_LENGTH)
    readline.set_completer(completer.complete)
    readline.set_completer_delims(" \t\n")
    readline.parse_and_bind("tab: complete")
    try:
        readline.read_history_file(history)
    except FileNotFoundError:
        pass
    except OSError as exc:
        sys.stderr.write(f"corral: cannot read history {history}: {exc.strerror}\n")


def save_history(path: Path) -> None:
    try:
        # Lines may carry secrets (--env TOKEN=...): the file is ours alone, as bash's.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        readline.write_history_file(path)
    except OSError as exc:
        sys.stderr.write(f"corral: cannot write history {path}: {exc.strerror}\n")

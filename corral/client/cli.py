"""`corral`: the command-line client's entry point.

Parses the command line (`corral.client.parser`), connects when the command
talks to corrald, runs the command (`corral.client.commands`) and turns
every error into one line on stderr and the exit status its class names
(see `corral.client.errors` and the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from corral.client.client import connect
from corral.client.commands import EXIT_PIPE
from corral.client.errors import EXIT_INTERRUPTED, CorralError, error_code
from corral.client.follow import OutputClosed
from corral.client.parser import build_parser
from corral.client.settings import connect_args, warn_if_key_exposed


async def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    try:
        if not getattr(args, "connects", True):
            return int(await args.run(args, out))
        async with connect(**connect_args(args)) as client:
            return int(await args.run(client, args, out))
    except* (CorralError, OutputClosed) as group:
        # A command's tasks (run's follow and its Ctrl+C watcher) fail as a
        # group; the person wants the one line of the first failure.
        raise _first(group) from None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _silence_stdout() -> None:
    """Point our stdout at /dev/null: its reader has gone, and Python's
    flush at exit would otherwise complain of the broken pipe."""
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command line; return the exit status. Errors go to stderr."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if getattr(args, "connects", True):
            warn_if_key_exposed(connect_args(args)["identity"])
        if getattr(args, "interactive", False):
            # The shell owns the terminal: readline in this thread, trio in another.
            from corral.client.shell import run_shell  # noqa: PLC0415

            return run_shell(args, connect_args(args))
        status: int = trio.run(_run_command, args, out)
    except OutputClosed:
        # `corral logs ID | head -1`: as a local command in a pipeline, a quiet end.
        _silence_stdout()
        return EXIT_PIPE
    except CorralError as exc:
        if getattr(args, "json", False):
            error = {"code": error_code(exc), "message": str(exc)}
            details = getattr(exc, "details", None)
            if details:
                error["details"] = details
            json.dump({"error": error}, out, indent=2, sort_keys=True)
            out.write("\n")
        else:
            sys.stderr.write(f"corral: error: {exc}\n")
        return int(exc.exit_status)
    except KeyboardInterrupt:
        sys.stderr.write("corral: interrupted\n")
        return EXIT_INTERRUPTED
    return status


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()

"""`corral`: the command-line client's entry point.

Parses the command line (`corral.client.parser`), connects when the command
talks to corrald, runs the command and turns every error into one line on
stderr and the exit status its class names (see `corral.client.errors` and
the README).

A one-shot command that `corral.client.oneshot` runs (`info`, `ps`,
`status`, a plain `run`) runs there, on a blocking connection: it never
imports trio, which would cost it more than all its work. The rest run in
trio (`corral.client.commands`), imported only then; the shell too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from corral.client import oneshot
from corral.client.errors import EXIT_INTERRUPTED, EXIT_PIPE, CorralError, error_code
from corral.client.output import OutputClosed
from corral.client.parser import build_parser
from corral.client.reports import print_json
from corral.client.settings import connect_args, warn_if_key_exposed


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
        if oneshot.handles(args):
            status = oneshot.run(args, out)
        else:
            from corral.client.commands import run_command  # noqa: PLC0415 - trio: see above

            status = run_command(args, out)
        out.flush()  # a reader gone before our last bytes is said here, not at exit
        return status
    except (OutputClosed, BrokenPipeError):
        # `corral logs ID | head -1`, `corral ps | head -1`: as a local
        # command in a pipeline, a quiet end.
        _silence_stdout()
        return EXIT_PIPE
    except CorralError as exc:
        if getattr(args, "json", False):
            error = {"code": error_code(exc), "message": str(exc)}
            details = getattr(exc, "details", None)
            if details:
                error["details"] = details
            print_json({"error": error}, out)
        else:
            sys.stderr.write(f"corral: error: {exc}\n")
        return int(exc.exit_status)
    except KeyboardInterrupt:
        sys.stderr.write("corral: interrupted\n")
        return EXIT_INTERRUPTED


def main() -> None:
    status = run()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # its reader has gone: nobody to tell
            stream.flush()
    # Nothing is left to do (output flushed, connections closed): leave
    # without tearing the interpreter down, which frees every module and
    # object one by one and costs a one-shot command ~20 ms.
    os._exit(status)


if __name__ == "__main__":
    main()

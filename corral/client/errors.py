"""What can go wrong for a corral client, each with the exit status the CLI uses.

The statuses follow sysexits(3), so scripts can tell "could not reach
corrald" from "corrald said no" from "the job failed".
"""

from __future__ import annotations

import signal
from typing import Any

from corral.protocol import ErrorCode

EXIT_FAILURE = 1  # corrald answered with an error (not found, invalid argument, ...)
EXIT_USAGE = 2  # the command line is wrong (argparse's own status)
EXIT_UNAVAILABLE = 69  # corrald cannot be reached, or the connection was lost
EXIT_PROTOCOL = 76  # TLS failed, the server is not who it should be, or versions differ
EXIT_NOPERM = 77  # corrald refused our certificate or the operation
EXIT_CONFIG = 78  # a local setting is wrong: address, identity directory
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_PIPE = 128 + signal.SIGPIPE  # a reader of our output that went away, as a shell reports it


class CorralError(Exception):
    """Base of every error the client raises; `str()` is one line for a person.

    `code` is the snake_case name a program acts on (`--json` prints it):
    corrald's own code for a `ServerError`, the class's for the rest.
    """

    exit_status = EXIT_FAILURE
    code: str = "internal"


class UsageError(CorralError):
    """The command line is wrong in a way argparse cannot see."""

    exit_status = EXIT_USAGE
    code = "invalid_usage"


class ConfigError(CorralError):
    """The address or the identity directory is unusable."""

    exit_status = EXIT_CONFIG
    code = "invalid_config"


class ConnectError(CorralError):
    """corrald could not be reached, or the connection to it was lost."""

    exit_status = EXIT_UNAVAILABLE
    code = "unavailable"


class TLSError(CorralError):
    """The TLS handshake failed, the server could not be verified, or the
    server speaks another protocol version."""

    exit_status = EXIT_PROTOCOL
    code = "tls_failed"


class AuthenticationError(CorralError):
    """corrald did not accept our client certificate."""

    exit_status = EXIT_NOPERM
    code = "unauthenticated"


class InputClosed(CorralError):
    """The job takes no more input: it closed its stdin, or ended (a writer
    stops quietly then, as `yes | head` does)."""

    code = "failed_precondition"


class ServerError(CorralError):
    """corrald answered a request (or the whole connection) with an error."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.details = details or {}

    @property
    def exit_status(self) -> int:  # type: ignore[override]
        if self.code is ErrorCode.PERMISSION_DENIED:
            return EXIT_NOPERM
        if self.code is ErrorCode.UNAVAILABLE:
            return EXIT_UNAVAILABLE
        return EXIT_FAILURE


def error_code(exc: CorralError) -> str:
    """The snake_case code of any client error (see `CorralError.code`)."""
    return str(exc.code)

"""The protocol's error types, and the error codes carried on the wire
(defined in `corral.errors`, so that corral's processes share them without
importing the protocol)."""

from __future__ import annotations

from corral.errors import ErrorCode

__all__ = ["ErrorCode", "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "shorten"]


class ProtocolError(Exception):
    """Base of every error the protocol layer raises. `code` is what to tell
    the peer, if anything.

    A RemoteProtocolError (the peer's bytes broke the protocol) leaves the
    connection broken: every later call raises again. A LocalProtocolError
    (we tried to send what may not be sent, e.g. a frame too large) refuses
    that one send and leaves the connection as it was.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or messages that break the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


def shorten(text: str, limit: int = 64) -> str:
    """repr() of a peer-chosen string, cut to `limit` characters, for messages.

    Peers choose op names and tags; echoing them whole could make an error
    message larger than a frame.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"

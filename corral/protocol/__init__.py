"""The corral wire protocol, sans-IO: bytes in, events out, `send(message) -> bytes`.

Nothing here imports trio, ssl or socket; corrald's sessions and the
client drive the same `Connection`, each with its own role. (corral's own
processes talk to each other with `corral.ipc`, not this.)
"""

from __future__ import annotations

from corral.protocol.codec import MAX_FRAME_SIZE
from corral.protocol.connection import (
    NEED_DATA,
    PEER_CLOSED,
    Connection,
    Role,
    Signal,
    State,
)
from corral.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from corral.protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Credit,
    Data,
    End,
    Eof,
    Error,
    Hello,
    Message,
    Request,
    Result,
    Welcome,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "NEED_DATA",
    "PEER_CLOSED",
    "PROTOCOL_VERSION",
    "Cancel",
    "Connection",
    "Credit",
    "Data",
    "End",
    "Eof",
    "Error",
    "ErrorCode",
    "Hello",
    "LocalProtocolError",
    "Message",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "Result",
    "Role",
    "Signal",
    "State",
    "Welcome",
]

"""The error codes of the wire, and the one error an operation fails with:
a code from the wire's vocabulary, a sentence a person can act on, and
details a program can act on.

Raised wherever the failure is known (a spec's validation, the policy, the
job manager) and turned into the wire's `Error` once, by the session that
answers the request: nothing in between re-wraps it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class ErrorCode(enum.StrEnum):
    """Stable error codes, in gRPC's vocabulary, that a peer may act on."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    UNIMPLEMENTED = "unimplemented"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class OperationError(Exception):
    """An operation failed in a way its caller should hear about.

    `details` is a map for programs, sent on the wire beside the message:
    `{"job": ID}` for a start that failed after its job was recorded,
    `{"field": "limits.cpu"}` for a spec that names what is wrong, ...
    """

    def __init__(
        self, code: ErrorCode, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details: dict[str, Any] = dict(details or {})

    @property
    def job_id(self) -> str | None:
        """The job this failure recorded, if it recorded one."""
        job = self.details.get("job")
        return job if isinstance(job, str) else None


__all__ = ["ErrorCode", "OperationError"]

"""Who a peer is, and whose a job is: a name and a role.

A verified client certificate names an identity (CN and OU, read by
`corral.tls`); the same pair owns the jobs it starts. A user's certificate
whose CN is `admin` is not the admin: it owns none of the admin's jobs,
counts against none of the admin's caps and shares no slice with them.
No dependencies, so that job records and the CLI can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN, USER = "admin", "user"
ROLES: tuple[str, ...] = (ADMIN, USER)


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """A peer's certificate's CN and OU; a job's owner."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"


__all__ = ["ADMIN", "ROLES", "USER", "Identity"]

"""Who a job runs as: its host ids, and who it is in its user namespace.

The spec says a user (see corral.job): `dynamic`, a uid of corrald's pool
(recorded in the spec) that is the job's alone; root, uid 0 in the job's
user namespace mapped to such a uid; a host user an admin named, mapped to
itself; or, with host_root, root on the host and no user namespace.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any

from corral.errors import ErrorCode
from corral.job import ROOT_USERS, ResolvedSpec
from corral.shim.sandbox import StartFailure
from corral.shim.userns import Account


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who the job is: host ids, and inside its user namespace (if it has one)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    userns: bool = True
    inside_uid: int = 0
    inside_gid: int = 0
    account: Account | None = None

    def fields(self) -> dict[str, Any]:
        """What ipc.JobConfig says of them."""
        account = self.account or Account(b"", b"")
        return {
            "uid": self.uid,
            "gid": self.gid,
            "groups": self.groups,
            "userns": self.userns,
            "inside_uid": self.inside_uid,
            "inside_gid": self.inside_gid,
            "passwd": account.passwd,
            "group": account.group,
        }


def credentials(spec: ResolvedSpec) -> Credentials:
    """Who the job of `spec` runs as; StartFailure (invalid_argument) for a
    user nobody has, or one who is root on the host by another name."""
    if spec.host_root:
        return Credentials(0, 0, tuple(os.getgrouplist("root", 0)), userns=False)
    if spec.pooled:
        if spec.uid is None:
            raise StartFailure("user", "corrald gave the job no uid", ErrorCode.INTERNAL)
        inside = 0 if spec.user in ROOT_USERS else spec.uid
        return Credentials(
            spec.uid, spec.uid, (), inside_uid=inside, inside_gid=inside,
            account=Account.of(inside, inside),
        )  # fmt: skip
    user = spec.user
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            message = f"unknown user {user!r}"
            raise StartFailure("user", message, ErrorCode.INVALID_ARGUMENT) from None
        uid = int(user)  # a uid without a passwd entry is still a uid
        return Credentials(uid, uid, (), inside_uid=uid, inside_gid=uid)
    if entry.pw_uid == 0:
        message = (
            f"user {user!r} is root on the host: ask for user root (root in the job's "
            "user namespace) or for host root"
        )
        raise StartFailure("user", message, ErrorCode.INVALID_ARGUMENT)
    account = Account.of(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)
    return Credentials(
        entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        inside_uid=entry.pw_uid, inside_gid=entry.pw_gid, account=account,
    )  # fmt: skip


__all__ = ["Credentials", "credentials"]

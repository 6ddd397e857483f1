"""A job's user namespace: who the job is inside it, and the steps into it.

Every job but one an admin runs as root on the host lives in a user
namespace of its own with one uid and one gid mapped: the job's host uid
to itself, or, for a root job, uid 0 inside to its host uid. Everything
else on the host shows as the overflow id (nobody) inside, and the job's
root is root over its namespace alone: it may chown what it owns, bind
port 80 and ping in its network namespace, and is its unprivileged host
uid to everything outside.

The steps, in the one order that works (docs/DESIGN.md, "User namespaces"):

1. init builds the jail as host root, in namespaces the host's user
   namespace owns, so the job's root can change none of it: its mounts
   are locked, its network and hostname are not its to change.
2. init takes the job's host gid and uid (`become_host_user`), keeping its
   capabilities for one more step, and creates the user namespace, which
   its host uid then owns: per-uid kernel counts (inotify instances,
   user namespaces, message queue bytes) are charged to the job's uid,
   not to root's.
3. The shim, host root outside, writes the maps (`write_maps`): uid_map,
   then `deny` to setgroups (a job may not drop the supplementary groups
   it was given, which could be negative permissions), then gid_map.
4. init becomes the job's uid inside and keeps the capabilities the job
   should have (`keep_capabilities`): a reduced set for root, as Docker
   gives a container, none for anyone else.

`Account` is the job's /etc/passwd and /etc/group: root, nobody and the
job's own user, so programs that look their user up (id, whoami, getpass,
ssh, a shell's prompt) find one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from corral.shim import libc

# Docker's default capabilities for a container's root (moby's
# oci/caps/defaults.go): CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID,
# SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD,
# AUDIT_WRITE, SETFCAP. In a user namespace each is over what the
# namespace owns: the job's own files, processes and namespaces.
ROOT_CAPABILITIES = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
ROOT_CAPABILITY_MASK = sum(1 << capability for capability in ROOT_CAPABILITIES)
OVERFLOW_ID = 65534  # what an unmapped id shows as: nobody, nogroup
# The name a job's own uid has inside, and the home every job gets.
JOB_USER = "job"
HOME = "/tmp"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One id inside the job's user namespace and the host id it is."""

    inside: int
    host: int

    def line(self) -> bytes:
        return b"%d %d 1\n" % (self.inside, self.host)


@dataclass(frozen=True, slots=True)
class Account:
    """The job's /etc/passwd and /etc/group, as bytes."""

    passwd: bytes
    group: bytes

    @classmethod
    def of(cls, uid: int, gid: int, name: str = JOB_USER, home: str = HOME) -> Account:
        """root, nobody, and user `name` with `uid` and `gid` (inside ids),
        unless that is root: each program finds its user, and its group."""
        users = [("root", 0, 0, HOME), ("nobody", OVERFLOW_ID, OVERFLOW_ID, "/nonexistent")]
        groups = [("root", 0), ("nogroup", OVERFLOW_ID)]
        if uid not in (0, OVERFLOW_ID):
            users.append((name, uid, gid, home))
        if gid not in (0, OVERFLOW_ID):
            groups.append((name, gid))
        shell = {name: "/bin/sh", "root": "/bin/sh"}
        passwd = "".join(
            f"{user}:x:{u}:{g}:{user}:{directory}:{shell.get(user, '/usr/sbin/nologin')}\n"
            for user, u, g, directory in users
        )
        group = "".join(f"{name}:x:{g}:\n" for name, g in groups)
        return cls(passwd.encode(), group.encode())


def write_maps(pid: int, uid: Mapping, gid: Mapping) -> None:
    """Map `uid` and `gid` in the user namespace of process `pid` (the
    shim's step, as host root outside it); OSError if the kernel refuses."""
    _write(f"/proc/{pid}/uid_map", uid.line())
    _write(f"/proc/{pid}/setgroups", b"deny")
    _write(f"/proc/{pid}/gid_map", gid.line())


def become_host_user(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Take the job's host ids (init's step 2), keeping every capability
    until the user namespace is made, so the namespace is the job's
    uid's (its owner) and made with root's rights (which no sysctl
    restricting unprivileged user namespaces refuses)."""
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    libc.prctl(libc.PR_SET_SECUREBITS, libc.SECBIT_NO_SETUID_FIXUP)
    os.setresuid(uid, uid, uid)
    libc.unshare(libc.CLONE_NEWUSER)
    # Inside now, with every capability over the new namespace alone: no
    # securebits are left for the job (a root job's setuid drops its
    # capabilities, as root's does anywhere).
    libc.prctl(libc.PR_SET_SECUREBITS, 0)


def keep_capabilities(uid: int, gid: int, last_capability: int) -> None:
    """Become `uid` and `gid` inside (mapped by now) with root's reduced set
    for uid 0 and nothing for any other: bounding, effective, permitted
    set; inheritable and ambient empty."""
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    keep = ROOT_CAPABILITY_MASK if uid == 0 else 0
    libc.limit_bounding_set(keep, last_capability)
    libc.set_capabilities(keep)


def last_capability() -> int:
    """The highest capability this kernel knows (read before the jail is up)."""
    with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
        return int(f.read())


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


__all__ = [
    "HOME",
    "JOB_USER",
    "ROOT_CAPABILITIES",
    "Account",
    "Mapping",
    "become_host_user",
    "keep_capabilities",
    "last_capability",
    "write_maps",
]

"""What corrald checks before it serves, and `corrald --check`.

The checks a start makes that change nothing (the PKI's files and dates,
the policy, the uid range against the host's users, the cgroup
hierarchy) live here, so that `--check` runs the very same ones: it
exits 0 naming what it checked, or names what is wrong with the status a
start would have (78 for configuration, 69 for what is unavailable),
without binding, locking or creating anything.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from corral import pki_layout
from corral.identity import ROLES
from corral.shim.cgroup import CgroupError, Flavour, check_host, detect_flavour
from corral.shim.oom import oom_score_pinned
from corral.supervisor import certificates
from corral.supervisor.policy import Policy, PolicyError, load_policy
from corral.tls import TLSConfigError
from corral.worker.uid_pool import UidRange

log = logging.getLogger("corrald")

EXIT_CONFIG = 78  # sysexits EX_CONFIG: flags, state directory or PKI unusable
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: cannot listen


class StartupError(Exception):
    """corrald cannot start; `str()` says why, `status` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.status = status


def policy_from(args: argparse.Namespace) -> Policy:
    """The policy the flags and the config file (if any) say; StartupError if wrong."""
    try:
        return load_policy(
            args.config,
            default_user=args.default_user,
            defaults=dict(args.defaults),
            caps={role: dict(getattr(args, f"{role}_caps")) for role in ROLES},
            quotas={role: dict(getattr(args, f"{role}_quotas")) for role in ROLES},
            writable={
                role: getattr(args, f"{role}_writable")
                for role in ROLES
                if getattr(args, f"{role}_writable")
            },
        )
    except PolicyError as exc:
        raise StartupError(str(exc)) from None


def check_uid_range(uids: UidRange) -> None:
    """StartupError if the host has a user, group or subordinate range in
    `uids`: a job given such a uid would be that user to the host."""
    collisions = list(uids.collisions())
    if collisions:
        more = f" and {len(collisions) - 1} more" if len(collisions) > 1 else ""
        raise StartupError(
            f"--uid-range {uids} holds {collisions[0]}{more}: jobs must never be a "
            "host user; choose a range that holds none"
        )


def prepare_pki(pki_dir: Path, *, create: bool, server_names: Sequence[str]) -> None:
    if create and not (pki_dir / pki_layout.CA_CERT_FILE).exists():
        # The PKI code (and the cryptography package) only for the first start.
        from corral import pki  # noqa: PLC0415

        try:
            pki.init_pki(pki_dir, server_names)
        except pki.PKIError as exc:
            reason = str(exc).replace(" (use --force)", "")
            raise StartupError(
                f"cannot create a PKI in {pki_dir}: {reason}; it holds part of one: remove it, "
                f"or replace it with `corral certs init {pki_dir} --force`"
            ) from None
        log.info("created a development PKI in %s", pki_dir)
    elif not (pki_dir / pki_layout.CA_CERT_FILE).exists():
        raise StartupError(
            f"no PKI in {pki_dir}: run `corral certs init {pki_dir}`, "
            "or start corrald with --init-pki"
        )


def require_cgroups() -> Flavour:
    """The host's cgroup flavour; StartupError if jobs cannot run on it."""
    flavour = detect_flavour()
    if flavour is Flavour.NONE:
        raise StartupError(
            "no cgroup hierarchy is mounted at /sys/fs/cgroup; corral needs cgroup v1 or v2"
        )
    try:
        check_host(flavour)
    except CgroupError as exc:
        raise StartupError(str(exc)) from None
    return flavour


LOCK_FILE = "corrald.lock"


def check(args: argparse.Namespace) -> list[str]:
    """`corrald --check`: what a start with `args` would check, changing
    nothing; a line for each thing in order, StartupError for the first
    that is not."""
    said: list[str] = []
    state_dir = args.state_dir.absolute()
    if state_dir.exists() and not state_dir.is_dir():
        raise StartupError(f"state directory {state_dir} is not a directory")
    if state_dir.is_dir():
        said.append(f"state directory {state_dir}: {_in_use(state_dir)}")
    elif state_dir.parent.is_dir():
        said.append(f"state directory {state_dir}: created at start")
    else:
        raise StartupError(f"state directory {state_dir}: {state_dir.parent} does not exist")
    pki_dir = (args.pki or state_dir / "pki").absolute()
    if args.init_pki and not (pki_dir / pki_layout.CA_CERT_FILE).exists():
        said.append(f"PKI {pki_dir}: a development one is created at start")
    else:
        prepare_pki(pki_dir, create=False, server_names=())
        try:
            _, certificate = certificates.load(pki_dir)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from None
        ends = certificate.not_after.strftime("%Y-%m-%d %H:%M UTC")
        said.append(f"PKI {pki_dir}: server certificate {certificate.serial:x} until {ends}")
        warning = certificate.warning()
        if warning is not None:
            said.append(f"warning: {warning}")
    policy_from(args)
    said.append(f"policy: {args.config or 'built in'}, with the flags over it")
    check_uid_range(args.uid_range)
    said.append(f"job uids: {args.uid_range}, no host user or group among them")
    flavour = require_cgroups()
    said.append(f"cgroups: {flavour}, every controller jobs need")
    if not oom_score_pinned():
        said.append("warning: no CAP_SYS_RESOURCE: jobs may lower their OOM score")
    return said


def _in_use(state_dir: Path) -> str:
    """Whether a corrald holds the state directory (a --check beside a
    running service is normal), learned without writing the lock file."""
    lock = state_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "free"
    except OSError as exc:
        raise StartupError(f"cannot open {lock}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        return f"in use by corrald (pid {holder})"
    finally:
        os.close(fd)
    return "free"

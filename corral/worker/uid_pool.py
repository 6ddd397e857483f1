"""The uids jobs run as: a range corrald owns, one uid per running job.

A job whose user is `dynamic` (the default) or root in its own user
namespace runs as a host uid (and a gid of the same number) taken from
this pool when it is admitted: no two running jobs share one, so nothing
the kernel keys on a uid (keyrings, RLIMIT_NPROC, inotify instances,
POSIX message queue bytes, file ownership, signals and ptrace) is shared
between them. The uid is recorded in the job's spec, taken again when a
restarted corrald adopts the job, and given back when the job's end is
recorded (its PID namespace, and every process that had the uid, is gone
by then).

Uids are handed out round the range rather than lowest first, so a uid
just freed is the last to be given again: files a job left in a writable
path keep its number, and the next job with that number could change
them (SECURITY.md says so).

The default range lies where no host allocates users: above the ranges
distributions give people (1000-60000), systemd's DynamicUser= (61184-
65519), subordinate ids for rootless containers (shadow's defaults go
from 100000 to 600100000) and systemd's container ranges (524288-
1879048191), and below 2^31, which some tools still treat as negative.
corrald refuses to start on a range that overlaps a user, group or
subordinate range the host lists.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import OperationError
from corral.protocol.errors import ErrorCode

DEFAULT_START = 0x70000000  # 1879048192
DEFAULT_COUNT = 65536
# Ids the kernel and every host reserve: the overflow and invalid ids.
LAST_ID = 0xFFFFFFFE
SUBORDINATE_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


class UidRangeError(ValueError):
    """A uid range that is malformed or collides with the host's ids."""


@dataclass(frozen=True, slots=True)
class UidRange:
    start: int = DEFAULT_START
    count: int = DEFAULT_COUNT

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """`START:COUNT`, as --uid-range takes it; UidRangeError if not."""
        start, colon, count = text.partition(":")
        if not (colon and start.isdigit() and count.isdigit()):
            raise UidRangeError(f"must be START:COUNT (e.g. {DEFAULT_START}:{DEFAULT_COUNT})")
        return cls(int(start), int(count)).check()

    def check(self) -> UidRange:
        """Self if within the ids a job may have; UidRangeError if not."""
        if self.count < 1:
            raise UidRangeError("must hold at least one uid")
        if self.start < 1 or self.end - 1 > LAST_ID:
            raise UidRangeError(f"must lie within 1-{LAST_ID} (0 is root), not {self}")
        if self.start <= 65534 < self.end:
            raise UidRangeError(f"must not hold 65534, the overflow id (nobody), as {self} does")
        return self

    @property
    def end(self) -> int:
        return self.start + self.count

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.start <= uid < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.count}"

    def collisions(self) -> Iterator[str]:
        """What the host lists inside the range: users, groups, and
        subordinate id ranges (/etc/subuid, /etc/subgid)."""
        for user in pwd.getpwall():
            if user.pw_uid in self:
                yield f"user {user.pw_name} (uid {user.pw_uid})"
        for group in grp.getgrall():
            if group.gr_gid in self:
                yield f"group {group.gr_name} (gid {group.gr_gid})"
        for path in SUBORDINATE_FILES:
            for owner, first, count in _subordinate_ranges(path):
                if first < self.end and self.start < first + count:
                    yield f"{owner}'s ids {first}:{count} in {path}"


def _subordinate_ranges(path: Path) -> Iterable[tuple[str, int, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        owner, _, rest = line.partition(":")
        first, _, count = rest.partition(":")
        if first.isdigit() and count.isdigit():
            yield owner, int(first), int(count)


class UidPool:
    """The uids of one range, each held by at most one job at a time."""

    def __init__(self, uids: UidRange) -> None:
        self.range = uids
        self._held: set[int] = set()
        self._next = uids.start

    def allocate(self) -> int:
        """A uid no running job has, the one after the last given if free;
        resource_exhausted if every uid of the range is held."""
        if len(self._held) >= self.range.count:
            raise OperationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"every uid of corrald's range ({self.range.count} from {self.range.start}) "
                "is a running job's; wait for one to end, or widen --uid-range",
            )
        uid = self._next
        while uid in self._held:
            uid = self._after(uid)
        self._held.add(uid)
        self._next = self._after(uid)
        return uid

    def hold(self, uid: int) -> bool:
        """Take `uid` for a job found running at a restart; False if it is
        outside the range or held already (then it is not counted)."""
        if uid not in self.range or uid in self._held:
            return False
        self._held.add(uid)
        return True

    def release(self, uid: int | None) -> None:
        """Give `uid` back (None, or one not held: nothing)."""
        if uid is not None:
            self._held.discard(uid)

    @property
    def held(self) -> int:
        return len(self._held)

    def _after(self, uid: int) -> int:
        return uid + 1 if uid + 1 < self.range.end else self.range.start


__all__ = ["DEFAULT_COUNT", "DEFAULT_START", "UidPool", "UidRange", "UidRangeError"]

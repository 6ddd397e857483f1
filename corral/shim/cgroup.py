"""Which cgroup hierarchy this host runs.

corral supports the unified v2 tree and the v1 (or hybrid) layout with one
hierarchy per controller. The answer comes from the mount table, so it can
be pointed at a recorded mountinfo in tests.
"""

from __future__ import annotations

import enum
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP_ROOT = "/sys/fs/cgroup"


class Flavour(enum.StrEnum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


def detect_flavour(mountinfo: Path = MOUNTINFO, root: str = CGROUP_ROOT) -> Flavour:
    """Return V2 if a cgroup2 tree is mounted at `root`, V1 if any v1 hierarchy is
    mounted (a hybrid host's `unified` v2 mount holds no controllers), else NONE.

    Raises OSError if the mount table cannot be read.
    """
    v1 = False
    for line in mountinfo.read_text().splitlines():
        # "36 35 98:0 / /mnt rw,noatime master:1 - ext3 /dev/root rw": the
        # optional fields end at " - ", after which comes the fs type.
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if not sep or len(fields) < 5 or not after:
            continue
        mount_point, fstype = fields[4], after.split()[0]
        if fstype == "cgroup2" and mount_point == root:
            return Flavour.V2
        v1 = v1 or fstype == "cgroup"
    return Flavour.V1 if v1 else Flavour.NONE

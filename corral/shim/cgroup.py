"""A job's cgroup: create it, limit it, join it, account it, kill it, remove it.

corral supports the unified v2 tree and the v1 (or hybrid) layout with one
hierarchy per controller, behind one small interface: `open_cgroup()`
returns a `Cgroup` whose two subclasses know their files. Jobs live under a
parent of their own, each in its owner's slice
(`<root>[/<controller>]/<parent>/<slice>/<job id>`, as systemd gives each
user a slice), so corral never touches cgroups it did not make, and an
owner's jobs share the slice's limits (`limit_slice`). Jobs started before
slices existed have none (`<parent>/<job id>`).

Plain synchronous code with no imports beyond the standard library and
`corral.job`: the shim (which never imports trio) uses it, and corrald calls
it from a thread when it cleans up after a lost shim. Every failure is a
`CgroupError` whose message names the file and what the kernel said.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from corral.identity import Identity
from corral.job import Limits, Usage

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP_ROOT = "/sys/fs/cgroup"
ROOT = Path(CGROUP_ROOT)
SYSFS = Path("/sys")
PARENT = "corral"
SLICE_PREFIX = "owner-"  # an owner's slice, beside jobs from before slices

# The v1 hierarchies a job joins, each mounted at ROOT/<name>. No freezer:
# kill() does without it (see there), and each hierarchy costs a join.
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")
V1_NO_LIMIT = 1 << 62  # memory.limit_in_bytes at or above it: no limit
CPU_PERIOD_US = 100_000  # the kernel's default CFS period
MIN_CPU_QUOTA_US = 1_000  # the kernel rejects a smaller quota (EINVAL)
# kill() and remove(): how long the kernel may take to empty a cgroup of
# killed tasks and let it be removed.
KILL_TIMEOUT = 10.0
# kill(): pidfds held at once, well under the usual 1024-descriptor limit.
KILL_BATCH = 256


class Flavour(enum.StrEnum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


class CgroupError(Exception):
    """A cgroup file could not be read or written; the message names it."""


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


# -- files ---------------------------------------------------------------------------


def _read(path: Path, missing: str | None = None) -> str:
    """The file's text; `missing` (if given) when it does not exist."""
    try:
        return path.read_text()
    except FileNotFoundError:
        if missing is None:
            raise CgroupError(f"cannot read {path}: No such file or directory") from None
        return missing
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, value: str | int) -> None:
    try:
        # One write(2) per value: cgroup files act on each write.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot write {value} to {path}: {exc.strerror}") from None


def _write_if_changed(path: Path, value: str | int) -> None:
    if _read(path).strip() != str(value):
        _write(path, value)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror}") from None


def _keyed(text: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, memory.oom_control) as a map."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _subtree(path: Path) -> list[Path]:
    """`path` and the cgroups below it (a root job may make some), deepest first."""
    return [Path(directory) for directory, _, _ in os.walk(path, topdown=False)]


def _rmdir(path: Path, deadline: float) -> None:
    """Remove an empty cgroup; a missing one is fine."""
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove {path}: {exc.strerror}") from None
        # EBUSY right after the last task left: the kernel is still letting go
        # of it, and says nothing when it is done.
        time.sleep(0.001)


# -- the host ------------------------------------------------------------------------


def whole_disk(major: int, minor: int, sysfs: Path = SYSFS) -> tuple[int, int] | None:
    """The disk (MAJ, MIN) that block device MAJ:MIN is or is a partition of;
    None if it is not a block device with a request queue (tmpfs, overlay and
    btrfs subvolumes have anonymous device numbers, 0:N)."""
    entry = sysfs / "dev" / "block" / f"{major}:{minor}"
    if (entry / "partition").exists():
        entry = entry.resolve().parent  # a partition's directory sits in its disk's
    if not (entry / "queue").is_dir():
        return None
    try:
        disk_major, disk_minor = (int(n) for n in (entry / "dev").read_text().split(":"))
    except (OSError, ValueError):
        return None
    return disk_major, disk_minor


def disk_devices(paths: Iterable[Path], sysfs: Path = SYSFS) -> list[tuple[int, int]]:
    """The whole disks (MAJ, MIN) behind the filesystems of `paths`, each once.

    IO limits take a disk, not a partition. Paths that do not exist or sit on
    no disk are skipped: IO limits then have nothing to apply to.
    """
    devices: list[tuple[int, int]] = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        disk = whole_disk(os.major(dev), os.minor(dev), sysfs)
        if disk is not None and disk not in devices:
            devices.append(disk)
    return devices


def check_host(flavour: Flavour, root: Path = ROOT) -> None:
    """Return if every controller corral needs is there; CgroupError naming
    each one that is missing otherwise."""
    if flavour is Flavour.V2:
        available = set(_read(root / "cgroup.controllers").split())
        missing = [name for name in V2_CONTROLLERS if name not in available]
    elif flavour is Flavour.V1:
        missing = [name for name in V1_CONTROLLERS if not (root / name / "cgroup.procs").exists()]
    else:
        raise CgroupError(f"no cgroup hierarchy is mounted at {root}")
    if missing:
        raise CgroupError(
            f"the cgroup {flavour} controllers {', '.join(missing)} are not available at {root}; "
            "corral needs them to limit jobs"
        )


# -- a job's cgroup ------------------------------------------------------------------


def _cpu_quota(cores: float) -> int:
    return max(MIN_CPU_QUOTA_US, round(cores * CPU_PERIOD_US))


def check_component(what: str, value: str) -> None:
    """CgroupError unless `value` can name one cgroup directory."""
    if not value or "/" in value or "\n" in value or value in {".", ".."}:
        raise CgroupError(f"invalid cgroup {what} {value!r}: one path component")


class Cgroup:
    """One job's cgroup, in one (v2) or several (v1) hierarchies.

    Nothing exists until `create()`. Limits are written once, before the
    job's command starts (its init may be in the cgroup already). Every
    method raises CgroupError naming the file that failed.
    """

    def __init__(self, name: str, root: Path, parent: str, slice: str = "") -> None:
        check_component("name", name)
        check_component("parent", parent)
        if slice:
            check_component("slice", slice)
        self.name = name
        self.root = root
        self.parent = parent
        self.slice = slice

    @property
    def under(self) -> str:
        """Where the job's directory is below the hierarchy's root."""
        return f"{self.parent}/{self.slice}" if self.slice else self.parent

    def paths(self) -> list[Path]:
        """The job's directory in each hierarchy (one on v2)."""
        raise NotImplementedError

    def slice_paths(self) -> list[Path]:
        """The slice's directory in each hierarchy (none without a slice)."""
        return [path.parent for path in self.paths()] if self.slice else []

    def create(self) -> None:
        """Make the cgroup (and its parent and slice); fine if it exists."""
        raise NotImplementedError

    def limit_slice(self, limits: Limits) -> None:
        """Write the slice's cpu, memory and pids limits (None: no limit),
        each only if it is not the value there already: a lower memory
        limit than the slice uses now would be refused, and a slice is
        shared by every job of its owner. Nothing without a slice."""
        raise NotImplementedError

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        """Write `limits`; IO limits apply to each disk in `devices` (none: no IO
        limit). A None limit leaves its file alone: unlimited in a new cgroup."""
        raise NotImplementedError

    def usage(self) -> Usage:
        """What the job has used so far (IO: only what reached a disk)."""
        raise NotImplementedError

    def oom_kills(self) -> int:
        """How many processes the kernel killed for the memory limit."""
        raise NotImplementedError

    def add(self, pid: int) -> None:
        """Move `pid` into the cgroup, in every hierarchy."""
        for path in self.paths():
            _write(path / "cgroup.procs", pid)

    def procs(self) -> list[int]:
        """Every process in the cgroup or below it, in any of its hierarchies."""
        pids: set[int] = set()
        for path in self.paths():
            for directory in _subtree(path):
                pids.update(int(pid) for pid in _read(directory / "cgroup.procs", "").split())
        return sorted(pids)

    def _kill_all(self) -> None:
        """Have the kernel kill the whole cgroup, where it can."""

    # Theory of operation: cgroup.procs is a snapshot, and between reading
    # a pid and signalling it the process may exit and a stranger get the
    # pid (pid_max is 32768 on small hosts). So each pid is pinned with a
    # pidfd first, and cgroup.procs is read again: a pid still listed is a
    # member, and it is either the process the pidfd holds or, if that one
    # is already gone, a newer one with its pid, while the signal to the
    # dead one fails harmlessly. No stranger is ever signalled. The pidfds
    # also say when each process has exited, so waiting needs no sleep.
    # Children forked before their parent died appear in the next round;
    # a SIGKILLed process cannot fork again, so rounds run out unless a
    # fork bomb outpaces them (pids.max, or the job's PID namespace dying
    # with its init, stops that).
    def kill(self) -> None:
        """SIGKILL every process in the cgroup and return once it is empty.

        Raises CgroupError if processes remain after KILL_TIMEOUT seconds.
        """
        deadline = time.monotonic() + KILL_TIMEOUT
        self._kill_all()
        while pids := self.procs():
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self.under}/{self.name} still holds processes {pids} "
                    f"{KILL_TIMEOUT:g} s after SIGKILL"
                )
            for start in range(0, len(pids), KILL_BATCH):
                self._kill_and_wait(pids[start : start + KILL_BATCH], deadline)

    def _kill_and_wait(self, pids: list[int], deadline: float) -> None:
        pidfds: dict[int, int] = {}
        try:
            for pid in pids:
                try:
                    pidfds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass  # gone already
                except OSError as exc:
                    raise CgroupError(f"cannot pidfd_open({pid}): {exc.strerror}") from None
            members = set(self.procs())
            poller = select.poll()
            waiting = 0
            for pid, fd in pidfds.items():
                if pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    poller.register(fd, select.POLLIN)  # readable once it has exited
                    waiting += 1
            while waiting and (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(left * 1000):
                    poller.unregister(fd)
                    waiting -= 1
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup everywhere; missing parts are
        fine, so it can be called again. Raises CgroupError if it cannot."""
        self.kill()
        deadline = time.monotonic() + KILL_TIMEOUT
        for path in self.paths():
            for directory in _subtree(path):
                _rmdir(directory, deadline)


class CgroupV1(Cgroup):
    def __init__(self, name: str, root: Path, parent: str, slice: str = "") -> None:
        super().__init__(name, root, parent, slice)
        # Co-mounted controllers (systemd's cpu,cpuacct) share a directory:
        # each hierarchy is joined, created and removed once.
        self._dirs = {
            controller: Path(os.path.realpath(root / controller)) / self.under / name
            for controller in V1_CONTROLLERS
        }

    def paths(self) -> list[Path]:
        return list(dict.fromkeys(self._dirs.values()))

    def create(self) -> None:
        for path in self.paths():
            _mkdir(path)

    def limit_slice(self, limits: Limits) -> None:
        if not self.slice:
            return
        cpu, memory, pids = (self._dirs[name].parent for name in ("cpu", "memory", "pids"))
        quota = -1 if limits.cpu is None else _cpu_quota(limits.cpu)
        if limits.cpu is not None:
            _write_if_changed(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write_if_changed(cpu / "cpu.cfs_quota_us", quota)
        # v1 says "no limit" as the largest page-aligned number (written -1).
        limit = memory / "memory.limit_in_bytes"
        if limits.memory is not None:
            _write_if_changed(limit, limits.memory)
        elif int(_read(limit).strip() or 0) < V1_NO_LIMIT:
            _write(limit, -1)
        _write_if_changed(pids / "pids.max", "max" if limits.pids is None else limits.pids)

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        if limits.cpu is not None:
            cpu = self._dirs["cpu"]
            _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", _cpu_quota(limits.cpu))
        if limits.memory is not None:
            self._limit_memory(limits.memory)
        blkio = self._dirs["blkio"]
        for value, name in (
            (limits.io_read_bps, "read_bps_device"),
            (limits.io_write_bps, "write_bps_device"),
            (limits.io_read_iops, "read_iops_device"),
            (limits.io_write_iops, "write_iops_device"),
        ):
            if value is not None:
                for major, minor in devices:
                    _write(blkio / f"blkio.throttle.{name}", f"{major}:{minor} {value}")
        if limits.pids is not None:
            _write(self._dirs["pids"] / "pids.max", limits.pids)

    def _limit_memory(self, limit: int) -> None:
        memory = self._dirs["memory"]
        files = [memory / "memory.limit_in_bytes"]
        # memory+swap equal to memory: no swap for the job. It may never be
        # below the memory limit, so it is raised first and lowered last. The
        # file is missing when the kernel does not account swap.
        memsw = memory / "memory.memsw.limit_in_bytes"
        if current := _read(memsw, "").strip():
            files.insert(0 if limit > int(current) else 1, memsw)
        for path in files:
            _write(path, limit)

    def usage(self) -> Usage:
        cpu_ns = int(_read(self._dirs["cpuacct"] / "cpuacct.usage").strip() or 0)
        peak = int(_read(self._dirs["memory"] / "memory.max_usage_in_bytes").strip() or 0)
        read = write = 0
        # Only IO that reaches a disk: buffered writes count when written back,
        # and reads served from the page cache not at all.
        stats = _read(self._dirs["blkio"] / "blkio.throttle.io_service_bytes_recursive")
        for line in stats.splitlines():
            parts = line.split()  # "254:0 Read 4096"; the last line is "Total N"
            if len(parts) == 3 and parts[1] == "Read":
                read += int(parts[2])
            elif len(parts) == 3 and parts[1] == "Write":
                write += int(parts[2])
        return Usage(
            cpu_seconds=cpu_ns / 1e9,
            memory_peak_bytes=peak,
            io_read_bytes=read,
            io_write_bytes=write,
        )

    def oom_kills(self) -> int:
        # memory.failcnt can stay 0 after an OOM kill; this counter cannot.
        return _keyed(_read(self._dirs["memory"] / "memory.oom_control")).get("oom_kill", 0)


class CgroupV2(Cgroup):
    def paths(self) -> list[Path]:
        return [self.root / self.under / self.name]

    def create(self) -> None:
        # Controllers flow down: enable them for the root's children (our
        # parent), our parent's (the slices) and the slice's (the jobs).
        wanted = " ".join(f"+{name}" for name in V2_CONTROLLERS)
        directory = self.root
        for part in [*self.under.split("/"), self.name]:
            enabled = set(_read(directory / "cgroup.subtree_control").split())
            if not set(V2_CONTROLLERS) <= enabled:
                _write(directory / "cgroup.subtree_control", wanted)
            directory /= part
            _mkdir(directory)

    def limit_slice(self, limits: Limits) -> None:
        if not self.slice:
            return
        (path,) = self.slice_paths()
        quota = "max" if limits.cpu is None else _cpu_quota(limits.cpu)
        _write_if_changed(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        _write_if_changed(path / "memory.max", "max" if limits.memory is None else limits.memory)
        _write_if_changed(path / "pids.max", "max" if limits.pids is None else limits.pids)

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        (path,) = self.paths()
        if limits.cpu is not None:
            _write(path / "cpu.max", f"{_cpu_quota(limits.cpu)} {CPU_PERIOD_US}")
        if limits.memory is not None:
            _write(path / "memory.max", limits.memory)
            # Missing when the kernel does not account swap (swapaccount=0).
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", 0)
        io = [
            f"{key}={value}"
            for key, value in (
                ("rbps", limits.io_read_bps),
                ("wbps", limits.io_write_bps),
                ("riops", limits.io_read_iops),
                ("wiops", limits.io_write_iops),
            )
            if value is not None
        ]
        if io:
            for major, minor in devices:
                _write(path / "io.max", f"{major}:{minor} {' '.join(io)}")
        if limits.pids is not None:
            _write(path / "pids.max", limits.pids)

    def usage(self) -> Usage:
        (path,) = self.paths()
        cpu = _keyed(_read(path / "cpu.stat"))
        # memory.peak came with Linux 5.19; before it the peak is unknown: 0.
        peak = int(_read(path / "memory.peak", "0").strip())
        read = write = 0
        for line in _read(path / "io.stat").splitlines():
            for field in line.split()[1:]:  # "254:0 rbytes=4096 wbytes=0 rios=1 ..."
                key, _, value = field.partition("=")
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    write += int(value)
        return Usage(
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
            memory_peak_bytes=peak,
            io_read_bytes=read,
            io_write_bytes=write,
        )

    def oom_kills(self) -> int:
        (path,) = self.paths()
        return _keyed(_read(path / "memory.events")).get("oom_kill", 0)

    def _kill_all(self) -> None:
        (path,) = self.paths()
        # Linux 5.14 and later: the kernel kills the whole subtree at once, and
        # processes forking meanwhile too. A cgroup that does not exist has
        # nothing to kill.
        if (path / "cgroup.kill").exists():
            with contextlib.suppress(CgroupError):
                _write(path / "cgroup.kill", 1)


def open_cgroup(
    flavour: Flavour, name: str, root: Path = ROOT, parent: str = PARENT, slice: str = ""
) -> Cgroup:
    """The cgroup of job `name`, in `slice` if it has one (nothing is
    created until `create()`).

    Raises CgroupError for a name, parent or slice that is not one path
    component, or when no cgroup hierarchy is mounted.
    """
    if flavour is Flavour.V1:
        return CgroupV1(name, root, parent, slice)
    if flavour is Flavour.V2:
        return CgroupV2(name, root, parent, slice)
    raise CgroupError(f"no cgroup hierarchy is mounted at {root}")


def slice_name(owner: Identity) -> str:
    """The slice of `owner`'s jobs: `owner-`, the role, `-` and the name,
    every byte of the name but letters, digits, `-`, `_` and `.` written
    `%XX`, so any name is one path component and no two owners (a name
    and a role: the user `admin` is not the admin) share a slice."""
    safe = "".join(
        char if char.isascii() and (char.isalnum() or char in "-_.") else
        "".join(f"%{byte:02X}" for byte in char.encode())
        for char in owner.name
    )  # fmt: skip
    return f"{SLICE_PREFIX}{owner.role}-{safe}"


def orphans(flavour: Flavour, root: Path = ROOT, parent: str = PARENT) -> list[tuple[str, str]]:
    """The job cgroups under `parent`, as (slice, name), in any hierarchy (a
    killed shim may leave some of its v1 directories and not others): after
    a crash, whatever has no live shim is to be removed. Slices themselves
    are not listed; a job from before slices has slice ""."""
    found: set[tuple[str, str]] = set()
    for path in open_cgroup(flavour, "probe", root, parent).paths():
        for child in _directories(path.parent):
            if child.name.startswith(SLICE_PREFIX):
                found.update((child.name, job.name) for job in _directories(child))
            else:
                found.add(("", child.name))
    return sorted(found)


def _directories(path: Path) -> list[Path]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return [child for child in path.iterdir() if child.is_dir()]
    return []

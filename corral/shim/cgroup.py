"""A job's cgroup: create it, limit it, join it, account it, kill it, remove it.

corral supports the unified v2 tree and the v1 (or hybrid) layout with one
hierarchy per controller, behind one small interface: `open_cgroup()`
returns a `Cgroup` whose two subclasses know their files. Jobs live under a
parent of their own (`corral/<job id>`), so corral never touches cgroups it
did not make.

Plain synchronous code: the shim (which never imports trio) uses it, and
corrald calls it from a thread when it cleans up after a lost shim.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from corral.job import Limits, Usage

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP_ROOT = "/sys/fs/cgroup"
ROOT = Path(CGROUP_ROOT)
PARENT = "corral"

# The v1 hierarchies a job joins, each mounted at ROOT/<name>.
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")
CPU_PERIOD_US = 100_000
# kill(): how long the kernel may take to empty a cgroup of killed tasks.
KILL_TIMEOUT = 10.0


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


def _read(path: Path) -> str:
    try:
        return path.read_text()
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


def _keyed(text: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat) as a map."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def disk_devices(paths: Iterable[Path]) -> list[tuple[int, int]]:
    """The whole disks (MAJ, MIN) behind the filesystems of `paths`.

    IO limits take a disk, not a partition: a partition is mapped to its
    disk through sysfs. Filesystems with no block device behind them
    (tmpfs, overlay) are skipped.
    """
    devices: list[tuple[int, int]] = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        if not sysfs.exists():
            continue
        if (sysfs / "partition").exists():
            sysfs = sysfs.resolve().parent  # the disk's directory holds its partitions
        try:
            major, minor = (int(n) for n in (sysfs / "dev").read_text().split(":"))
        except (OSError, ValueError):
            continue
        if (major, minor) not in devices:
            devices.append((major, minor))
    return devices


def check_host(flavour: Flavour, root: Path = ROOT) -> None:
    """CgroupError naming every controller this host lacks."""
    if flavour is Flavour.V2:
        try:
            available = set((root / "cgroup.controllers").read_text().split())
        except OSError as exc:
            raise CgroupError(
                f"cannot read {root / 'cgroup.controllers'}: {exc.strerror}"
            ) from None
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


class Cgroup:
    """One job's cgroup, in one (v2) or several (v1) hierarchies."""

    def __init__(self, name: str, root: Path, parent: str) -> None:
        if not name or "/" in name or name in {".", ".."}:
            raise CgroupError(f"invalid cgroup name {name!r}")
        self.name = name
        self.root = root
        self.parent = parent

    def paths(self) -> list[Path]:
        raise NotImplementedError

    def create(self) -> None:
        raise NotImplementedError

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        raise NotImplementedError

    def usage(self) -> Usage:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def add(self, pid: int) -> None:
        """Move `pid` into the cgroup, in every hierarchy."""
        for path in self.paths():
            _write(path / "cgroup.procs", pid)

    def procs(self) -> list[int]:
        """Every process in the cgroup (in any of its hierarchies)."""
        pids: set[int] = set()
        for path in self.paths():
            with contextlib.suppress(FileNotFoundError):
                pids.update(int(line) for line in (path / "cgroup.procs").read_text().split())
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup; return once it is empty."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while pids := self.procs():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self.name} still holds {pids} {KILL_TIMEOUT:g} s after SIGKILL"
                )
            time.sleep(0.001)  # the kernel is reaping: nothing to wait on but time

    def remove(self) -> None:
        """Kill what is left and remove the cgroup everywhere; missing is fine."""
        self.kill()
        for path in self.paths():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove {path}: {exc.strerror}") from None
                # Freshly killed tasks may still be leaving; once more, briefly.
                self.kill()
                try:
                    path.rmdir()
                except OSError as again:
                    raise CgroupError(f"cannot remove {path}: {again.strerror}") from None


class CgroupV1(Cgroup):
    def _dir(self, controller: str) -> Path:
        return self.root / controller / self.parent / self.name

    def paths(self) -> list[Path]:
        return [self._dir(controller) for controller in V1_CONTROLLERS]

    def create(self) -> None:
        for path in self.paths():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create {path}: {exc.strerror}") from None

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        if limits.cpu is not None:
            cpu = self._dir("cpu")
            _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", max(1000, round(limits.cpu * CPU_PERIOD_US)))
        if limits.memory is not None:
            memory = self._dir("memory")
            _write(memory / "memory.limit_in_bytes", limits.memory)
            # memory+swap equal to memory: no swap for the job. Only after
            # the memory limit, which it may not be below.
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", limits.memory)
        blkio = self._dir("blkio")
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
            _write(self._dir("pids") / "pids.max", limits.pids)

    def usage(self) -> Usage:
        cpu_ns = int(_read(self._dir("cpuacct") / "cpuacct.usage").strip() or 0)
        peak = int(_read(self._dir("memory") / "memory.max_usage_in_bytes").strip() or 0)
        read = write = 0
        for line in _read(self._dir("blkio") / "blkio.throttle.io_service_bytes").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in {"Read", "Write"}:
                if parts[1] == "Read":
                    read += int(parts[2])
                else:
                    write += int(parts[2])
        return Usage(
            cpu_seconds=cpu_ns / 1e9,
            memory_peak_bytes=peak,
            io_read_bytes=read,
            io_write_bytes=write,
        )

    def oom_kills(self) -> int:
        # memory.failcnt can stay 0 after an OOM kill; this counter cannot.
        return _keyed(_read(self._dir("memory") / "memory.oom_control")).get("oom_kill", 0)


class CgroupV2(Cgroup):
    def paths(self) -> list[Path]:
        return [self.root / self.parent / self.name]

    def create(self) -> None:
        parent = self.root / self.parent
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create {parent}: {exc.strerror}") from None
        # Controllers flow down: enable them for the root's children (our
        # parent) and for our parent's children (the jobs).
        wanted = " ".join(f"+{name}" for name in V2_CONTROLLERS)
        for directory in (self.root, parent):
            enabled = set(_read(directory / "cgroup.subtree_control").split())
            if not set(V2_CONTROLLERS) <= enabled:
                _write(directory / "cgroup.subtree_control", wanted)
        (path,) = self.paths()
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create {path}: {exc.strerror}") from None

    def apply(self, limits: Limits, devices: Sequence[tuple[int, int]]) -> None:
        (path,) = self.paths()
        if limits.cpu is not None:
            quota = max(1000, round(limits.cpu * CPU_PERIOD_US))
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if limits.memory is not None:
            _write(path / "memory.max", limits.memory)
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
        peak_file = path / "memory.peak"  # Linux 5.19 and later
        peak = int(_read(peak_file).strip()) if peak_file.exists() else 0
        read = write = 0
        for line in _read(path / "io.stat").splitlines():
            for field in line.split()[1:]:
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

    def kill(self) -> None:
        (path,) = self.paths()
        if (path / "cgroup.kill").exists():  # Linux 5.14: the kernel kills them all
            with contextlib.suppress(CgroupError):
                _write(path / "cgroup.kill", 1)
        super().kill()


def open_cgroup(flavour: Flavour, name: str, root: Path = ROOT, parent: str = PARENT) -> Cgroup:
    """The cgroup of job `name` (nothing is created until `create()`)."""
    if flavour is Flavour.V1:
        return CgroupV1(name, root, parent)
    if flavour is Flavour.V2:
        return CgroupV2(name, root, parent)
    raise CgroupError("no cgroup hierarchy is mounted")


def orphans(flavour: Flavour, root: Path = ROOT, parent: str = PARENT) -> list[str]:
    """Names of the job cgroups under `parent` (to clean up after crashes)."""
    probe = open_cgroup(flavour, "probe", root, parent)
    names: set[str] = set()
    for path in probe.paths():
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            names.update(child.name for child in path.parent.iterdir() if child.is_dir())
    return sorted(names)

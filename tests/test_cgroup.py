"""The cgroup layer against the real kernel, as root.

The same tests run on a v1 (hybrid) host and in the cgroup v2 VM
(`shared/tools/v2vm`): the flavour is detected once, and each test checks
that flavour's files. Tests that need a real hierarchy are marked `cgroup`
(the VM lane runs only those). Everything lives under a parent of this run's
own, never a real corrald's, and is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.identity import Identity
from corral.job import Limits, new_job_id
from corral.shim.cgroup import (
    CPU_PERIOD_US,
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    Cgroup,
    CgroupError,
    Flavour,
    check_host,
    detect_flavour,
    disk_devices,
    open_cgroup,
    orphans,
    slice_name,
    whole_disk,
)

from .conftest import clear_cgroup_parent

FLAVOUR = detect_flavour()
ROOT = Path("/sys/fs/cgroup")
# Not conftest's corral-test-PID: that one's session teardown checks its own.
PARENT = f"corral-cgtest-{os.getpid()}"
MiB = 1 << 20
# v1's "no limit" for memory files: the largest page-aligned signed 64-bit value.
V1_UNLIMITED = "9223372036854771712"

Spawn = Callable[..., subprocess.Popen[bytes]]


def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for what the kernel does asynchronously and does not announce."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture(scope="module", autouse=True)
def no_cgroups_left_behind() -> Iterator[None]:
    """After the module: remove what is left under the parent, then the parent."""
    yield
    if FLAVOUR is Flavour.NONE or os.geteuid() != 0:
        return
    left = clear_cgroup_parent(FLAVOUR, PARENT)
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    """A new job cgroup under this run's parent, removed (processes and all) after."""
    if os.geteuid() != 0 or FLAVOUR is Flavour.NONE:
        pytest.skip("needs root and a mounted cgroup hierarchy")
    group = open_cgroup(FLAVOUR, new_job_id(), parent=PARENT)
    group.create()
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture
def spawn(cgroup: Cgroup) -> Iterator[Spawn]:
    """Start argv with its first process in `cgroup` before it execs (the shim's
    order: join, then release); every process is killed and reaped after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *argv: str, stdout: int | None = None, stderr: int | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["sh", "-c", 'read -r go && exec "$@"', "sh", *argv],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
        )
        started.append(process)
        assert process.stdin is not None
        cgroup.add(process.pid)
        process.stdin.write(b"go\n")
        process.stdin.close()
        process.stdin = None  # so that communicate() leaves it alone
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def cgroup_path(group: Cgroup) -> str:
    """The cgroup as /proc/PID/cgroup names it."""
    return f"/{group.parent}/{group.name}"


def file(group: Cgroup, controller: str, name: str) -> str:
    """The contents of one of the group's control files (controller: v1 hierarchy)."""
    if FLAVOUR is Flavour.V1:
        return (ROOT / controller / group.parent / group.name / name).read_text().strip()
    return (ROOT / group.parent / group.name / name).read_text().strip()


def io_disk() -> tuple[int, int]:
    """The disk IO limits are tested on: the root's (the host's), else the
    first real disk (the VM's scratch disk: its root is an overlay on none)."""
    devices = disk_devices([Path("/")])
    for entry in sorted(Path("/sys/block").iterdir()):
        if entry.name.startswith(("loop", "zram", "ram")) or (entry / "size").read_text() == "0\n":
            continue
        major, minor = (int(n) for n in (entry / "dev").read_text().split(":"))
        if (disk := whole_disk(major, minor)) is not None:
            devices.append(disk)
    assert devices, "no disk to test IO limits on"
    return devices[0]


def device_node(device: tuple[int, int]) -> str:
    uevent = Path(f"/sys/dev/block/{device[0]}:{device[1]}/uevent").read_text()
    names = [line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DEVNAME=")]
    return f"/dev/{names[0]}"


# -- the host and the disks ----------------------------------------------------------


@pytest.mark.cgroup
def test_check_host_finds_every_controller_here() -> None:
    if FLAVOUR is Flavour.NONE:
        pytest.skip("no cgroup hierarchy is mounted")
    check_host(FLAVOUR)


def test_check_host_names_every_missing_v1_controller(tmp_path: Path) -> None:
    for present in ("cpu", "pids"):
        (tmp_path / present).mkdir()
        (tmp_path / present / "cgroup.procs").write_text("")
    with pytest.raises(CgroupError) as caught:
        check_host(Flavour.V1, tmp_path)
    assert str(caught.value) == (
        f"the cgroup v1 controllers cpuacct, memory, blkio are not available at {tmp_path}; "
        "corral needs them to limit jobs"
    )


def test_check_host_names_every_missing_v2_controller(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"cannot read .*/cgroup\.controllers: No such file"):
        check_host(Flavour.V2, tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu pids\n")
    with pytest.raises(CgroupError, match=r"v2 controllers memory, io are not available"):
        check_host(Flavour.V2, tmp_path)
    with pytest.raises(CgroupError, match="no cgroup hierarchy is mounted"):
        check_host(Flavour.NONE, tmp_path)


def fake_sysfs(root: Path) -> Path:
    """A /sys with disk sdz (8:0, partition sdz1 = 8:1) and a device without a queue."""
    disk = root / "devices" / "pci0" / "block" / "sdz"
    (disk / "queue").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sdz1").mkdir()
    (disk / "sdz1" / "dev").write_text("8:1\n")
    (disk / "sdz1" / "partition").write_text("1\n")
    odd = root / "devices" / "virtual" / "block" / "odd"
    odd.mkdir(parents=True)
    (odd / "dev").write_text("9:0\n")
    links = root / "dev" / "block"
    links.mkdir(parents=True)
    (links / "8:0").symlink_to("../../devices/pci0/block/sdz")
    (links / "8:1").symlink_to("../../devices/pci0/block/sdz/sdz1")
    (links / "9:0").symlink_to("../../devices/virtual/block/odd")
    return root


def test_whole_disk_maps_a_partition_to_its_disk(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    assert whole_disk(8, 1, sysfs) == (8, 0)
    assert whole_disk(8, 0, sysfs) == (8, 0)
    assert whole_disk(9, 0, sysfs) is None  # no request queue: nothing to throttle
    assert whole_disk(0, 42, sysfs) is None  # tmpfs, overlay: no block device at all


def test_disk_devices_names_each_whole_disk_once() -> None:
    # What /sys/block says, independently: every disk and each of its partitions.
    disk_of: dict[str, str] = {}
    for disk in Path("/sys/block").iterdir():
        if (disk / "queue").is_dir():
            number = (disk / "dev").read_text().strip()
            disk_of[number] = number
            for part in disk.iterdir():
                if (part / "partition").exists():
                    disk_of[(part / "dev").read_text().strip()] = number
    dev = os.stat("/").st_dev
    root = disk_of.get(f"{os.major(dev)}:{os.minor(dev)}")
    expected = [] if root is None else [tuple(int(n) for n in root.split(":"))]
    assert disk_devices([Path("/"), Path("/etc"), Path("/proc"), Path("/dev/shm")]) == expected
    assert disk_devices([Path("/no/such/path")]) == []


def test_open_cgroup_refuses_names_that_are_not_one_component() -> None:
    for name in ("", ".", "..", "a/b"):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            open_cgroup(Flavour.V2, name)
    with pytest.raises(CgroupError, match="invalid cgroup parent"):
        open_cgroup(Flavour.V1, "job", parent="../etc")
    with pytest.raises(CgroupError, match="no cgroup hierarchy is mounted"):
        open_cgroup(Flavour.NONE, "job")


# -- creating and limiting -----------------------------------------------------------


@pytest.mark.cgroup
def test_create_makes_the_cgroup_in_every_hierarchy_once(cgroup: Cgroup) -> None:
    cgroup.create()  # again: nothing changes
    if FLAVOUR is Flavour.V1:
        assert cgroup.paths() == [ROOT / c / PARENT / cgroup.name for c in V1_CONTROLLERS]
    else:
        assert cgroup.paths() == [ROOT / PARENT / cgroup.name]
        for directory in (ROOT, ROOT / PARENT):
            enabled = (directory / "cgroup.subtree_control").read_text().split()
            assert set(V2_CONTROLLERS) <= set(enabled), directory
        controllers = (cgroup.paths()[0] / "cgroup.controllers").read_text().split()
        assert set(V2_CONTROLLERS) <= set(controllers)
    assert all(path.is_dir() for path in cgroup.paths())
    assert ("", cgroup.name) in orphans(FLAVOUR, parent=PARENT)


@pytest.mark.cgroup
def test_apply_writes_every_limit(cgroup: Cgroup) -> None:
    major, minor = disk = io_disk()
    limits = Limits(
        cpu=0.5,
        memory=32 * MiB,
        io_read_bps=MiB,
        io_write_bps=2 * MiB,
        io_read_iops=100,
        io_write_iops=200,
        pids=20,
    )
    cgroup.apply(limits, [disk])
    if FLAVOUR is Flavour.V1:
        assert file(cgroup, "cpu", "cpu.cfs_period_us") == str(CPU_PERIOD_US)
        assert file(cgroup, "cpu", "cpu.cfs_quota_us") == "50000"
        assert file(cgroup, "memory", "memory.limit_in_bytes") == str(32 * MiB)
        assert file(cgroup, "memory", "memory.memsw.limit_in_bytes") == str(32 * MiB)
        for name, value in (
            ("read_bps_device", MiB),
            ("write_bps_device", 2 * MiB),
            ("read_iops_device", 100),
            ("write_iops_device", 200),
        ):
            assert file(cgroup, "blkio", f"blkio.throttle.{name}") == f"{major}:{minor} {value}"
    else:
        assert file(cgroup, "cpu", "cpu.max") == "50000 100000"
        assert file(cgroup, "memory", "memory.max") == str(32 * MiB)
        assert file(cgroup, "memory", "memory.swap.max") == "0"
        assert file(cgroup, "io", "io.max") == (
            f"{major}:{minor} rbps={MiB} wbps={2 * MiB} riops=100 wiops=200"
        )
    assert file(cgroup, "pids", "pids.max") == "20"


@pytest.mark.cgroup
def test_apply_leaves_limits_that_are_none_unlimited(cgroup: Cgroup) -> None:
    cgroup.apply(Limits(), [io_disk()])
    if FLAVOUR is Flavour.V1:
        assert file(cgroup, "cpu", "cpu.cfs_quota_us") == "-1"
        assert file(cgroup, "memory", "memory.limit_in_bytes") == V1_UNLIMITED
        assert file(cgroup, "blkio", "blkio.throttle.read_bps_device") == ""
    else:
        assert file(cgroup, "cpu", "cpu.max") == "max 100000"
        assert file(cgroup, "memory", "memory.max") == "max"
        assert file(cgroup, "io", "io.max") == ""
    assert file(cgroup, "pids", "pids.max") == "max"


@pytest.mark.cgroup
def test_apply_raises_and_lowers_the_memory_limit(cgroup: Cgroup) -> None:
    # v1: memory+swap may never be below memory, so the order of the two
    # writes depends on the direction.
    for memory in (32 * MiB, 64 * MiB, 16 * MiB):
        cgroup.apply(Limits(memory=memory), [])
        if FLAVOUR is Flavour.V1:
            assert file(cgroup, "memory", "memory.limit_in_bytes") == str(memory)
            assert file(cgroup, "memory", "memory.memsw.limit_in_bytes") == str(memory)
        else:
            assert file(cgroup, "memory", "memory.max") == str(memory)


@pytest.mark.cgroup
def test_a_refused_write_names_the_file_and_the_reason(cgroup: Cgroup) -> None:
    pids = (ROOT / "pids" if FLAVOUR is Flavour.V1 else ROOT) / PARENT / cgroup.name
    with pytest.raises(CgroupError) as caught:
        cgroup.apply(Limits(pids=-1), [])
    assert str(caught.value) == f"cannot write -1 to {pids / 'pids.max'}: Invalid argument"
    io_file = "blkio.throttle.read_bps_device" if FLAVOUR is Flavour.V1 else "io.max"
    with pytest.raises(CgroupError, match=rf"cannot write 1:3 .* to /.*/{io_file}: No such device"):
        cgroup.apply(Limits(io_read_bps=MiB), [(1, 3)])  # /dev/null: not a disk
    gone = open_cgroup(FLAVOUR, new_job_id(), parent=PARENT)
    with pytest.raises(CgroupError, match=r"cannot read /.*: No such file or directory"):
        gone.usage()


# -- processes -----------------------------------------------------------------------


@pytest.mark.cgroup
def test_the_command_runs_in_the_cgroup_from_its_start(cgroup: Cgroup, spawn: Spawn) -> None:
    reader = spawn("cat", "/proc/self/cgroup", stdout=subprocess.PIPE)
    out, _ = reader.communicate()
    lines = [line.split(":", 2) for line in out.decode().splitlines()]
    ours = {
        controller
        for _, names, path in lines
        if path == cgroup_path(cgroup)
        for controller in names.split(",")
    }
    if FLAVOUR is Flavour.V1:
        assert set(V1_CONTROLLERS) <= ours, out
    else:
        assert lines == [["0", "", cgroup_path(cgroup)]]

    sleeper = spawn("sleep", "60")
    until(lambda: Path(f"/proc/{sleeper.pid}/comm").read_text() == "sleep\n")
    assert cgroup.procs() == [sleeper.pid]
    assert cgroup_path(cgroup) in Path(f"/proc/{sleeper.pid}/cgroup").read_text()


@pytest.mark.cgroup
def test_usage_counts_cpu_and_limits_bite(cgroup: Cgroup, spawn: Spawn) -> None:
    cgroup.apply(Limits(cpu=0.2), [])
    began = time.monotonic()
    spawn("timeout", "0.5", "sh", "-c", "while :; do :; done").wait()
    wall = time.monotonic() - began
    cpu = cgroup.usage().cpu_seconds
    # A fifth of a core: about a fifth of the wall time the loop ran for (a
    # period's quota of slack), never all of it as an unlimited loop would
    # get. The wall time is measured, not assumed: under the cgroup v2 VM's
    # emulation, starting `timeout` and `sh` alone takes over a second.
    assert 0.03 < cpu < 0.2 * wall + 0.1, (cpu, wall)
    assert cgroup.usage().memory_peak_bytes > 0


@pytest.mark.cgroup
def test_io_is_throttled_and_counted(cgroup: Cgroup, spawn: Spawn, tmp_path: Path) -> None:
    disk = io_disk()
    if disk_devices([tmp_path]) == [disk]:
        scratch = str(tmp_path / "scratch")
    elif os.environ.get("V2VM") == "1":
        scratch = device_node(disk)  # the VM's throwaway disk (its / is on none)
    else:
        pytest.skip(f"{tmp_path} is on no disk to write to")
    cgroup.apply(Limits(io_read_bps=2 * MiB), [disk])
    # Direct IO reaches the disk: nothing goes through the page cache, and v1
    # throttles it too.
    write = ["dd", "if=/dev/zero", f"of={scratch}", "bs=64k", "count=16", "oflag=direct"]
    assert spawn(*write, stderr=subprocess.DEVNULL).wait() == 0
    read = ["dd", f"if={scratch}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct"]
    began = time.monotonic()
    assert spawn(*read, stderr=subprocess.DEVNULL).wait() == 0
    took = time.monotonic() - began
    assert took > 0.3, f"1 MiB at 2 MiB/s took {took:.2f} s"
    usage = cgroup.usage()
    assert usage.io_read_bytes >= MiB
    assert usage.io_write_bytes >= MiB


@pytest.mark.cgroup
def test_pids_max_stops_forks(cgroup: Cgroup, spawn: Spawn) -> None:
    cgroup.apply(Limits(pids=4), [])
    shell = spawn(
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do sleep 60 >/dev/null 2>&1 & done",
        stderr=subprocess.PIPE,
    )
    _, err = shell.communicate()
    assert b"fork" in err.lower(), err
    assert len(cgroup.procs()) <= 4


@pytest.mark.cgroup
def test_an_oom_kill_is_counted(cgroup: Cgroup, spawn: Spawn) -> None:
    cgroup.apply(Limits(memory=16 * MiB), [])
    assert cgroup.oom_kills() == 0
    # tail keeps a line that never ends: 200 MiB of it, in 16 MiB.
    shell = spawn("sh", "-c", "head -c 200M /dev/zero | tail")
    assert shell.wait() == 128 + 9  # tail died by SIGKILL
    assert cgroup.oom_kills() >= 1
    peak = cgroup.usage().memory_peak_bytes
    assert 8 * MiB < peak <= 16 * MiB


def pidfds(pids: list[int]) -> list[int]:
    return [os.pidfd_open(pid) for pid in pids]


def all_exited(fds: list[int]) -> bool:
    """Whether every process behind the pidfds has exited (pidfds turn readable)."""
    ready, _, _ = select.select(fds, [], [], 0)
    return len(ready) == len(fds)


@pytest.mark.cgroup
def test_kill_empties_a_tree_that_left_its_session(cgroup: Cgroup, spawn: Spawn) -> None:
    shell = spawn("sh", "-c", "sleep 1000 & setsid sleep 1000 & wait")
    until(lambda: len(cgroup.procs()) == 3)
    fds = pidfds(cgroup.procs())
    try:
        cgroup.kill()
        assert cgroup.procs() == []
        assert all_exited(fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert shell.wait() == -9
    cgroup.kill()  # an empty cgroup: nothing to do


@pytest.mark.cgroup
def test_remove_kills_everything_and_leaves_nothing(cgroup: Cgroup, spawn: Spawn) -> None:
    sleeper = spawn("sleep", "1000")
    # A root job may make cgroups of its own inside; they go too, with their processes.
    inner = cgroup.paths()[0] / "inner"
    inner.mkdir()
    stray = subprocess.Popen(["sleep", "1000"])
    try:
        (inner / "cgroup.procs").write_text(str(stray.pid))
        assert stray.pid in cgroup.procs()
        cgroup.remove()
        assert stray.wait(timeout=10) == -9
    finally:
        stray.kill()
        stray.wait()
    assert sleeper.wait(timeout=10) == -9
    assert not any(path.exists() for path in cgroup.paths())
    assert ("", cgroup.name) not in orphans(FLAVOUR, parent=PARENT)
    cgroup.remove()  # again: nothing left to do


@pytest.mark.cgroup
def test_remove_finishes_a_partly_removed_cgroup(cgroup: Cgroup) -> None:
    # A shim killed half-way through removal leaves some v1 hierarchies behind.
    first, *rest = cgroup.paths()
    first.rmdir()
    if rest:  # v1: what is left is still found, for garbage collection
        assert ("", cgroup.name) in orphans(FLAVOUR, parent=PARENT)
    cgroup.remove()
    assert ("", cgroup.name) not in orphans(FLAVOUR, parent=PARENT)


# -- owners' slices ------------------------------------------------------------------


def test_a_slice_name_is_one_component_and_one_owner_each() -> None:
    def user(name: str) -> str:
        return slice_name(Identity(name, "user"))

    assert user("alice") == "owner-user-alice"
    assert slice_name(Identity("admin", "admin")) == "owner-admin-admin"
    assert user("admin") == "owner-user-admin"  # a user named admin is not the admin
    assert user("a.b-c_d") == "owner-user-a.b-c_d"
    assert user("a/b") == "owner-user-a%2Fb"
    assert user("a%2Fb") == "owner-user-a%252Fb"  # no two names share one
    assert user("..") == "owner-user-.."  # a prefix: never "." or ".."
    assert user("é\n") == "owner-user-%C3%A9%0A"


@pytest.fixture
def sliced() -> Iterator[tuple[Cgroup, Cgroup]]:
    """Two job cgroups in one owner's slice, removed (and the slice) after."""
    if os.geteuid() != 0 or FLAVOUR is Flavour.NONE:
        pytest.skip("needs root and a mounted cgroup hierarchy")
    slice = slice_name(Identity(f"tenant-{os.getpid()}", "user"))
    groups = tuple(open_cgroup(FLAVOUR, new_job_id(), parent=PARENT, slice=slice) for _ in "ab")
    for group in groups:
        group.create()
    try:
        yield groups  # type: ignore[misc]
    finally:
        for group in groups:
            group.remove()
        for path in groups[0].slice_paths():
            path.rmdir()


def slice_file(group: Cgroup, controller: str, name: str) -> str:
    hierarchy = ROOT / controller if FLAVOUR is Flavour.V1 else ROOT
    return (hierarchy / group.parent / group.slice / name).read_text().strip()


@pytest.mark.cgroup
def test_jobs_of_one_owner_share_their_slices_limits(
    sliced: tuple[Cgroup, Cgroup], tmp_path: Path
) -> None:
    first, second = sliced
    assert first.slice_paths() == second.slice_paths()
    assert {(first.slice, group.name) for group in sliced} <= set(orphans(FLAVOUR, parent=PARENT))
    first.limit_slice(Limits(pids=6, memory=64 * MiB, cpu=1.5))
    assert slice_file(first, "pids", "pids.max") == "6"
    if FLAVOUR is Flavour.V1:
        assert slice_file(first, "memory", "memory.limit_in_bytes") == str(64 * MiB)
        assert slice_file(first, "cpu", "cpu.cfs_quota_us") == "150000"
    else:
        assert slice_file(first, "", "memory.max") == str(64 * MiB)
        assert slice_file(first, "", "cpu.max") == f"150000 {CPU_PERIOD_US}"
        enabled = (first.slice_paths()[0] / "cgroup.subtree_control").read_text().split()
        assert set(V2_CONTROLLERS) <= set(enabled)
    # Each job's own cgroup allows more than the slice: together they get six.
    shells = []
    try:
        for group in sliced:
            group.apply(Limits(pids=100), [])
            shell = subprocess.Popen(
                ["sh", "-c", "read -r go; for i in 1 2 3 4 5; do sleep 60 & done; echo done; wait"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            shells.append(shell)
            group.add(shell.pid)
            assert shell.stdin is not None
            assert shell.stdout is not None
            shell.stdin.write(b"go\n")
            shell.stdin.flush()
            shell.stdout.readline()  # "done": it forked what it could; or it died failing to
        assert len(first.procs()) == 6  # the first shell and its five
        assert len(second.procs()) <= 1  # the second could fork nothing: the slice was full
    finally:
        for group in sliced:
            group.kill()
        for shell in shells:
            shell.communicate()
    first.limit_slice(Limits())  # no quota: every limit lifted again
    assert slice_file(first, "pids", "pids.max") == "max"
    if FLAVOUR is Flavour.V1:
        assert slice_file(first, "memory", "memory.limit_in_bytes") == V1_UNLIMITED
        assert slice_file(first, "cpu", "cpu.cfs_quota_us") == "-1"
    else:
        assert slice_file(first, "", "memory.max") == "max"
        assert slice_file(first, "", "cpu.max") == f"max {CPU_PERIOD_US}"

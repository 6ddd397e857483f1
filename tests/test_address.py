"""Addresses as people type them, and the cgroup flavour as the mount table says."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.address import AddressError, TCPAddress, UnixAddress, parse_address
from corral.shim.cgroup import Flavour, detect_flavour


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("127.0.0.1:7443", TCPAddress("127.0.0.1", 7443), "127.0.0.1:7443"),
        ("localhost", TCPAddress("localhost", 7443), "localhost:7443"),
        ("corral.example:0", TCPAddress("corral.example", 0), "corral.example:0"),
        ("[::1]:9000", TCPAddress("::1", 9000), "[::1]:9000"),
        ("[::1]", TCPAddress("::1", 7443), "[::1]:7443"),
        ("unix:/run/corrald.sock", UnixAddress("/run/corrald.sock"), "unix:/run/corrald.sock"),
        ("unix:var/corrald.sock", UnixAddress("var/corrald.sock"), "unix:var/corrald.sock"),
    ],
)
def test_valid_addresses(text: str, address: TCPAddress | UnixAddress, shown: str) -> None:
    assert parse_address(text) == address
    assert str(address) == shown
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("unix:", "needs a path"),
        ("unix:/" + "x" * 200, "the limit is"),
        ("unix:/a\0b", "NUL"),
        (":7443", "missing host"),
        ("localhost:http", "port must be a number"),
        ("localhost:65536", "port must be a number"),
        ("localhost:-1", "port must be a number"),
        ("localhost:²", "port must be a number"),
        ("::1:7443", "write IPv6 addresses as [ADDR]:PORT"),
        ("[::1:7443", "missing ']'"),
        ("[nope]:7443", "not an IPv6 address"),
        ("[::1]7443", "expected ':PORT'"),
    ],
)
def test_invalid_addresses(text: str, why: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    assert why in str(caught.value)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    with contextlib.suppress(AddressError):
        parse_address(text)


V1_HOST = """\
22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
32 26 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
"""
V2_HOST = """\
22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""
NO_CGROUPS = "22 28 0:20 / /sys rw,nosuid shared:7 - sysfs sysfs rw\nnot a mountinfo line\n"


@pytest.mark.parametrize(
    ("table", "flavour"),
    [(V1_HOST, Flavour.V1), (V2_HOST, Flavour.V2), (NO_CGROUPS, Flavour.NONE)],
)
def test_cgroup_flavour_from_the_mount_table(tmp_path: Path, table: str, flavour: Flavour) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(table)
    assert detect_flavour(mountinfo) is flavour


def test_this_host_has_cgroups() -> None:
    assert detect_flavour() in {Flavour.V1, Flavour.V2}

"""corrald among others on one host: each keeps to its own cgroups, one that
refuses to start changes nothing, a shutdown ends jobs before sessions.

Real corrald processes, real jobs and cgroups (root).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from corral.client.client import Client, connect
from corral.client.errors import ServerError
from corral.identity import Identity
from corral.job import State, Status, new_job_id
from corral.shim.cgroup import Cgroup, detect_flavour, open_cgroup, orphans, slice_name
from corral.store import read_status, write_status
from corral.supervisor.flags import build_parser
from corral.worker.cgroup_parent import (
    LEGACY_PARENT,
    ParentError,
    claim_parent,
    default_parent,
    derived_parent,
    record_parent,
    recorded_parent,
)

from .conftest import (
    CORRALD,
    TEST_CGROUP_PARENT,
    Daemon,
    clear_cgroup_parent,
    identity,
    running_corrald,
    start_corrald,
    until,
)

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

FLAVOUR = detect_flavour()
ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def start_sleeper(daemon: Daemon, pki_dir: Path) -> str:
    async with connect(daemon.tcp, identity(pki_dir, "admin")) as admin:
        return (await admin.start(["sleep", "1000"])).id


def assert_running(daemon: Daemon, job_id: str, parent: str = TEST_CGROUP_PARENT) -> None:
    """The job runs on, its shim alive and its cgroup holding init and the command."""
    status = read_status(daemon.state_dir / "jobs" / job_id)
    assert status is not None
    assert (status.state, alive(status.shim_pid)) == (State.RUNNING, True), status
    cgroup = open_cgroup(
        FLAVOUR, job_id, parent=parent, slice=slice_name(Identity("admin", "admin"))
    )
    assert len(cgroup.procs()) == 2


def refused(*flags: str) -> tuple[int, str]:
    """Run a corrald expected to refuse to start: its exit status and stderr."""
    process = start_corrald(*flags)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


@pytest.fixture
def stranger() -> Iterator[Cgroup]:
    """A cgroup with a process in it, named like a job, that no corrald made:
    another manager's job, as far as anyone can tell."""
    parent = f"{TEST_CGROUP_PARENT}-stranger"
    cgroup = open_cgroup(FLAVOUR, new_job_id(), parent=parent)
    cgroup.create()
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        cgroup.add(sleeper.pid)
        yield cgroup
    finally:
        sleeper.kill()
        sleeper.wait()
        clear_cgroup_parent(FLAVOUR, parent)


# -- one corrald refused, the other untouched ------------------------------------------


async def test_a_second_corrald_on_a_claimed_cgroup_parent_is_refused_and_touches_nothing(
    corrald: Daemon, pki_dir: Path, short_dir: Path
) -> None:
    job_id = await start_sleeper(corrald, pki_dir)
    code, stderr = await trio.to_thread.run_sync(
        refused,
        *("--state-dir", str(short_dir / "second"), "--pki", str(pki_dir)),
        *("--listen", "127.0.0.1:0", "--cgroup-parent", TEST_CGROUP_PARENT),
    )
    assert (code, stderr) == (
        69,
        f"corrald: error: cgroup parent {TEST_CGROUP_PARENT} is in use by another corrald "
        f"(pid {corrald.process.pid}); give this one its own with --cgroup-parent NAME\n",
    )
    assert_running(corrald, job_id)


async def test_a_second_corrald_on_a_port_in_use_touches_no_cgroup(
    corrald: Daemon, pki_dir: Path, short_dir: Path, stranger: Cgroup
) -> None:
    job_id = await start_sleeper(corrald, pki_dir)
    code, stderr = await trio.to_thread.run_sync(
        refused,
        *("--state-dir", str(short_dir / "second"), "--pki", str(pki_dir)),
        *("--listen", corrald.tcp, "--cgroup-parent", stranger.parent),
    )
    assert (code, stderr) == (
        69,
        f"corrald: error: cannot listen on {corrald.tcp}: Address already in use\n",
    )
    # No sweep (the stranger lives), no sandbox built (nothing else there).
    assert len(stranger.procs()) == 1
    assert orphans(FLAVOUR, parent=stranger.parent) == [("", stranger.name)]
    assert_running(corrald, job_id)


async def test_a_second_corrald_on_a_state_directory_in_use_touches_nothing(
    corrald: Daemon, pki_dir: Path
) -> None:
    job_id = await start_sleeper(corrald, pki_dir)
    before = orphans(FLAVOUR, parent=TEST_CGROUP_PARENT)
    code, stderr = await trio.to_thread.run_sync(
        refused, "--state-dir", str(corrald.state_dir), "--pki", str(pki_dir),
        "--listen", "127.0.0.1:0",
    )  # fmt: skip
    assert (code, stderr.count("\n")) == (69, 1), stderr
    assert f"state directory {corrald.state_dir} is in use by another corrald" in stderr
    assert ("owner-admin-admin", job_id) in before
    # Its jobs' cgroups are all there still (the first corrald's sandboxes
    # built ahead come and go as it aims them at its last starter).
    jobs = {entry for entry in before if (corrald.state_dir / "jobs" / entry[1]).exists()}
    assert jobs <= set(orphans(FLAVOUR, parent=TEST_CGROUP_PARENT))
    assert_running(corrald, job_id)


async def test_two_corralds_with_default_settings_keep_out_of_each_others_jobs(
    pki_dir: Path, short_dir: Path
) -> None:
    first_dir, second_dir = short_dir / "a", short_dir / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    parents = [derived_parent(first_dir / "state"), derived_parent(second_dir / "state")]
    assert parents[0] != parents[1]
    try:
        with running_corrald(pki_dir, first_dir, cgroup_parent=None) as first:
            job_id = await start_sleeper(first, pki_dir)
            with running_corrald(pki_dir, second_dir, cgroup_parent=None) as second:
                # The second is serving: its start-up, sweep included, is over.
                assert_running(first, job_id, parent=parents[0])
                assert recorded_parent(first.state_dir) == parents[0]
                assert recorded_parent(second.state_dir) == parents[1]
        # Each removed its parent as it stopped: nothing was left in it.
        for parent in parents:
            paths = open_cgroup(FLAVOUR, "x", parent=parent).paths()
            assert not any(path.parent.exists() for path in paths), parent
    finally:
        for parent in parents:
            clear_cgroup_parent(FLAVOUR, parent)


# -- the cgroup parent ----------------------------------------------------------------


def test_the_default_parent_is_the_state_directorys_own_and_is_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True)
    derived = default_parent(state)
    assert re.fullmatch(r"corral-[0-9a-f]{8}", derived)
    assert derived == derived_parent(state) != derived_parent(tmp_path / "other")
    record_parent(state, "chosen-on-an-earlier-run")
    assert default_parent(state) == "chosen-on-an-earlier-run"
    # Moved elsewhere, it keeps the one its jobs' cgroups are under.
    moved = tmp_path / "moved"
    state.rename(moved)
    assert default_parent(moved) == "chosen-on-an-earlier-run"


def test_a_state_directory_from_before_parents_were_recorded_keeps_corral(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    job = state / "jobs" / new_job_id()
    job.mkdir(parents=True)
    write_status(job, Status(state=State.EXITED, exit_code=0))
    assert default_parent(state) == derived_parent(state)  # nothing left running under corral
    write_status(job, Status(state=State.RUNNING))
    assert default_parent(state) == LEGACY_PARENT  # its running job's cgroup is there


def test_a_bad_recorded_parent_is_named(tmp_path: Path) -> None:
    (tmp_path / "cgroup-parent").write_text("a/b\n")
    with pytest.raises(ParentError, match=r"cgroup-parent: invalid cgroup parent 'a/b'"):
        default_parent(tmp_path)


def test_a_claimed_parent_cannot_be_claimed_again_until_let_go(tmp_path: Path) -> None:
    claim = claim_parent("p", run_dir=tmp_path)
    with pytest.raises(ParentError) as caught:
        claim_parent("p", run_dir=tmp_path)
    assert str(caught.value) == (
        f"cgroup parent p is in use by another corrald (pid {os.getpid()}); "
        "give this one its own with --cgroup-parent NAME"
    )
    claim_parent("q", run_dir=tmp_path).close()  # another parent is free
    claim.close()
    assert list(tmp_path.iterdir()) == []  # let go cleanly: nothing left behind
    (tmp_path / "cgroup-p.lock").write_text("4242\n")  # left by a corrald that crashed
    again = claim_parent("p", run_dir=tmp_path)
    assert (tmp_path / "cgroup-p.lock").read_text() == f"{os.getpid()}\n"
    again.close()


def test_help_says_what_the_default_parent_is() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "else corral-HASH, HASH being 8 hex digits of a hash of the state directory" in text


# -- shutdown -------------------------------------------------------------------------


async def ask_until_refused(client: Client) -> None:
    """Ask `info` until corrald's goodbye arrives."""
    with trio.fail_after(10):
        while True:
            await client.info()


async def test_a_follower_gets_its_jobs_end_before_corrald_says_goodbye(
    corrald: Daemon, pki_dir: Path
) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["sh", "-c", "echo ready; exec sleep 1000"])
        async with alice.logs(job.id, follow=True) as stream:
            records = aiter(stream)
            assert (await anext(records)).data == b"ready\n"
            corrald.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                async for record in records:  # a goodbye first would raise here
                    raise AssertionError(f"unexpected output {record}")
        # The goodbye comes after the end.
        with pytest.raises(ServerError, match="corrald is shutting down"):
            await ask_until_refused(alice)
    assert stream.job is not None
    assert stream.job.state == "stopped"
    assert stream.job.raw["stopped_by"] == "corrald shutting down"
    assert stream.job.reason == "stopped by corrald shutting down; killed by SIGTERM"
    assert await trio.to_thread.run_sync(corrald.process.wait, 30) == 0


async def test_a_second_signal_kills_the_jobs_a_shutdown_is_waiting_for(
    corrald: Daemon, pki_dir: Path
) -> None:
    deaf = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        job = await admin.start(["sh", "-c", deaf])
        async with admin.logs(job.id, follow=True) as stream:
            assert (await anext(aiter(stream))).data == b"ready\n"
    corrald.process.send_signal(signal.SIGTERM)
    await until(lambda: "stopping 1 running jobs" in corrald.log.read_text())
    corrald.process.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(corrald.process.wait, 30) == 0
    status = read_status(corrald.state_dir / "jobs" / job.id)
    assert status is not None
    assert (status.state, status.signal) == (State.STOPPED, "SIGKILL")
    assert "SIGTERM again: killing the jobs now" in corrald.log.read_text()


# -- make run ---------------------------------------------------------------------------


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_make_run_takes_its_address_and_state_directory_from_variables(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path}/venv"  # not there: the set-up steps show too
    ours = make("-n", "run", venv, "LISTEN=127.0.0.1:7444", "STATE=var2").stdout.splitlines()
    assert ours[-1].endswith(
        "/corrald --state-dir var2 --init-pki --listen 127.0.0.1:7444 "
        "--listen unix:var2/corrald.sock"
    )
    default = make("-n", "run", venv).stdout.splitlines()
    assert default[-1].endswith(
        "/corrald --state-dir var --init-pki --listen 127.0.0.1:7443 --listen unix:var/corrald.sock"
    )


def test_the_first_make_run_says_it_is_setting_up_the_venv(tmp_path: Path) -> None:
    # A python that fails at once: what is said before the venv is made shows.
    result = make("run", f"VENV={tmp_path}/venv", "PYTHON=false")
    assert result.returncode != 0
    assert result.stdout.splitlines()[0] == (
        f"setting up {tmp_path}/venv with corral and its dev tools (first run only)"
    )


# -- corrald's flags: realistic values accepted, absurd ones refused ------------------

REALISTIC_FLAGS = [
    ("--handshake-timeout", "30", "handshake_timeout", 30.0),
    ("--max-connections", "20000", "max_connections", 20000),
    ("--max-requests", "256", "max_requests", 256),
    ("--max-connections-per-user", "4096", "max_connections_per_user", 4096),
    ("--io-timeout", "300", "io_timeout", 300.0),
    ("--idle-timeout", "86400", "idle_timeout", 86400.0),
    ("--max-jobs", "5000", "max_jobs", 5000),
    ("--max-jobs-per-user", "2000", "max_jobs_per_user", 2000),
    ("--warm", "4", "warm", 4),
    ("--warm", "0", "warm", 0),
    ("--keep-finished", "100", "keep_finished", 100),
    ("--keep-finished", "0", "keep_finished", 0),
    ("--keep-finished", "100000", "keep_finished", 100000),
    ("--keep-for", "7d", "keep_for", 7 * 86400.0),
    ("--keep-log-size", "10G", "keep_log_size", 10 << 30),
]


@pytest.mark.parametrize(
    ("flag", "value", "dest", "expected"),
    REALISTIC_FLAGS,
    ids=[f"{flag} {value}" for flag, value, _, _ in REALISTIC_FLAGS],
)
def test_each_count_size_and_duration_flag_takes_a_realistic_value(
    flag: str, value: str, dest: str, expected: float
) -> None:
    args = build_parser().parse_args([flag, value])
    assert getattr(args, dest) == expected


ABSURD_FLAGS = [
    ("--handshake-timeout", "0", "must be more than 0 and at most 3600 seconds"),
    ("--handshake-timeout", "nan", "must be more than 0 and at most 3600 seconds"),
    ("--handshake-timeout", "soon", "not a number of seconds: 'soon'"),
    ("--max-connections", "0", "must be between 1 and 1048576"),
    ("--max-requests", "10000000", "must be between 1 and 100000"),
    ("--max-connections-per-user", "-1", "must be between 1 and 1048576"),
    ("--io-timeout", "1e9", "must be more than 0 and at most 86400 seconds"),
    ("--idle-timeout", "inf", "must be more than 0 and at most 604800 seconds"),
    ("--max-jobs", "0", "must be between 1 and 100000"),
    ("--max-jobs", "1e6", "not a whole number: '1e6'"),
    ("--max-jobs-per-user", "1000000000", "must be between 1 and 100000"),
    ("--warm", "65", "must be between 0 and 64"),
    ("--keep-finished", "-1", "must be between 0 and 10000000"),
    ("--keep-finished", "many", "not a whole number: 'many'"),
    ("--keep-for", "forever", "not a duration: 'forever'"),
    ("--keep-log-size", "0", "not a size: '0'"),
]


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    ABSURD_FLAGS,
    ids=[f"{flag} {value}" for flag, value, _ in ABSURD_FLAGS],
)
def test_an_absurd_flag_value_is_refused_saying_why(
    flag: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {words}" in capsys.readouterr().err


# -- modes, whatever the umask -------------------------------------------------------


def test_modes_do_not_depend_on_the_umask(pki_dir: Path, short_dir: Path) -> None:
    """Under umask 0, what corral creates keeps its own modes: the PKI's and
    the state directory's missing parents 0700, corrald's unix socket 0600
    (at 0777 a job could reach corrald's TLS layer through it)."""
    pki = short_dir / "a" / "b" / "pki"
    made = subprocess.run(
        [sys.executable, "-m", "corral.client.cli", "certs", "init", str(pki)],
        preexec_fn=lambda: os.umask(0),
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    for directory in (short_dir / "a", short_dir / "a" / "b", pki):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    state = short_dir / "c" / "d" / "state"
    socket_path = short_dir / "e" / "corrald.sock"
    process = subprocess.Popen(
        [*CORRALD, "--state-dir", str(state), "--pki", str(pki_dir),
         "--listen", f"unix:{socket_path}", "--cgroup-parent", TEST_CGROUP_PARENT],
        preexec_fn=lambda: os.umask(0),  # noqa: PLW1509
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert "listening on" in process.stdout.readline()
        for directory in (short_dir / "c", short_dir / "c" / "d", state, short_dir / "e"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    finally:
        process.terminate()
        process.communicate(timeout=30)

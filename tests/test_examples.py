"""Every script in examples/ runs to completion against a real corrald, and
says what it should."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Daemon, identity, running_corrald

EXAMPLES_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
# Examples that start jobs need what jobs need.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")
JOBS = [pytest.mark.jobs, NEEDS_ROOT]
NO_JOBS = {"info.py"}


@pytest.fixture(scope="module")
def corrald(pki_dir: Path) -> Iterator[Daemon]:
    """One corrald for the whole module: every example ends and removes the
    jobs it starts (test_example_runs_and_leaves_no_job checks it), so they
    do not meet, and the suite starts one corrald instead of twenty."""
    directory = Path(tempfile.mkdtemp(prefix="corral-"))
    try:
        with running_corrald(pki_dir, directory) as daemon:
            yield daemon
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_example(
    script: Path, address: str, identity_dir: Path, *, status: int = 0, **env: str
) -> str:
    """Run `script` as a person would, after the paste line, with `env` added
    to its environment; check it exits with `status` (and, failing, says why
    in one line on stderr); return its stdout."""
    env = dict(os.environ, CORRAL_ADDR=address, CORRAL_IDENTITY=str(identity_dir), **env)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == status, result.stdout + result.stderr
    if status == 0:
        assert result.stdout
    else:
        assert result.stderr.startswith(f"{script.name}: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    return result.stdout


def job_dirs(daemon: Daemon) -> list[str]:
    """The jobs corrald holds (a sandbox built ahead has no directory yet)."""
    jobs = daemon.state_dir / "jobs"
    return sorted(path.name for path in jobs.iterdir()) if jobs.exists() else []


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=[] if p.name in NO_JOBS else JOBS) for p in EXAMPLES],
    ids=[p.name for p in EXAMPLES],
)
def test_example_runs_and_leaves_no_job(script: Path, corrald: Daemon, pki_dir: Path) -> None:
    run_example(script, corrald.tcp, identity(pki_dir, "admin"))
    assert job_dirs(corrald) == []


def test_info_example_reports_the_identity(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(EXAMPLES_DIR / "info.py", corrald.unix, identity(pki_dir, "bob"))
    assert "knows us as bob (user)" in output


JOB_EXAMPLES = [p for p in EXAMPLES if p.name not in NO_JOBS]


@pytest.mark.parametrize("script", JOB_EXAMPLES, ids=[p.name for p in JOB_EXAMPLES])
def test_job_example_fails_in_one_line_when_corrald_is_gone(script: Path, pki_dir: Path) -> None:
    # Port 1 on loopback: nothing listens there. 69: cannot be reached.
    run_example(script, "127.0.0.1:1", identity(pki_dir, "admin"), status=69)


@pytest.mark.jobs
@NEEDS_ROOT
def test_run_and_follow_shows_both_streams_in_order_and_the_exit_code(
    corrald: Daemon, pki_dir: Path
) -> None:
    output = run_example(
        EXAMPLES_DIR / "run_and_follow.py", corrald.unix, identity(pki_dir, "admin")
    )
    # Each stream in order (between the two, the order of writes so close
    # together is the shim's to choose).
    records = re.findall(r"^  \+-?[\d.]+ s  (stdout|stderr): (.+?) +\(here", output, re.MULTILINE)
    assert [line for name, line in records if name == "stdout"] == [
        f"step {i} of 4" for i in range(1, 5)
    ]
    assert [line for name, line in records if name == "stderr"] == [
        *(f"warning: step {i} is slow" for i in range(1, 5)),
        "giving up",
    ]
    assert "the job has ended: state exited, exit code 3" in output
    assert "corral's reason: exited with code 3" in output


@pytest.mark.jobs
@NEEDS_ROOT
def test_many_followers_all_get_the_same_bytes(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(
        EXAMPLES_DIR / "many_followers.py", corrald.tcp, identity(pki_dir, "admin")
    )
    followers = re.findall(
        r"follower +\d+ joined at [\d.]+ s: (\d+) bytes \(4194304 stdout, 4 stderr lines\), "
        r"sha256 (\w+)",
        output,
    )
    assert len(followers) == 20
    assert len(set(followers)) == 1
    assert "all 20 followers got the same" in output
    late = re.search(r"the job ended at [\d.]+ s; (\d+) followers joined after that", output)
    assert late is not None
    assert int(late.group(1)) >= 1  # the last ones join 1.33 s in, a job of about 1 s


@pytest.mark.jobs
@NEEDS_ROOT
def test_limits_example_shows_throttling_and_an_oom_kill(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(EXAMPLES_DIR / "limits.py", corrald.unix, identity(pki_dir, "admin"))
    throttled = re.search(r"limits=\{'cpu': 0.25\} +ran ([\d.]+) s and used ([\d.]+) s", output)
    assert throttled is not None, output
    wall, used = float(throttled.group(1)), float(throttled.group(2))
    assert 1.9 <= wall < 4
    assert 0.15 * wall <= used <= 0.30 * wall
    assert "signal: SIGKILL  oom_killed: True" in output
    assert "reason: killed by SIGKILL: out of memory" in output
    assert "NOT AS EXPECTED" not in output


@pytest.mark.jobs
@NEEDS_ROOT
def test_isolation_tour_claims_hold(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(
        EXAMPLES_DIR / "isolation_tour.py", corrald.tcp, identity(pki_dir, "admin")
    )
    assert "NOT AS EXPECTED" not in output
    assert re.search(r"^ +1 +0 job +corral-init ", output, re.MULTILINE)
    assert re.search(r"^    1: lo: <LOOPBACK,UP", output, re.MULTILINE)
    assert re.search(r"^    uid=(\d+)\(job\) gid=\1\(job\)", output, re.MULTILINE)
    hostname = re.search(r"^\$ hostname\n    (\w+)\n.*short id, (\w+)$", output, re.MULTILINE)
    assert hostname is not None
    assert hostname.group(1) == hostname.group(2)
    assert "    tmpfs /tmp tmpfs " in output
    assert "    /etc no" in output


@pytest.mark.jobs
@NEEDS_ROOT
def test_admin_vs_user_alice_cannot_see_the_admins_job(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(
        EXAMPLES_DIR / "admin_vs_user.py", corrald.tcp, identity(pki_dir, "admin"),
        CORRAL_USER_IDENTITY=str(identity(pki_dir, "alice")),
    )  # fmt: skip
    assert "NOT AS EXPECTED" not in output
    assert "connected as admin (admin) and as alice (user)" in output
    assert "alice lists her jobs: none; the admin's is not there" in output
    not_found = re.findall(r"alice asks the status of (.+): not_found: no job '\w+'", output)
    assert not_found == ["the admin's job", "a job that never was"]
    assert re.search(r"owner admin +running", output)
    assert re.search(r"owner alice +running", output)
    assert "alice asks to run a job as root: permission_denied:" in output
    assert "stopped and removed the 2 jobs; 0 left" in output
    assert job_dirs(corrald) == []


@pytest.mark.jobs
@NEEDS_ROOT
def test_admin_vs_user_needs_an_admin(corrald: Daemon, pki_dir: Path) -> None:
    run_example(
        EXAMPLES_DIR / "admin_vs_user.py", corrald.tcp, identity(pki_dir, "bob"), status=78,
    )  # fmt: skip
    assert job_dirs(corrald) == []


@pytest.mark.parametrize("script", JOB_EXAMPLES, ids=[p.name for p in JOB_EXAMPLES])
def test_job_example_ends_on_ctrl_c_with_130_and_no_traceback(
    script: Path, corrald: Daemon, pki_dir: Path
) -> None:
    env = dict(
        os.environ,
        CORRAL_ADDR=corrald.tcp,
        CORRAL_IDENTITY=str(identity(pki_dir, "admin")),
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    # Interrupted once its first job exists: mid-way, with something to clean up.
    deadline = time.monotonic() + 30
    while not job_dirs(corrald) and process.poll() is None:
        assert time.monotonic() < deadline, "the example started no job"
        time.sleep(0.005)  # what another process does, looked at: see conftest.until
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert job_dirs(corrald) == []


def test_the_readmes_python_runs_as_written(corrald: Daemon, pki_dir: Path) -> None:
    readme = (EXAMPLES_DIR.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) == 1
    code = (
        blocks[0]
        .replace('"127.0.0.1:7443"', repr(corrald.tcp))
        .replace('"var/pki/clients/admin"', repr(str(identity(pki_dir, "admin"))))
    )
    assert code != blocks[0]  # the address and identity were found and replaced
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exited" in result.stdout


@pytest.mark.jobs
@NEEDS_ROOT
def test_tarball_example_feeds_a_job_its_stdin(corrald: Daemon, pki_dir: Path) -> None:
    out = run_example(EXAMPLES_DIR / "tarball.py", corrald.tcp, identity(pki_dir, "admin"))
    assert "then EOF" in out
    assert "built: 9" in out
    assert "count.txt" in out  # what the build left in the job's /tmp/src

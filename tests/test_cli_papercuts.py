"""What the CLI tells a person in their first hour, through a real corrald:
pipelines that close, offsets, timestamps per line, how each job ended,
several ids at once, a failed start's id, a timeout said out loud."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Daemon, identity, running_corrald
from .test_cli import CORRAL, corral

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

Corral = Callable[..., subprocess.CompletedProcess[str]]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


def _env(corrald: Daemon, pki_dir: Path, name: str = "admin") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_ADDR=corrald.tcp, CORRAL_IDENTITY=str(identity(pki_dir, name)))
    return env


@pytest.fixture
def admin(corrald: Daemon, pki_dir: Path) -> Corral:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return corral(*args, env=_env(corrald, pki_dir))

    return run


def _start(admin: Corral, *argv: str) -> str:
    started = admin("start", "--", *argv)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


# -- pipelines -------------------------------------------------------------------


def _read_lines_then_close(command: list[str], env: dict[str, str], lines: int) -> tuple[int, str]:
    """Run `command` with its stdout a pipe; read `lines` lines, then close
    the pipe as `head` does; return its status and stderr."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    assert process.stdout is not None
    assert process.stderr is not None
    for _ in range(lines):
        assert process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    return process.wait(timeout=60), stderr


def test_run_into_a_closed_pipe_ends_quietly_and_stops_its_job(
    corrald: Daemon, pki_dir: Path, admin: Corral
) -> None:
    status, stderr = _read_lines_then_close(
        [*CORRAL, "run", "--", "yes"], _env(corrald, pki_dir), 2
    )
    assert (status, stderr) == (141, "")  # 128 + SIGPIPE, as a shell reports `yes | head`
    listed = json.loads(admin("--json", "ps", "-n", "1").stdout)
    assert listed[0]["argv"] == ["yes"]
    assert listed[0]["state"] == "stopped"  # nobody reads it: it does not run on


def test_logs_into_a_closed_pipe_ends_quietly(
    corrald: Daemon, pki_dir: Path, admin: Corral
) -> None:
    job_id = _start(admin, "seq", "1", "200000")
    assert admin("logs", "-f", job_id).returncode == 0  # the whole log is there
    command = [*CORRAL, "logs", job_id]
    status, stderr = _read_lines_then_close(command, _env(corrald, pki_dir), 1)
    assert (status, stderr) == (141, "")


@pytest.mark.parametrize("command", [["ps"], ["--json", "ps"], ["info"]])
def test_a_listing_into_a_closed_pipe_ends_quietly(
    corrald: Daemon, pki_dir: Path, admin: Corral, command: list[str]
) -> None:
    _start(admin, "true")
    env = _env(corrald, pki_dir)
    env.pop("PYTHONUNBUFFERED", None)  # stdout buffered, as a pipe's is: written at the end
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first byte: any write fails
    try:
        result = subprocess.run(
            [*CORRAL, *command], stdout=write, stderr=subprocess.PIPE, env=env,
            text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


# -- offsets and timestamps ------------------------------------------------------


def test_an_offset_inside_a_record_is_refused_naming_the_nearest(admin: Corral) -> None:
    job_id = _start(admin, "sh", "-c", "echo one; sleep 0.2; echo two")
    whole = admin("--json", "logs", "-f", job_id)
    end = json.loads(whole.stdout.splitlines()[-1])["end"]["offset"]
    refused = admin("logs", "--since-offset", "5", job_id)
    assert refused.returncode == 1
    found = re.search(r"nearest that work are 0 and (\d+)", refused.stderr)
    assert found, refused.stderr
    assert "log is damaged" not in refused.stderr
    second = int(found[1])
    assert 0 < second < end
    rest = admin("logs", "--since-offset", str(second), job_id)
    assert (rest.returncode, rest.stdout) == (0, "two\n"), rest.stderr
    at_end = admin("logs", "--since-offset", str(end), job_id)
    assert (at_end.returncode, at_end.stdout) == (0, "")
    beyond = admin("logs", "--since-offset", str(end + 1), job_id)
    assert beyond.returncode == 1
    assert f"the nearest that works is {end}" in beyond.stderr


def test_timestamps_stamp_each_line_not_each_write(admin: Corral) -> None:
    script = "printf abc; sleep 0.1; printf 'def\\nghi\\n'; sleep 0.1; printf 'jkl\\n'"
    job_id = _start(admin, "sh", "-c", script)
    result = admin("logs", "-f", "--timestamps", job_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["abcdef", "ghi", "jkl"]
    assert all(re.fullmatch(STAMP, line.split(" ", 1)[0]) for line in lines), lines


# -- how jobs ended ----------------------------------------------------------------


def test_ps_shows_how_each_job_ended_newest_first_with_filters(admin: Corral) -> None:
    commands = [
        ["true"],
        ["sh", "-c", "exit 4"],
        ["sh", "-c", "kill -KILL $$"],
        ["--timeout", "200ms", "--", "sleep", "60"],
    ]
    for argv in commands:
        admin("run", *(argv if argv[0] == "--timeout" else ["--", *argv]))
    running = _start(admin, "sleep", "60")
    table = admin("ps").stdout.splitlines()
    assert table[0].split() == ["ID", "OWNER", "STATE", "AGE", "COMMAND"]
    states = [re.split(r"\s{2,}", row)[2] for row in table[1:6]]
    assert states == ["running", "timeout", "killed (SIGKILL)", "exited (4)", "exited (0)"]
    assert admin("ps", "-q", "-n", "1").stdout == f"{running[:12]}\n"
    finished = admin("ps", "-q", "--state", "finished").stdout.split()
    assert running[:12] not in finished
    assert len(finished) == 4
    assert admin("ps", "-q", "--state", "running").stdout.split() == [running[:12]]
    assert json.loads(admin("--json", "ps", "-n", "2").stdout)[1]["outcome"] == "timeout"
    admin("stop", "--grace", "0", running)


def test_run_says_when_its_timeout_stopped_the_job(admin: Corral) -> None:
    result = admin("run", "--timeout", "300ms", "--", "sleep", "60")
    assert result.returncode == 143
    assert "reached its timeout (300ms)" in result.stderr
    job_id = admin("ps", "-q", "-n", "1").stdout.strip()
    shown = admin("status", job_id).stdout
    assert re.search(r"^timeout:\s+300ms$", shown, re.MULTILINE), shown
    assert re.search(r"^state:\s+timeout$", shown, re.MULTILINE), shown


def test_stop_and_rm_take_several_ids_and_an_ended_job_is_stopped_already(
    admin: Corral,
) -> None:
    first, second = _start(admin, "sleep", "60"), _start(admin, "sleep", "60")
    stopped = admin("stop", "--grace", "0", first, second)
    assert stopped.returncode == 0, stopped.stderr
    assert [line.split()[0] for line in stopped.stdout.splitlines()] == [first[:12], second[:12]]
    again = admin("stop", first)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{first[:12]} had already ended: stopped by admin")
    as_json = json.loads(admin("--json", "stop", first).stdout)
    assert as_json["already_ended"] is True
    partly = admin("rm", first, "nope", second)
    assert partly.returncode == 1
    assert partly.stdout.split() == [first, second]
    assert partly.stderr == "corral: error: no job 'nope'\n"


def test_rm_finished_removes_every_finished_job_and_no_running_one(admin: Corral) -> None:
    for _ in range(3):
        admin("run", "--", "true")
    running = _start(admin, "sleep", "60")
    removed = admin("rm", "--finished")
    assert removed.returncode == 0, removed.stderr
    assert len(removed.stdout.split()) == 3
    assert "removed 3 finished jobs" in removed.stderr
    assert admin("ps", "-q").stdout.split() == [running[:12]]
    assert admin("rm", "--finished", running).returncode == 2
    admin("stop", "--grace", "0", running)


def test_a_refused_start_names_the_job_it_recorded(admin: Corral) -> None:
    refused = admin("start", "--", "no-such-command-here")
    assert refused.returncode == 1
    found = re.search(r"\(job ([0-9a-f]{12}), recorded as failed", refused.stderr)
    assert found, refused.stderr
    assert admin("ps", "-q", "-n", "1").stdout.strip() == found[1]
    as_json = json.loads(admin("--json", "start", "--", "no-such-command-here").stdout)
    assert len(as_json["error"]["details"]["job"]) == 32
    run = admin("run", "--", "no-such-command-here")
    assert run.returncode == 127
    assert "recorded as failed" in run.stderr


def test_run_says_when_corrald_shutting_down_stopped_its_job(
    pki_dir: Path, short_dir: Path
) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        env = _env(daemon, pki_dir)
        run = subprocess.Popen(
            [*CORRAL, "run", "--", "sh", "-c", "echo started; exec sleep 300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert run.stdout is not None
        assert run.stderr is not None
        assert run.stdout.readline() == "started\n"
        daemon.process.terminate()
        assert run.wait(timeout=30) == 143
        assert "stopped by corrald shutting down" in run.stderr.read()
        assert daemon.process.wait(timeout=30) == 0

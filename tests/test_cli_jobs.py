"""Jobs through a real corrald over mutual TLS: the CLI and the async client."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from corral.client.client import connect
from corral.client.errors import ServerError
from corral.job import State
from corral.protocol import ErrorCode
from corral.shim.oom import oom_score_pinned
from corral.store import read_status
from corral.supervisor.policy import builtin_user_caps, builtin_user_quota
from corral.units import short_size

from .conftest import Daemon, identity, running_corrald
from .test_cli import corral

pytestmark = [
    pytest.mark.jobs,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
]

JOB_KEYS = {
    "id", "owner", "owner_role", "argv", "state", "exit_code", "signal", "oom_killed", "reason",
    "created_at", "started_at", "finished_at", "limits", "usage", "outcome", "user",
    "max_runtime", "stopped_by", "stdin", "tty", "uid", "host_root", "seccomp",
}  # fmt: skip
USAGE_KEYS = {"cpu_seconds", "memory_peak_bytes", "io_read_bytes", "io_write_bytes"}


@pytest.fixture
def as_user(corrald: Daemon, pki_dir: Path) -> Callable[..., object]:
    """corral, as NAME, against the test corrald."""

    def run(name: str, *args: str) -> object:
        env = {"CORRAL_ADDR": corrald.tcp, "CORRAL_IDENTITY": str(identity(pki_dir, name))}
        return corral(*args, env=env)

    return run


def test_start_status_ps_stop_rm_as_json(as_user: Callable[..., object]) -> None:
    started = as_user("alice", "start", "--json", "--memory", "64M", "--cpu", "0.5",
                      "--pids", "30", "--", "sh", "-c", "echo hi; sleep 1000")  # fmt: skip
    assert started.returncode == 0, started.stderr  # type: ignore[attr-defined]
    job_id = json.loads(started.stdout)["id"]  # type: ignore[attr-defined]
    assert len(job_id) == 32

    status = as_user("alice", "status", "--json", job_id[:6])
    job = json.loads(status.stdout)  # type: ignore[attr-defined]
    assert set(job) == JOB_KEYS
    assert set(job["usage"]) == USAGE_KEYS
    assert job["id"] == job_id
    assert job["owner"] == "alice"
    assert job["argv"] == ["sh", "-c", "echo hi; sleep 1000"]
    assert job["state"] == "running"
    assert job["limits"] == {"memory": 64 << 20, "cpu": 0.5, "pids": 30}
    assert job["started_at"].endswith("Z")
    assert job["finished_at"] is None

    listed = json.loads(as_user("alice", "ps", "--json").stdout)  # type: ignore[attr-defined]
    assert [j["id"] for j in listed] == [job_id]
    assert json.loads(as_user("bob", "ps", "--json").stdout) == []  # type: ignore[attr-defined]

    stopped = as_user("alice", "stop", "--json", "--grace", "2s", job_id)
    final = json.loads(stopped.stdout)  # type: ignore[attr-defined]
    assert final["state"] == "stopped"
    assert final["signal"] == "SIGTERM"
    assert final["reason"] == "stopped by alice; killed by SIGTERM"

    again = as_user("alice", "stop", "--json", job_id)
    assert again.returncode == 0  # type: ignore[attr-defined]
    ended = json.loads(again.stdout)  # type: ignore[attr-defined]
    assert ended["already_ended"] is True
    assert ended["reason"] == final["reason"]

    removed = as_user("alice", "rm", job_id[:8])
    assert removed.stdout.strip() == job_id  # type: ignore[attr-defined]
    assert json.loads(as_user("alice", "ps", "--json").stdout) == []  # type: ignore[attr-defined]


def test_human_output(as_user: Callable[..., object]) -> None:
    job_id = as_user("bob", "start", "--", "sh", "-c", "exit 3").stdout.strip()  # type: ignore[attr-defined]
    table = as_user("bob", "ps").stdout.splitlines()  # type: ignore[attr-defined]
    assert table[0].split() == ["ID", "OWNER", "STATE", "AGE", "COMMAND"]
    assert table[1].split()[:2] == [job_id[:12], "bob"]
    assert table[1].endswith("sh -c exit 3")
    status = as_user("bob", "status", job_id).stdout  # type: ignore[attr-defined]
    assert "exited with code 3" in status or "running" in status


@pytest.mark.parametrize(
    ("who", "args", "status", "words"),
    [
        ("alice", ["start", "--", "no-such-program-xyz"], 1, "cannot run 'no-such-program-xyz'"),
        ("alice", ["start", "--user", "root", "--", "true"], 77, "only an admin may choose"),
        ("alice", ["start", "--memory", "1", "--", "true"], 1, "limits.memory: must be between"),
        ("alice", ["start", "--memory", "lots", "--", "true"], 2, "not a size: 'lots'"),
        ("alice", ["start"], 2, "start needs a command"),
        ("alice", ["status", "ffffffff"], 1, "no job 'ffffffff'"),
        ("alice", ["stop", "--grace", "soon", "x"], 2, "not a duration: 'soon'"),
    ],
)
def test_errors_are_one_line(
    as_user: Callable[..., object], who: str, args: list[str], status: int, words: str
) -> None:
    result = as_user(who, *args)
    assert result.returncode == status, result.stderr  # type: ignore[attr-defined]
    assert words in result.stderr  # type: ignore[attr-defined]
    assert result.stderr.count("\n") == 1 or status == 2  # type: ignore[attr-defined]


async def test_another_users_job_looks_like_no_job(corrald: Daemon, pki_dir: Path) -> None:
    async with (
        connect(corrald.tcp, identity(pki_dir, "alice")) as alice,
        connect(corrald.tcp, identity(pki_dir, "bob")) as bob,
        connect(corrald.unix, identity(pki_dir, "admin")) as admin,
    ):
        job = await alice.start(["sleep", "1000"])
        for call in (bob.status, bob.stop, bob.remove):
            with pytest.raises(ServerError) as caught:
                await call(job.id)
            assert caught.value.code is ErrorCode.NOT_FOUND
            assert str(caught.value) == f"no job {job.id!r}"
        assert [j.id for j in await admin.list(everyone=True)] == [job.id]
        assert await admin.list() == []  # without --all, an admin sees their own
        with pytest.raises(ServerError, match="is running; stop it first"):
            await alice.remove(job.id)
        final = await admin.stop(job.id, grace=0)
        assert final.state == "stopped"
        assert final.signal == "SIGKILL"
        assert (await alice.status(job.id[:10])).reason.startswith("stopped by admin")
        info = await admin.info()
        assert info.jobs == 1


async def test_admin_runs_as_root_with_binary_arguments(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        job = await admin.start([b"sh", b"-c", b'id -u; printf "%s" "$1"', b"sh", b"\xff\x00"[:1]],
                                user="root")  # fmt: skip
        status = await admin.wait(job.id)
    assert status.exit_code == 0
    assert status.to_json()["argv"][-1] == "\\xff"
    log = (corrald.state_dir / "jobs" / job.id / "output.log").read_bytes()
    assert b"0\n" in log
    assert b"\xff" in log


async def test_a_job_outlives_corrald(corrald: Daemon, pki_dir: Path) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "admin")) as admin:
        job = await admin.start(["sleep", "1000"])
    corrald.process.kill()  # SIGKILL: no goodbye, no cleanup
    await trio.to_thread.run_sync(corrald.process.wait)
    status = read_status(corrald.state_dir / "jobs" / job.id)
    assert status is not None
    assert status.state is State.RUNNING
    assert status.shim_pid is not None
    assert status.pid is not None
    # The shim and the job's init are alive, and nobody's children in corrald.
    for pid in (status.shim_pid, status.pid):
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_corrald_stops_cleanly_after_starting_jobs(
    corrald: Daemon, as_user: Callable[..., object]
) -> None:
    started = as_user("alice", "start", "--", "sleep", "1000")
    assert started.returncode == 0, started.stderr  # type: ignore[attr-defined]
    corrald.process.terminate()
    stderr = corrald.wait()
    assert corrald.process.returncode == 0, stderr
    assert "Traceback" not in stderr


COMMANDS = [
    ["info"], ["start"], ["run"], ["logs"], ["stop"], ["status"], ["ps"], ["rm"], ["shell"],
    ["certs"], ["certs", "init"], ["certs", "issue"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = corral(*command, "--help")
    assert result.returncode == 0, result.stderr
    example = result.stdout.split("example:\n", 1)[1]
    assert example.lstrip().startswith("corral ")


def test_logs_and_run_as_json_lines(as_user: Callable[..., object]) -> None:
    script = "printf 'out\\n'; printf '\\377\\0' >&2; exit 5"
    ran = as_user("alice", "run", "--json", "--", "sh", "-c", script)
    assert ran.returncode == 5, ran.stderr  # type: ignore[attr-defined]
    lines = [json.loads(line) for line in ran.stdout.splitlines()]  # type: ignore[attr-defined]
    records, end = lines[:-1], lines[-1]["end"]
    assert sorted((r["stream"], r.get("data"), r.get("data_base64")) for r in records) == [
        ("stderr", None, "/wA="),  # not UTF-8: base64
        ("stdout", "out\n", None),
    ]
    assert all(r["time"].endswith("Z") for r in records)
    assert (end["job"]["state"], end["job"]["exit_code"]) == ("exited", 5)
    job_id = end["job"]["id"]
    logs = as_user("alice", "logs", "--json", "--stdout", job_id[:8])
    lines = [json.loads(line) for line in logs.stdout.splitlines()]  # type: ignore[attr-defined]
    assert [line.get("data") for line in lines[:-1]] == ["out\n"]
    assert lines[-1]["end"]["offset"] == end["offset"] > 0


async def test_an_ambiguous_prefix_names_the_candidates(
    corrald: Daemon, pki_dir: Path, as_user: Callable[..., object]
) -> None:
    # 17 ids cannot all start with different hex digits.
    async with connect(corrald.tcp, identity(pki_dir, "bob")) as bob:
        ids = [(await bob.start(["true"])).id for _ in range(17)]
    first = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    matching = sorted(i[:12] for i in ids if i.startswith(first))
    result = await trio.to_thread.run_sync(as_user, "bob", "status", first)
    assert result.returncode == 1  # type: ignore[attr-defined]
    assert result.stderr == (  # type: ignore[attr-defined]
        f"corral: error: job id prefix {first!r} is ambiguous: it matches "
        f"{', '.join(matching)}; give more of the id\n"
    )
    # Another user's jobs are not candidates: for alice the prefix names nothing.
    result = await trio.to_thread.run_sync(as_user, "alice", "status", first)
    assert f"no job {first!r}" in result.stderr  # type: ignore[attr-defined]


def test_info_shows_the_terms_jobs_start_under(as_user: Callable[..., object]) -> None:
    shown = as_user("alice", "info").stdout  # type: ignore[attr-defined]
    assert "you:            alice (user)" in shown
    assert "jobs run as:    a uid of their own (dynamic)" in shown
    # With no configuration a user's job is still bounded: a process count
    # and a share of the host's memory.
    caps = builtin_user_caps()
    assert f"your caps:      memory {short_size(caps['memory'])}, pids {caps['pids']}" in shown
    quota = builtin_user_quota()
    assert f"your quota:     memory {short_size(quota['memory'])}, pids {quota['pids']}" in shown
    # Whether a job may lower its OOM score: said as it is on this host.
    floor = "1000, a floor" if oom_score_pinned() else "1000, not a floor: corrald lacks"
    assert f"job oom score:  {floor}" in shown


def test_ps_keeps_a_multi_line_command_on_one_row(as_user: Callable[..., object]) -> None:
    as_user("bob", "start", "--", "sh", "-c", "true\n\techo done\x1b")
    rows = as_user("bob", "ps").stdout.splitlines()  # type: ignore[attr-defined]
    assert len(rows) == 2
    assert rows[1].endswith("sh -c true\\n\\techo done\\x1b")


def test_running_caps_refuse_starts_with_a_clear_error(pki_dir: Path, short_dir: Path) -> None:
    with running_corrald(
        pki_dir, short_dir, "--max-jobs", "2", "--max-jobs-per-user", "1"
    ) as corrald:

        def as_user(name: str, *args: str) -> subprocess.CompletedProcess[str]:
            env = {"CORRAL_ADDR": corrald.tcp, "CORRAL_IDENTITY": str(identity(pki_dir, name))}
            return corral(*args, env=env)

        first = as_user("alice", "start", "--", "sleep", "1000")
        assert first.returncode == 0, first.stderr
        again = as_user("alice", "start", "--", "sleep", "1000")
        assert again.returncode == 1
        assert again.stderr == (
            "corral: error: alice has 1 job starting or running, the most one user may "
            "have; wait for one to end, or stop one\n"
        )
        assert as_user("admin", "start", "--", "sleep", "1000").returncode == 0
        full = as_user("bob", "start", "--", "sleep", "1000")
        assert full.returncode == 1
        assert full.stderr == (
            "corral: error: corrald has 2 jobs starting or running, its maximum; "
            "try again when one has ended\n"
        )
        info = as_user("admin", "info")
        assert "jobs:           2 (2 running)\n" in info.stdout
        assert "max running:    2 jobs, 1 per user\n" in info.stdout
        as_user("alice", "stop", "--grace", "0", first.stdout.strip())
        assert as_user("bob", "start", "--", "true").returncode == 0


def test_rw_lets_a_job_write_there(
    as_user: Callable[..., subprocess.CompletedProcess[str]], shared_dir: Path
) -> None:
    target = shared_dir / "written"
    script = f"echo hi > {target} && echo ok"
    refused = as_user("admin", "run", "--", "sh", "-c", script)
    assert refused.returncode == 2
    assert refused.stderr.endswith("Read-only file system\n")
    wrote = as_user("admin", "run", "--rw", str(shared_dir), "--", "sh", "-c", script)
    assert (wrote.returncode, wrote.stdout) == (0, "ok\n"), wrote.stderr
    assert target.read_text() == "hi\n"
    # A user may not (by default): their jobs share one run-as user.
    denied = as_user("alice", "run", "--rw", str(shared_dir), "--", "true")
    assert denied.returncode == 77
    assert "is outside where a user's jobs may write (allowed: none)" in denied.stderr

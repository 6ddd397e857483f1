"""The audit trail: a line for every request and refused peer, off the
event loop, rotated by size, and nothing lost in silence on a full disk.

The first tests drive a real corrald over mutual TLS and read its
STATE/audit.log; the rest drive an AuditLog alone, on a small tmpfs for
the full disk.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from corral import pki_layout
from corral.client.client import connect
from corral.client.errors import AuthenticationError, ServerError
from corral.supervisor.audit import AUDIT_FILE, AuditLog

from .conftest import Daemon, identity, running_corrald, until
from .test_cli import corral
from .test_diskfull import fill

pytestmark = [pytest.mark.jobs, pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")]


def entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def daemon(pki_dir: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(pki_dir, short_dir) as corrald:
        yield corrald


async def exercise(daemon: Daemon, pki_dir: Path) -> tuple[str, str]:
    """A peer without a certificate, then admin and alice at work: every
    operation, a refused start and a missing job among them. Returns
    alice's job's id and the admin's."""
    context = ssl.create_default_context(cafile=pki_dir / pki_layout.CA_CERT_FILE)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(AuthenticationError):
        async with connect(daemon.tcp, context):
            pass
    async with (
        connect(daemon.tcp, identity(pki_dir, "admin")) as admin,
        connect(daemon.tcp, identity(pki_dir, "alice")) as alice,
    ):
        await alice.info()
        job = await alice.start(["sh", "-c", "read line; echo got $line"], stdin=True)
        async with alice.attach(job.id) as attached:
            await attached.send(b"hello\n")
            await attached.close()
            async for _ in attached:
                pass
        await alice.wait(job.id)
        async with alice.logs(job.id) as stream:
            async for _ in stream:
                pass
        await alice.list()
        with pytest.raises(ServerError):
            await alice.start(["id"], user="root")  # not hers to choose
        with pytest.raises(ServerError):
            await alice.status("0" * 32)
        sleeper = await admin.start(["sleep", "60"], limits={"pids": 10})
        await admin.stop(sleeper.id, grace=0)
        await alice.remove(job.id)
        await admin.ping()  # a keep-alive: not recorded
    return job.id, sleeper.id


async def test_every_request_and_refused_peer_is_one_line(daemon: Daemon, pki_dir: Path) -> None:
    audit = daemon.state_dir / AUDIT_FILE
    job_id, sleeper_id = await exercise(daemon, pki_dir)
    await until(lambda: any(e["op"] == "remove" for e in entries(audit)))
    seen = entries(audit)
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    by_op: dict[str, list[dict[str, Any]]] = {}
    for entry in seen:
        by_op.setdefault(entry["op"], []).append(entry)
        assert entry["time"].endswith("Z")
    assert "ping" not in by_op
    (refused,) = by_op["handshake"]
    assert (refused["outcome"], refused["reason"]) == ("no_certificate", "no client certificate")
    assert refused["peer"].startswith("127.0.0.1:")
    assert {(e["name"], e["role"]) for e in by_op["hello"]} == {
        ("admin", "admin"),
        ("alice", "user"),
    }
    started, refused_start = (e for e in by_op["start"] if e["name"] == "alice")
    assert started["outcome"] == "ok"
    assert started["job"] == job_id
    assert started["argv"] == ["sh", "-c", "read line; echo got $line"]
    assert started["user"] == "dynamic"
    assert isinstance(started["uid"], int)
    assert started["seccomp"] == "default"
    assert started["limits"]["pids"] > 0  # the user's default cap
    assert (refused_start["outcome"], refused_start["user"]) == ("permission_denied", "root")
    assert refused_start["argv"] == ["id"]
    (admins,) = (e for e in by_op["start"] if e["name"] == "admin")
    assert admins["limits"] == {"pids": 10}
    attach_began, attach_ended = by_op["attach"]
    assert attach_began["outcome"] == "started"
    assert (attach_ended["outcome"], attach_ended["job"]) == ("ok", job_id)
    assert attach_ended["bytes_in"] == len(b"hello\n")
    assert attach_ended["bytes_out"] > 0  # the output log's bytes, not the input's
    (logs,) = by_op["logs"]
    assert (logs["outcome"], logs["job"], logs["bytes_out"]) == ("ok", job_id, logs["bytes_out"])
    assert logs["bytes_out"] > 0
    (missing,) = by_op["status"]
    assert (missing["outcome"], missing["job"]) == ("not_found", "0" * 32)
    (stopped,) = by_op["stop"]
    assert (stopped["name"], stopped["job"], stopped["outcome"]) == ("admin", sleeper_id, "ok")
    for op in ("info", "wait", "list", "remove"):
        assert all(e["outcome"] == "ok" for e in by_op[op]), op
        assert all(e["peer"].startswith("127.0.0.1:") for e in by_op[op]), op


async def test_a_user_may_not_read_the_audit_trail(daemon: Daemon, pki_dir: Path) -> None:
    async with connect(daemon.tcp, identity(pki_dir, "alice")) as alice:
        with pytest.raises(ServerError) as caught:
            await alice.call("audit", {})
    assert caught.value.code == "permission_denied"
    assert str(caught.value) == "user alice may not use 'audit'"
    audit = daemon.state_dir / AUDIT_FILE
    await until(lambda: any(e["op"] == "audit" for e in entries(audit)))
    (refused,) = (e for e in entries(audit) if e["op"] == "audit")
    assert (refused["name"], refused["outcome"]) == ("alice", "permission_denied")


# -- the log alone -------------------------------------------------------------------


async def written(audit: AuditLog, count: int) -> None:
    await until(lambda: audit.written + audit.lost + audit.dropped >= count)


async def test_the_log_rotates_by_size_keeping_a_few_files(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path, max_size=4096, keep=2)
    await nursery.start(audit.run)
    for number in range(200):
        audit.record("status", "ok", name="alice", number=number)
        if number % 10 == 0:
            await written(audit, number + 1)
    await written(audit, 200)
    files = audit.files()
    assert [path.name for path in files] == [f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.1", AUDIT_FILE]
    assert all(path.stat().st_size <= 4096 for path in files)
    numbers = [entry["number"] for path in files for entry in entries(path)]
    assert numbers == list(range(numbers[0], 200))  # the newest, in order, none repeated
    assert numbers[0] > 0  # the oldest went
    lines = await audit.entries(name="alice")
    assert [json.loads(line)["number"] for line in lines] == numbers
    assert await audit.entries(name="bob") == []


async def test_a_full_disk_loses_entries_counted_and_said(
    nursery: trio.Nursery, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(small_disk, max_size=1 << 20)
    await nursery.start(audit.run)
    filler = fill(small_disk)
    audit.record("start", "ok", name="alice")
    await written(audit, 1)
    audit.record("stop", "ok", name="alice")
    await written(audit, 2)
    assert audit.lost == 2
    filler.unlink()  # space again: the next write says what was lost
    audit.record("status", "ok", name="alice")
    await until(lambda: audit.written >= 2)
    said = entries(small_disk / AUDIT_FILE)
    assert [(e["op"], e["outcome"]) for e in said] == [("audit", "lost"), ("status", "ok")]
    assert said[0]["lost"] == 2
    warnings = [r.getMessage() for r in caplog.records if "audit trail" in r.getMessage()]
    assert len(warnings) == 2  # once when it fails, once when it works again
    assert "No space left on device" in warnings[0]
    assert "2 entries were lost" in warnings[1]


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, queue=2)  # no writer running: the queue fills
    for _ in range(5):
        audit.record("info", "ok")
    assert audit.statistics() == {"written": 0, "dropped": 3, "lost": 0}


async def test_a_follower_sees_new_entries_and_is_cut_off_when_behind(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    with audit.follow() as live:
        audit.record("info", "ok", name="alice")
        entry = await live.receive()
        assert (entry["op"], entry["name"]) == ("info", "alice")
    with audit.follow() as live:
        for _ in range(2000):  # more than a follower may have unread
            audit.record("info", "ok")
        count = 0
        async for _ in live:
            count += 1
        assert 0 < count < 2000


# -- reading it ------------------------------------------------------------------------


def cli(daemon: Daemon, pki_dir: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return corral("--addr", daemon.tcp, "--identity", str(identity(pki_dir, name)), *args)


async def test_an_admin_reads_the_trail_filtered_and_a_user_may_not(
    daemon: Daemon, pki_dir: Path
) -> None:
    async with connect(daemon.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["true"])
        await alice.wait(job.id)
    audit = daemon.state_dir / AUDIT_FILE
    await until(lambda: any(e["op"] == "wait" for e in entries(audit)))
    shown = await trio.to_thread.run_sync(
        functools.partial(cli, daemon, pki_dir, "admin", "--json", "audit", "--user", "alice")
    )
    assert shown.returncode == 0, shown.stderr
    read = [json.loads(line) for line in shown.stdout.splitlines()]
    assert {e["name"] for e in read} == {"alice"}
    assert [e["op"] for e in read] == ["hello", "start", "wait"]
    assert read[1]["job"] == job.id
    plain = await trio.to_thread.run_sync(
        functools.partial(cli, daemon, pki_dir, "admin", "audit", "--since", "1h")
    )
    line = next(x for x in plain.stdout.splitlines() if f" start  {job.id[:12]}  ok" in x)
    assert "alice (user)  127.0.0.1:" in line
    assert line.endswith("  true")
    future = await trio.to_thread.run_sync(
        functools.partial(cli, daemon, pki_dir, "admin", "audit", "--since", "2999-01-01T00:00:00Z")
    )
    assert (future.returncode, future.stdout) == (0, "")
    refused = await trio.to_thread.run_sync(
        functools.partial(cli, daemon, pki_dir, "alice", "audit")
    )
    assert refused.returncode == 77
    assert refused.stderr == "corral: error: user alice may not use 'audit'\n"
    wrong = await trio.to_thread.run_sync(
        functools.partial(cli, daemon, pki_dir, "admin", "audit", "--since", "yesterday")
    )
    assert wrong.returncode == 2
    assert "--since: 'yesterday' is neither a time" in wrong.stderr


async def test_following_the_trail_gets_entries_as_they_come(daemon: Daemon, pki_dir: Path) -> None:
    audit = daemon.state_dir / AUDIT_FILE
    async with (
        connect(daemon.tcp, identity(pki_dir, "admin")) as admin,
        connect(daemon.tcp, identity(pki_dir, "bob")) as bob,
    ):
        await until(lambda: any(e.get("name") == "bob" for e in entries(audit)))
        async with admin.audit(user="bob", follow=True) as trail:
            seen = trail.entries()
            assert (await anext(seen))["op"] == "hello"  # bob's, from the file
            await bob.info()
            with trio.fail_after(30):
                entry = await anext(seen)
            assert (entry["op"], entry["name"], entry["outcome"]) == ("info", "bob", "ok")

"""The `corral` and `corrald` commands, run as a person runs them: as processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from corral import pki, pki_layout
from corral.client import cli
from corral.client.client import Client, connect
from corral.client.errors import ServerError

from .conftest import Daemon, identity, start_corrald

CORRAL = [sys.executable, "-m", "corral.client.cli"]


def corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    environment.update(env or {})
    return subprocess.run(
        [*CORRAL, *args], capture_output=True, text=True, env=environment, timeout=60, check=False
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- corral info -----------------------------------------------------------------


def test_info_from_the_environment(corrald: Daemon, pki_dir: Path) -> None:
    env = {"CORRAL_ADDR": corrald.tcp, "CORRAL_IDENTITY": str(identity(pki_dir, "admin"))}
    result = corral("info", env=env)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["you"].strip() == "admin (admin)"
    assert lines["cgroup"].strip() in {"v1", "v2"}
    assert corrald.tcp in lines["server"]


def test_json_info_over_the_unix_socket_flags_beat_environment(
    corrald: Daemon, pki_dir: Path
) -> None:
    env = {"CORRAL_ADDR": "127.0.0.1:1", "CORRAL_IDENTITY": str(identity(pki_dir, "admin"))}
    result = corral(
        "--addr",
        corrald.unix,
        "info",
        "--json",
        "--identity",
        str(identity(pki_dir, "alice")),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["identity"] == {"name": "alice", "role": "user"}
    assert info["cgroup"] in {"v1", "v2"}
    assert info["version"]
    assert result.stderr == ""


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_connection_refused(pki_dir: Path) -> None:
    port = free_port()
    result = corral(
        "--addr", f"127.0.0.1:{port}", "--identity", str(identity(pki_dir, "bob")), "info"
    )
    assert result.returncode == 69
    assert (
        error_line(result)
        == f"corral: error: cannot connect to 127.0.0.1:{port}: connection refused"
    )


def test_certificate_from_another_ca(corrald: Daemon, pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_pki(other)
    # Trust the real server, present a client certificate it cannot verify.
    stranger = other / pki_layout.CLIENTS_DIR / "admin"
    (stranger / pki_layout.CA_CERT_FILE).write_bytes(
        (pki_dir / pki_layout.CA_CERT_FILE).read_bytes()
    )
    result = corral("--addr", corrald.tcp, "--identity", str(stranger), "info")
    assert result.returncode == 77
    assert "rejected our client certificate: it is not signed by a CA this corrald trusts" in (
        error_line(result)
    )


def test_server_from_another_ca(corrald: Daemon, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_pki(other)
    result = corral("--addr", corrald.tcp, "--identity", str(other / "clients" / "admin"), "info")
    assert result.returncode == 76
    assert error_line(result) == (
        f"corral: error: cannot verify the server at {corrald.tcp}: its certificate is not "
        "signed by this identity's CA (its ca.crt); is the identity for this corrald?"
    )


@contextlib.contextmanager
def fake_server(reply: bytes | None) -> Iterator[str]:
    """A TCP server that is not corrald: to each connection it answers
    `reply` once the client has spoken (None: it closes at once)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                peer, _ = listener.accept()
                with peer:
                    if reply is not None:
                        peer.recv(4096)
                        peer.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


@pytest.mark.parametrize(
    ("reply", "status", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 76, "does not speak TLS"),
        (None, 69, "closed the connection during the TLS handshake"),
    ],
)
def test_a_port_that_is_not_corrald_is_said_so(
    pki_dir: Path, reply: bytes | None, status: int, message: str
) -> None:
    with fake_server(reply) as address:
        result = corral("--addr", address, "--identity", str(identity(pki_dir, "bob")), "info")
    assert result.returncode == status
    line = error_line(result)
    assert message in line
    assert "is it corrald?" in line


def test_a_port_that_never_answers_ends_at_the_connect_timeout(pki_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: the kernel does
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        bob = str(identity(pki_dir, "bob"))
        result = corral("--addr", address, "--identity", bob, "--connect-timeout", "0.5", "info")
    assert result.returncode == 76
    assert error_line(result) == (
        f"corral: error: {address} did not finish a TLS handshake in 0.5 s: is it corrald? "
        "(an overloaded corrald can be this slow too)"
    )


def test_a_wrong_flag_is_one_line_naming_the_help() -> None:
    result = corral("start", "--bogus", "--", "true")
    assert result.returncode == 2
    assert error_line(result) == (
        "corral: error: unrecognized arguments: --bogus; see 'corral start --help'"
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["info"], "invalid_config"),
        (["--addr", "127.0.0.1:1", "--identity", "IDENTITY", "info"], "unavailable"),
    ],
)
def test_json_errors_made_by_the_client_carry_snake_case_codes(
    pki_dir: Path, args: list[str], code: str
) -> None:
    args = [str(identity(pki_dir, "bob")) if arg == "IDENTITY" else arg for arg in args]
    result = corral("--json", *args)
    assert result.returncode != 0
    assert json.loads(result.stdout)["error"]["code"] == code


def test_json_errors_of_the_handshake_carry_snake_case_codes(
    corrald: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    bob = str(identity(pki_dir, "bob"))
    with fake_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") as address:
        not_tls = corral("--json", "--addr", address, "--identity", bob, "info")
    other = tmp_path / "other"
    pki.init_pki(other)
    stranger = other / pki_layout.CLIENTS_DIR / "admin"
    (stranger / pki_layout.CA_CERT_FILE).write_bytes(
        (pki_dir / pki_layout.CA_CERT_FILE).read_bytes()
    )
    refused = corral("--json", "--addr", corrald.tcp, "--identity", str(stranger), "info")
    codes = [json.loads(result.stdout)["error"]["code"] for result in (not_tls, refused)]
    assert codes == ["tls_failed", "unauthenticated"]
    assert (not_tls.returncode, refused.returncode) == (76, 77)


def test_a_key_readable_by_others_gets_a_warning(
    corrald: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    exposed = tmp_path / "bob"
    shutil.copytree(identity(pki_dir, "bob"), exposed)
    (exposed / pki_layout.CLIENT_KEY_FILE).chmod(0o644)
    result = corral("--addr", corrald.tcp, "--identity", str(exposed), "info")
    assert result.returncode == 0  # said, as ssh would, but not refused
    assert result.stderr == (
        f"corral: warning: {exposed}/client.key is readable by others (mode 0644): anyone "
        f"who reads it can act as this identity; `chmod 600 {exposed}/client.key`\n"
    )
    (exposed / pki_layout.CLIENT_KEY_FILE).chmod(0o600)
    assert corral("--addr", corrald.tcp, "--identity", str(exposed), "info").stderr == ""


def test_wrong_server_name(corrald: Daemon, pki_dir: Path) -> None:
    result = corral(
        "--addr", corrald.tcp, "--identity", str(identity(pki_dir, "admin")),
        "--server-name", "elsewhere.example", "info",
    )  # fmt: skip
    assert result.returncode == 76
    assert "mismatch" in error_line(result)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["info"], 78, "no identity: pass --identity DIR or set CORRAL_IDENTITY"),
        (["--identity", "/nonexistent", "info"], 78, "missing TLS file /nonexistent/ca.crt"),
        (["--addr", "localhost:http", "--identity", "x", "info"], 78, "port must be a number"),
        ([], 2, "the following arguments are required: COMMAND"),
        (["launch"], 2, "invalid choice: 'launch'"),
        (["--connect-timeout", "-1", "info"], 2, "must be between 0 and 86400 seconds"),
        (["--connect-timeout", "nan", "info"], 2, "must be between 0 and 86400 seconds"),
    ],
)
def test_bad_settings(args: list[str], status: int, message: str) -> None:
    result = corral(*args)
    assert result.returncode == status
    assert message in result.stderr
    assert result.stderr.splitlines()[-1].startswith("corral: error: ")


def test_help_documents_exit_statuses_and_examples() -> None:
    result = corral("--help")
    assert result.returncode == 0
    for text in ("exit statuses", "69", "77", "CORRAL_IDENTITY", "corral info"):
        assert text in result.stdout


# -- corral certs ------------------------------------------------------------------


def test_certs_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert cli.run(["certs", "init", str(directory), "--server-name", "corral.example"]) == 0
    for name in ("admin", "alice", "bob"):
        key = directory / "clients" / name / "client.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert cli.run(["certs", "issue", "--pki", str(directory), "carol", "--role", "user"]) == 0
    assert (directory / "clients" / "carol" / "client.crt").is_file()
    assert "carol (user)" in capsys.readouterr().out

    # Keys are never overwritten silently.
    key = directory / "ca.key"
    before = key.read_bytes()
    assert cli.run(["certs", "init", str(directory)]) == 78
    assert "--force" in capsys.readouterr().err
    assert key.read_bytes() == before
    assert cli.run(["certs", "issue", "--pki", str(directory), "carol", "--role", "user"]) == 78
    assert cli.run(["certs", "init", str(directory), "--force"]) == 0
    assert key.read_bytes() != before


def test_certs_issue_refuses_an_unknown_role(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.run(["certs", "issue", "--pki", str(tmp_path), "carol", "--role", "root"])
    assert caught.value.code == 2
    assert not (tmp_path / "clients").exists()


# -- corrald -------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_corrald_stops_cleanly_on_a_signal(corrald: Daemon, signum: int) -> None:
    corrald.process.send_signal(signum)
    stderr = corrald.wait()
    assert corrald.process.returncode == 0, stderr
    assert "shutting down" in stderr
    assert not Path(corrald.unix.removeprefix("unix:")).exists()


def test_corrald_creates_a_dev_pki_and_its_paste_line_works(short_dir: Path) -> None:
    state = short_dir / "var"
    process = start_corrald("--state-dir", str(state), "--init-pki", "--listen", "127.0.0.1:0")
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(4)]
        paste = banner[3].strip()
        # What a person does in a second terminal: paste, then ask.
        shell = subprocess.run(
            ["bash", "-c", f"{paste} && corral info"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(short_dir)},
        )
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert shell.returncode == 0, (banner, shell.stderr)
    assert "admin (admin)" in shell.stdout
    admin = state / "pki" / "clients" / "admin"
    assert admin.is_dir()
    assert paste.startswith("export ")
    assert paste.endswith(f"CORRAL_IDENTITY={admin}")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_corrald_without_a_pki_says_what_to_do(short_dir: Path) -> None:
    process = start_corrald("--state-dir", str(short_dir), "--listen", "127.0.0.1:0")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 78
    assert f"no PKI in {short_dir}/pki: run `corral certs init" in stderr


def test_corrald_refuses_a_cgroup_parent_that_is_not_a_name(pki_dir: Path, short_dir: Path) -> None:
    process = start_corrald("--state-dir", str(short_dir), "--pki", str(pki_dir),
                            "--listen", "127.0.0.1:0", "--cgroup-parent", "a/b")  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "--cgroup-parent: invalid cgroup parent 'a/b': one path component" in stderr


@pytest.mark.parametrize(
    ("flags", "config", "expected"),
    [
        (["--user-cap", "memory"], None,
         (2, "expected LIMIT=VALUE (e.g. memory=2G), not 'memory'")),
        (["--user-cap", "ram=1G"], None, (78, "policy: caps.user: unknown limit 'ram'")),
        ([], "[caps.user]\nmemory = '1G'\n[defaults]\nmemory = '2G'\n",
         (78, "the default memory (2G) is over the user cap (1G)")),
        (["--default", "memory=4G"], "[caps.admin]\nmemory = '2G'\n",
         (78, "over the admin cap")),  # a flag over the file
    ],
)  # fmt: skip
def test_corrald_refuses_a_wrong_policy_naming_it(
    pki_dir: Path, short_dir: Path, flags: list[str], config: str | None, expected: tuple[int, str]
) -> None:
    if config is not None:
        (short_dir / "corrald.toml").write_text(config)
        flags = [*flags, "--config", str(short_dir / "corrald.toml")]
    process = start_corrald("--state-dir", str(short_dir), "--pki", str(pki_dir),
                            "--listen", "127.0.0.1:0", *flags)  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    status, message = expected
    assert process.returncode == status
    assert message in stderr
    assert stderr.count("\n") == 1 or status == 2


def test_corrald_refuses_an_address_in_use(corrald: Daemon, pki_dir: Path, short_dir: Path) -> None:
    process = start_corrald("--state-dir", str(short_dir / "second"), "--pki", str(pki_dir),
                            "--listen", corrald.tcp)  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 69
    assert f"cannot listen on {corrald.tcp}" in stderr
    # The first one is unharmed.
    result = corral("--addr", corrald.tcp, "--identity", str(identity(pki_dir, "bob")), "info")
    assert result.returncode == 0, result.stderr


def test_identity_pointing_at_the_pki_says_which_directory(pki_dir: Path) -> None:
    result = corral("--identity", str(pki_dir), "info")
    assert result.returncode == 78
    assert f"use a client's, e.g. {pki_dir}/clients/admin" in error_line(result)


async def ask_until_refused(client: Client) -> None:
    """Ask `info` until corrald's goodbye arrives (the signal lands when it lands)."""
    with trio.fail_after(10):
        while True:
            await client.info()


async def test_corrald_says_goodbye_to_open_sessions_on_sigterm(
    corrald: Daemon, pki_dir: Path
) -> None:
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as client:
        await client.info()
        corrald.process.send_signal(signal.SIGTERM)
        with pytest.raises(ServerError, match="shutting down") as caught:
            await ask_until_refused(client)
        assert caught.value.exit_status == 69
    assert await trio.to_thread.run_sync(corrald.process.wait, 30) == 0


def test_corrald_that_cannot_listen_leaves_no_socket_behind(
    corrald: Daemon, pki_dir: Path, short_dir: Path
) -> None:
    socket_path = short_dir / "second.sock"
    process = start_corrald("--state-dir", str(short_dir / "second"), "--pki", str(pki_dir),
                            "--listen", f"unix:{socket_path}", "--listen", corrald.tcp)  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 69, stderr
    assert not socket_path.exists()


def test_certs_renew_reissues_the_server_and_a_client(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert corral("certs", "init", str(directory)).returncode == 0
    before = (directory / pki_layout.SERVER_CERT_FILE).read_bytes()
    server = corral("certs", "renew", "--pki", str(directory), "--server")
    assert server.returncode == 0, server.stderr
    assert (
        server.stdout
        == f"renewed corrald's certificate and key: {directory / pki_layout.SERVER_CERT_FILE}\n"
    )
    assert (directory / pki_layout.SERVER_CERT_FILE).read_bytes() != before
    alice = corral("certs", "renew", "--pki", str(directory), "alice")
    assert alice.returncode == 0, alice.stderr
    assert (
        alice.stdout
        == f"renewed identity alice in {directory / pki_layout.CLIENTS_DIR / 'alice'}\n"
    )
    missing = corral("certs", "renew", "--pki", str(directory), "carol")
    assert missing.returncode == 78
    assert missing.stderr.startswith("corral: error: no client carol: ")
    both = corral("certs", "renew", "--pki", str(directory), "--server", "alice")
    assert both.returncode == 2

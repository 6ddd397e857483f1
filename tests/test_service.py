"""corrald as a service: the systemd unit in contrib/, verified by systemd
itself, and `corrald --check` on good and broken setups."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral import pki, pki_layout

from .conftest import CORRALD, running_corrald

UNIT = Path(__file__).parent.parent / "contrib" / "corrald.service"
INSTALLED = "/opt/corral/bin/corrald"  # where docs/OPERATIONS.md installs it


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze on this host")
    text = UNIT.read_text()
    # What lets jobs outlive a restart, and reload rotate the certificates.
    for line in ("KillMode=process", "Delegate=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert f"\n{line}\n" in text, line
    assert "--keep-jobs" in text
    assert "Restart=on-failure" in text
    # systemd checks that the programs exist: ours, where this test runs.
    corrald = Path(sys.executable).parent / "corrald"
    assert corrald.exists(), corrald
    unit = tmp_path / "corrald.service"
    unit.write_text(text.replace(INSTALLED, str(corrald)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def check(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CORRALD, "--check", *flags], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_check_on_a_good_setup_says_what_it_checked_and_changes_nothing(
    pki_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    result = check("--state-dir", str(state), "--pki", str(pki_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"state directory {state}: created at start"
    assert lines[1].startswith(f"PKI {pki_dir}: server certificate ")
    assert any(line.startswith("cgroups: ") for line in lines)
    assert lines[-1].startswith("corrald --check: nothing wrong")
    assert not state.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_check_beside_a_running_corrald_says_so(pki_dir: Path, short_dir: Path) -> None:
    with running_corrald(pki_dir, short_dir) as daemon:
        result = check("--state-dir", str(daemon.state_dir), "--pki", str(pki_dir))
        assert result.returncode == 0, result.stderr
        pid = daemon.process.pid
        assert f"state directory {daemon.state_dir}: in use by corrald (pid {pid})" in (
            result.stdout
        )


def expired_server(pki_dir: Path, tmp_path: Path) -> Path:
    own = Path(shutil.copytree(pki_dir, tmp_path / "expired-pki"))
    ca_key, ca_cert = pki.load_ca(own)
    ended = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    key, cert = pki.make_server_cert(ca_key, ca_cert, [], not_after=ended)
    pki.write_private_key(own / pki_layout.SERVER_KEY_FILE, key, force=True)
    pki.write_certificate(own / pki_layout.SERVER_CERT_FILE, cert)
    return own


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
@pytest.mark.parametrize("broken", ["no pki", "expired", "policy", "state is a file"])
def test_check_names_what_is_wrong(pki_dir: Path, tmp_path: Path, broken: str) -> None:
    state, pki_path, extra = tmp_path / "state", pki_dir, []
    if broken == "no pki":
        pki_path = tmp_path / "nothing"
        expected = f"no PKI in {pki_path}: run `corral certs init {pki_path}`"
    elif broken == "expired":
        pki_path = expired_server(pki_dir, tmp_path)
        expected = "server.crt expired at"
    elif broken == "policy":
        config = tmp_path / "corrald.toml"
        config.write_text("[caps.user]\nmemory = 'lots'\n")
        extra = ["--config", str(config)]
        expected = "caps.user: memory"
    else:
        state.write_text("")
        expected = f"state directory {state} is not a directory"
    result = check("--state-dir", str(state), "--pki", str(pki_path), *extra)
    assert result.returncode == 78, result.stdout
    assert result.stderr.startswith("corrald: error: ")
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1

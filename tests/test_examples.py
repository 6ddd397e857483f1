"""Every script in examples/ runs to completion against a real corrald."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Daemon, identity

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, corrald: Daemon, pki_dir: Path) -> None:
    env = dict(os.environ, CORRAL_ADDR=corrald.tcp, CORRAL_IDENTITY=str(identity(pki_dir, "admin")))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout


def test_info_example_reports_the_identity(corrald: Daemon, pki_dir: Path) -> None:
    env = dict(os.environ, CORRAL_ADDR=corrald.unix, CORRAL_IDENTITY=str(identity(pki_dir, "bob")))
    script = Path(__file__).parent.parent / "examples" / "info.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "knows us as bob (user)" in result.stdout

"""Every script in examples/ runs to completion against a real corrald."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Daemon, identity

EXAMPLES_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))


def run_example(script: Path, address: str, identity_dir: Path) -> str:
    """Run `script` as a person would, after the paste line; return its stdout."""
    env = dict(os.environ, CORRAL_ADDR=address, CORRAL_IDENTITY=str(identity_dir))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout
    return result.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, corrald: Daemon, pki_dir: Path) -> None:
    run_example(script, corrald.tcp, identity(pki_dir, "admin"))


def test_info_example_reports_the_identity(corrald: Daemon, pki_dir: Path) -> None:
    output = run_example(EXAMPLES_DIR / "info.py", corrald.unix, identity(pki_dir, "bob"))
    assert "knows us as bob (user)" in output

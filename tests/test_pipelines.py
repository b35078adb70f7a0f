"""KFP packaging: compiled YAML in sync, components thin and typed, smoke run via kfp.local."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from pipelines.compile import PIPELINES, compile_all

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_yaml_is_in_sync(tmp_path):
    compile_all(tmp_path)
    for name in PIPELINES:
        committed = list(yaml.safe_load_all((ROOT / "pipelines" / name).read_text()))
        fresh = list(yaml.safe_load_all((tmp_path / name).read_text()))
        assert committed == fresh, f"pipelines/{name} is stale: run `python -m pipelines.compile`"


def _dag(name: str) -> dict:
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / name).read_text()))
    return docs


def test_full_pipeline_shape():
    spec, platform = _dag("full.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"corpus-shard", "for-loop-1", "deploy-index", "for-loop-2", "report"}
    assert "for-loop-1" in tasks["deploy-index"]["dependentTasks"]
    assert "deploy-index" in tasks["for-loop-2"]["dependentTasks"]
    assert "for-loop-2" in tasks["report"]["dependentTasks"]
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-shard-embed", "exec-index-build", "exec-ttt-eval", "exec-report"):
        envs = {e["envVar"] for e in execs[executor]["secretAsEnv"][0]["keyToEnv"]}
        assert envs == {"TTT_S3_ACCESS_KEY", "TTT_S3_SECRET_KEY"}
    resources = spec["deploymentSpec"]["executors"]
    for gpu_exec in ("exec-shard-embed", "exec-index-build", "exec-ttt-eval"):
        accel = resources[gpu_exec]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in resources["exec-report"]["container"].get("resources", {})
    assert spec["root"]["inputDefinitions"]["parameters"]["spec"]["parameterType"] == "STRING"


def test_components_are_thin_wrappers():
    # A component is a few lines that call ttt: stdlib and ttt imports only, no stage logic.
    for path in sorted((ROOT / "components").glob("*/component.py")):
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert len(funcs) == 1, path
        body_imports = [n for n in ast.walk(funcs[0]) if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in body_imports:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert module.split(".")[0] in {"json", "collections", "ttt"}, (path, module)
        statements = funcs[0].end_lineno - funcs[0].lineno
        assert statements <= 25, f"{path}: {statements} lines is more than a thin wrapper"
        assert (path.parent / "README.md").exists(), f"{path.parent} has no README"


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_pipeline_runs_locally(tmp_path, monkeypatch, smoke_spec_text):
    """The smoke pipeline through kfp.local really runs every task and writes a report."""
    from kfp import local

    from pipelines.smoke import smoke
    from ttt.spec import loads_spec
    from ttt.store import open_store

    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    smoke(spec=smoke_spec_text)
    run = loads_spec(smoke_spec_text)
    store = open_store(run.spec.storage)
    for prefix in (
        "corpus/shard-00000",
        "embed/shard-00000",
        "index/shard-00000",
        "eval/rank-00000",
    ):
        manifest = store.read_manifest(f"{run.prefix}/{prefix}")
        assert manifest is not None and manifest["spec_hash"], prefix
    summary = json.loads(store.get_bytes(f"{run.prefix}/report/summary.json"))
    assert summary["tasks"], summary
    # Every task of the pipeline left its output artifact: nothing was silently skipped.
    root = tmp_path / "kfp"
    produced = {part for p in root.rglob("*") if p.is_file() for part in p.relative_to(root).parts}
    for task in ("corpus-shard", "shard-embed", "index-build", "ttt-eval", "report"):
        assert task in produced, (task, sorted(produced))

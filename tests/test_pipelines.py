"""KFP packaging: compiled YAML in sync, components thin and typed, smoke run via kfp.local."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml

from pipelines.compile import NAMES, compile_all

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_yaml_is_in_sync(tmp_path):
    compile_all(tmp_path)
    for name in NAMES:
        committed = list(yaml.safe_load_all((ROOT / "pipelines" / name).read_text()))
        fresh = list(yaml.safe_load_all((tmp_path / name).read_text()))
        assert committed == fresh, f"pipelines/{name} is stale: run `python -m pipelines.compile`"


def _dag(name: str) -> dict:
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / name).read_text()))
    return docs


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml"])
def test_full_pipeline_shape(name):
    spec, _ = _dag(name)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"corpus-shard", "for-loop-1", "deploy-index", "for-loop-2", "report"}
    assert "for-loop-1" in tasks["deploy-index"]["dependentTasks"]
    assert "deploy-index" in tasks["for-loop-2"]["dependentTasks"]
    assert "for-loop-2" in tasks["report"]["dependentTasks"]
    assert spec["root"]["inputDefinitions"]["parameters"]["spec"]["parameterType"] == "STRING"
    # the KFP UI's run comparison reads a Metrics artifact, its viewer an HTML one
    outputs = spec["components"]["comp-report"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["page"]["artifactType"]["schemaTitle"] == "system.HTML"


def _store_users(spec: dict) -> set[str]:
    """Every executor whose component body opens the store (`open_store`): derived from the
    compiled code, so a new task that reads the store is checked without being listed."""
    return {
        name
        for name, body in spec["deploymentSpec"]["executors"].items()
        if any("open_store(" in part for part in body["container"]["command"])
    }


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml", "smoke.yaml"])
def test_every_task_that_touches_the_store_gets_the_store_secret(name):
    """Each executor that opens the store gets the Secret's keys as env (secretAsEnv), named by
    the `store_secret` parameter: without them ttt.store falls back to anonymous access,
    which MinIO refuses (deploy-index failed every full run this way)."""
    spec, *rest = _dag(name)
    users = _store_users(spec)
    expected = {"exec-corpus-shard", "exec-shard-embed", "exec-index-build", "exec-ttt-eval"}
    expected |= {"exec-report"} | ({"exec-deploy-index"} if name != "smoke.yaml" else set())
    assert users == expected, sorted(users)
    assert rest, f"{name} has no kubernetes platform spec"
    execs = rest[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in sorted(users):
        (secret,) = execs.get(executor, {}).get("secretAsEnv", [None])
        assert secret is not None, f"{name}: {executor} opens the store but gets no secretAsEnv"
        envs = {e["secretKey"]: e["envVar"] for e in secret["keyToEnv"]}
        assert envs == {"accesskey": "TTT_S3_ACCESS_KEY", "secretkey": "TTT_S3_SECRET_KEY"}
        name_param = secret["secretNameParameter"]["componentInputParameter"]
        assert name_param.endswith("store_secret"), (executor, name_param)


def _executors(name: str) -> tuple[dict, dict]:
    spec, platform = _dag(name)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec["deploymentSpec"]["executors"], k8s


@pytest.mark.parametrize(("name", "size"), [("full.yaml", "8Gi"), ("full-cpu.yaml", "1Gi")])
def test_tasks_that_load_models_cache_pushed_ones_on_a_sized_volume(name, size):
    """embed (the encoder) and eval (the LM and the encoder) fetch models named by store path
    into an emptyDir sized for them (gpt2-large and RoBERTa-large on GPU), told by env."""
    execs, k8s = _executors(name)
    for executor in ("exec-shard-embed", "exec-ttt-eval"):
        env = {e["name"]: e["value"] for e in execs[executor]["container"].get("env", [])}
        (mount,) = k8s[executor]["emptyDirMounts"]
        assert mount == {
            "mountPath": env["TTT_MODELS_CACHE"],
            "sizeLimit": size,
            "volumeName": "models",
        }
    assert not any("emptyDirMounts" in k8s.get(e, {}) for e in ("exec-index-build", "exec-report"))


def test_gpu_only_where_it_pays_and_tolerated():
    resources, k8s = _executors("full.yaml")
    for gpu_exec in ("exec-shard-embed", "exec-ttt-eval"):
        accel = resources[gpu_exec]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[
            gpu_exec
        ]["tolerations"]
    # A flat index is built by adding vectors: no GPU for index-build, report, corpus, deploy.
    for cpu_exec in ("exec-index-build", "exec-report", "exec-corpus-shard", "exec-deploy-index"):
        assert "accelerator" not in resources[cpu_exec]["container"]["resources"], cpu_exec
        assert "tolerations" not in k8s[cpu_exec], cpu_exec
    cpu_resources, cpu_k8s = _executors("full-cpu.yaml")
    for executor, container in cpu_resources.items():
        assert "accelerator" not in container["container"]["resources"], executor
        assert "tolerations" not in cpu_k8s[executor], executor


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml"])
def test_every_task_has_requests_timeout_labels_and_no_cache(name):
    spec, _ = _dag(name)
    resources, k8s = _executors(name)
    for executor, body in resources.items():
        res = body["container"]["resources"]
        assert res["resourceCpuRequest"] and res["resourceMemoryRequest"], executor
        assert int(k8s[executor]["activeDeadlineSeconds"]) > 0, executor
        labels = k8s[executor]["podMetadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "ttt", executor
        # exec: SIGTERM reaches Python (the eval drain), not only the shell.
        assert "_KFP_RUNTIME=true exec python3" in body["container"]["command"][2], executor

    def tasks(dag: dict) -> list[dict]:
        return list(dag["dag"]["tasks"].values())

    every = tasks(spec["root"]) + [
        t for c in spec["components"].values() if "dag" in c for t in tasks(c)
    ]
    leaf = [t for t in every if not t["componentRef"]["name"].startswith("comp-for-loop")]
    assert len(leaf) == 6
    # The store is the cache: KFP's cache would replay a stale deployment or evaluation.
    assert all(t["cachingOptions"] == {} for t in leaf), [t["cachingOptions"] for t in leaf]
    retried = {t["taskInfo"]["name"] for t in leaf if "retryPolicy" in t}
    assert retried == {"shard-embed", "index-build", "deploy-index", "ttt-eval"}
    # Both loops are limited, and their items are integers (shard and rank take int).
    for loop in ("comp-for-loop-1", "comp-for-loop-2"):
        params = spec["components"][loop]["inputDefinitions"]["parameters"]
        items = [v for k, v in params.items() if k.endswith("-loop-item")]
        assert [i["parameterType"] for i in items] == ["NUMBER_INTEGER"], loop
    for loop in ("for-loop-1", "for-loop-2"):
        assert spec["root"]["dag"]["tasks"][loop]["iteratorPolicy"]["parallelismLimit"] == 8
    plan = spec["components"]["comp-corpus-shard"]["outputDefinitions"]["parameters"]
    assert plan["shards"]["parameterType"] == plan["ranks"]["parameterType"] == "LIST"


def test_smoke_pipeline_turns_kfps_cache_off():
    """Every smoke task runs: with KFP's cache on (the default), a second smoke run on the
    same cluster would replay the first run's outputs instead of checking anything."""
    spec, _ = _dag("smoke.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"corpus-shard", "shard-embed", "index-build", "ttt-eval", "report"}
    for name, task in tasks.items():
        # The compiler writes `enableCache: true` for a cached task and `{}` for one without.
        assert task["cachingOptions"] == {}, (name, task["cachingOptions"])


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml"])
def test_eval_gets_the_token_the_service_and_the_labels(name):
    spec, _ = _dag(name)
    resources, k8s = _executors(name)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["auth_secret"]["defaultValue"] == "ttt-auth"
    service = params["index_service"]["defaultValue"]
    # Namespace-qualified: the KFP namespace cannot resolve the chart's short name.
    assert service == "ttt-index.ttt-index.ttt.svc.cluster.local:8080"
    (volume,) = k8s["exec-ttt-eval"]["secretAsVolume"]
    assert volume["mountPath"] == "/var/run/ttt/token"
    assert volume["secretNameParameter"]["componentInputParameter"].endswith("auth_secret")
    env = {e["name"]: e["value"] for e in resources["exec-ttt-eval"]["container"]["env"]}
    assert env["TTT_AUTH_TOKEN_FILE"] == "/var/run/ttt/token/token"
    assert env["TTT_METRICS_ADDR"] == "0.0.0.0"
    eval_task = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]["ttt-eval"]
    assert eval_task["inputs"]["parameters"]["index_service"] == {
        "componentInputParameter": "pipelinechannel--index_service"
    }
    labels = k8s["exec-ttt-eval"]["podMetadata"]["labels"]
    # The chart's NetworkPolicy admits index clients by this label; its PodMonitor scrapes by
    # ttt.dev/metrics (tests/test_chart.py checks the other side).
    assert labels["ttt.dev/index-client"] == "true" and labels["ttt.dev/metrics"] == "true"
    assert k8s["exec-shard-embed"]["podMetadata"]["labels"]["ttt.dev/metrics"] == "true"


def test_images_come_from_the_compile_time_registry_and_tag(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_IMAGE_")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compile",
            "--registry",
            "reg.example/me",
            "--tag",
            "1.2.3",
            str(tmp_path),
        ],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    resources, _ = _executors_at(tmp_path / "full.yaml")
    images = {body["container"]["image"] for body in resources.values()}
    assert images == {f"reg.example/me/ttt-{s}:1.2.3" for s in ("cpu", "embed", "index", "eval")}
    committed, _ = _executors("full.yaml")
    # The committed YAML assumes no registry: bare names at the package version.
    assert {b["container"]["image"] for b in committed.values()} == {
        f"ttt-{s}:0.1.0" for s in ("cpu", "embed", "index", "eval")
    }


def test_pull_secrets_reach_every_pod_when_compiled_with_them(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_IMAGE_")}
    args = ["--pull-secret", "ghcr-pull", "--pull-secret", "mirror-pull", str(tmp_path)]
    subprocess.run(
        [sys.executable, "-m", "pipelines.compile", *args],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    for name in NAMES:
        resources, platform = _executors_at(tmp_path / name)
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(k8s) == set(resources), name  # every executor has a platform spec
        for executor in resources:
            pulls = [p["secretName"] for p in k8s[executor]["imagePullSecret"]]
            assert pulls == ["ghcr-pull", "mirror-pull"], (name, executor)
    # The committed YAML names none (public images, or kind's locally loaded ones).
    for name in NAMES:
        _, k8s = _executors(name)
        for body in k8s.values():
            assert "imagePullSecret" not in body, name


def _executors_at(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec["deploymentSpec"]["executors"], platform


# --- every documented `kfp` command line, parsed by kfp's own click CLI -------------------

KFP_LINE = re.compile(r"kfp (?:--endpoint \S+ )?(?:--output \S+ )?run [^`\n]+")


def documented_kfp_lines() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\s*\n\s*", " ", path.read_text())  # a line may wrap in Markdown
        found += [(path.name, m.group(0).strip()) for m in KFP_LINE.finditer(text)]
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    for path in workflows:
        text = path.read_text().replace("\\\n", " ")
        # CI compiles with its image tag into build/pipelines/: the same pipelines.
        text = text.replace("build/pipelines/", "pipelines/")
        found += [(path.name, m.group(0).split(" | ")[0]) for m in KFP_LINE.finditer(text)]
    return found


class _StubClient:
    """Stands in for kfp.Client: records the submission the CLI makes, talks to nobody."""

    calls: ClassVar[list] = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def create_experiment(self, name):
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def run_pipeline(self, **kwargs):
        _StubClient.calls.append(kwargs)
        return SimpleNamespace(run_id="00000000-0000-0000-0000-000000000000")

    def get_run(self, run_id):
        raise _Submitted(run_id)


class _Submitted(Exception):
    pass


def test_every_documented_kfp_line_parses_with_the_real_cli(monkeypatch, tmp_path):
    from click.testing import CliRunner
    from kfp import client
    from kfp.cli.cli import cli
    from release_path import build_release

    lines = documented_kfp_lines()
    sources = {source for source, _ in lines}
    assert {"README.md", "getting-started.md", "kind-smoke.yml"} <= sources, lines
    assert any(" release/full.yaml" in line for _, line in lines), "the release's pipeline"
    monkeypatch.setattr(client, "Client", _StubClient)
    # A line that submits `release/...` runs where getting-started's `gh release download`
    # put the release's assets (built here by the release workflow's own step).
    downloaded = build_release(tmp_path / "release-work")
    for source, line in lines:
        monkeypatch.chdir(downloaded if " release/" in line else ROOT)
        # Shell expansions stand for values; the words are what kfp sees.
        words = shlex.split(re.sub(r"\$\(cat [^)]+\)|\$\{?\w+\}?", "X", line))[1:]
        _StubClient.calls.clear()
        result = CliRunner().invoke(cli, words, obj={})  # as kfp.__main__ does
        assert isinstance(result.exception, _Submitted), (source, line, result.output)
        assert "deprecated" not in result.output.lower(), (source, line)
        (call,) = _StubClient.calls
        package = Path.cwd() / call["pipeline_package_path"]
        pipeline_spec = next(yaml.safe_load_all(package.read_text()))
        inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
        assert call["params"] and set(call["params"]) <= set(inputs), (source, line)
        required = {k for k, v in inputs.items() if "defaultValue" not in v}
        assert required <= set(call["params"]), (source, line)


def test_components_are_thin_wrappers():
    # A component is a few lines that call ttt: stdlib and ttt imports only, no stage logic.
    for path in sorted((ROOT / "components").glob("*/component.py")):
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert len(funcs) == 1, path
        body_imports = [n for n in ast.walk(funcs[0]) if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in body_imports:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert module.split(".")[0] in {"json", "collections", "os", "ttt"}, (path, module)
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
    # the report's HTML artifact is the page itself
    pages = [p for p in root.rglob("page") if p.is_file()]
    assert len(pages) == 1 and pages[0].read_text().startswith("<!DOCTYPE html>")


@pytest.mark.slow
@pytest.mark.integration
def test_ttt_eval_reaches_real_servers_with_what_the_ir_gives_it(tmp_path, monkeypatch):
    """The ttt_eval component's function against real `ttt serve` shard servers, with the
    token file, environment and service address of the compiled full.yaml: no 401, no
    partial retrieval. Shard i listens on 127.0.0.(i+1) at the service's port, and the
    service's pod names resolve there (the cluster's DNS, played by getaddrinfo)."""
    import socket

    import httpx
    from index_shards import start_server, stop, wait_ready
    from tiny_run import tiny_spec

    from components.ttt_eval.component import ttt_eval
    from ttt.embed import embed_shard
    from ttt.index.build import build_shard_index
    from ttt.spec import loads_spec
    from ttt.stages import publish_corpus
    from ttt.store import open_store

    spec_text = tiny_spec(tmp_path, name="ir", shards=2)
    # One document per task, two neighbors, short sequences (as tests/test_dashboard.py).
    for before, after in (
        ("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1"),
        ("neighbors: 4", "neighbors: 2"),
        ("evalAfter: [0, 2, 4]", "evalAfter: [0, 2]"),
        ("maxLength: 64", "maxLength: 32"),
    ):
        assert before in spec_text, before
        spec_text = spec_text.replace(before, after)
    run = loads_spec(spec_text, environ={})
    store = open_store(run.spec.storage)
    publish_corpus(run, store, progress=False)
    for shard in range(2):
        embed_shard(run, store, shard, progress=False)
        build_shard_index(run, store, shard)

    spec, platform = _dag("full.yaml")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ttt-eval"]
    env = spec["deploymentSpec"]["executors"]["exec-ttt-eval"]["container"]["env"]
    service = spec["root"]["inputDefinitions"]["parameters"]["index_service"]["defaultValue"]
    (volume,) = k8s["secretAsVolume"]
    mount = tmp_path / "token-mount"  # the Secret's mount, here: key `token` -> file `token`
    mount.mkdir()
    (mount / "token").write_text("s3cret\n")
    for e in env:
        monkeypatch.setenv(e["name"], e["value"].replace(volume["mountPath"], str(mount)))
    monkeypatch.setenv("TTT_METRICS_ADDR", "127.0.0.1")  # the test host, not a pod

    host, port = service.rsplit(":", 1)
    statefulset, domain = host.split(".", 1)
    names = {f"{statefulset}-{i}.{domain}": f"127.0.0.{i + 1}" for i in range(2)}
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda h, *a, **k: real(names.get(h, h), *a, **k))
    spec_path = tmp_path / "run.yaml"
    spec_path.write_text(spec_text)
    servers = [
        start_server(spec_path, i, int(port), "s3cret", "--host", f"127.0.0.{i + 1}")
        for i in range(2)
    ]
    try:
        urls = [f"http://127.0.0.{i + 1}:{port}" for i in range(2)]
        for url in urls:
            wait_ready(url, timeout=60)
        out = tmp_path / "results.json"
        ttt_eval.python_func(
            spec=spec_text,
            rank=0,
            world_size=1,
            results=SimpleNamespace(path=str(out)),
            index_service=service,
        )
        result = json.loads(out.read_text())
        assert result["count"] > 0 and result["partial_retrievals"] == 0, result
        for url in urls:
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            assert 'code="401"' not in metrics
            # every series names the run it serves (the dashboard's `run`)
            pattern = rf'ttt_index_requests_total\{{code="200",run="{run.name}",shard="\d"\}} [1-9]'
            assert re.search(pattern, metrics), metrics
    finally:
        for proc in servers:
            stop(proc)


def test_the_compiled_launch_script_execs_python(tmp_path):
    """The shell KFP starts becomes Python (same pid), so a pod's SIGTERM reaches Python's
    handler (the eval drain) instead of stopping at `sh`."""
    import subprocess
    import sys
    import time

    resources, _ = _executors("full.yaml")
    command = resources["exec-ttt-eval"]["container"]["command"]
    # The component source ($0) sleeps; Python must be the process the shell started.
    source = "import time\ntime.sleep(30)\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*command[:3], source, "--help"], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        argv0 = ""
        while time.monotonic() < deadline and proc.poll() is None:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            argv0 = Path(cmdline[0].decode()).name
            if argv0.startswith("python"):
                break
            time.sleep(0.01)
        assert argv0.startswith("python"), argv0
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml", "smoke.yaml"])
def test_eval_and_report_get_the_kfp_run_id_for_mlflow(name):
    """ttt-eval and report get the run's id (KFP resolves the placeholder at run time): their
    MLflow runs are named and tagged with it, so a KFP run leads to its MLflow runs."""
    spec, _ = _dag(name)
    dags = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
    tasks = {k: t for d in dags for k, t in d["dag"]["tasks"].items()}
    for task in ("ttt-eval", "report"):
        given = tasks[task]["inputs"]["parameters"]["kfp_run_id"]
        assert given == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}, (name, task)


@pytest.mark.parametrize("name", ["full.yaml", "full-cpu.yaml"])
def test_every_task_gets_its_cpu_request_as_openmp_threads(name):
    """torch and FAISS start a thread per node core unless told: each task gets the whole
    cores it requests (two demo eval pods on 2 cores, a thread per core each, crawled). The
    smoke pipeline runs one task at a time and requests nothing: every core is its own."""
    import math

    execs, _ = _executors(name)
    for executor, body in execs.items():
        container = body["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        request = container["resources"]["cpuRequest"]
        assert env["OMP_NUM_THREADS"] == str(max(1, math.ceil(float(request)))), executor

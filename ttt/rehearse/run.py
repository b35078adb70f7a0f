"""`ttt rehearse`: the compiled pipeline and the rendered chart, run as a cluster would, beside `ttt run`."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttt.errors import TTTError
from ttt.rehearse.cluster import Cluster
from ttt.rehearse.models import plan_pushes, push_all
from ttt.rehearse.network import ip
from ttt.rehearse.pipeline import TaskPods, read_pipeline, run_pipeline
from ttt.report.table import format_table

ROOT = Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE = "ttt", "ttt"
KFP_STORE = "minio-service.kubeflow:9000"  # KFP's object store Service (MinIO or SeaweedFS)
STAND_IN = (
    "stand-in: the Kubernetes API (only what deploy-index calls: GET/PATCH statefulsets, "
    "GET statefulsets/status, GET configmaps; authorized by the chart's Roles) - no "
    "kube-apiserver runs here"
)


class RehearsalError(TTTError, RuntimeError):
    """The rehearsal failed: a task or pod failed, or the report differs from `ttt run`'s."""


@dataclass
class Rehearsal:
    """What a rehearsal did and found."""

    ok: bool
    table: str
    differences: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def slice_corpus(path: Path, lines: int | None, out: Path) -> Path:
    """The first `lines` documents of a .jsonl or .jsonl.zst file (the whole file: None)."""
    import zstandard

    data = path.read_bytes()
    zst = path.name.endswith(".zst")
    if lines is None:
        out.write_bytes(data)
        return out
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read() if zst else data
    cut = b"".join(text.splitlines(keepends=True)[:lines])
    out.write_bytes(zstandard.ZstdCompressor().compress(cut) if zst else cut)
    return out


def local_files(spec: dict[str, Any], where: str) -> dict[str, list[Path]]:
    """The spec's corpus files: every one local (the rehearsal uploads them, as kind's does)."""
    base = Path(where).parent
    out = {}
    for part in ("train", "test"):
        paths = spec["spec"]["corpus"][part]
        paths = [paths] if isinstance(paths, str) else list(paths)
        for p in paths:
            if "://" in p:
                raise RehearsalError(f"{where}: spec.corpus.{part}: {p} is not a local file")
        files = [Path(p) if Path(p).is_absolute() or Path(p).exists() else base / p for p in paths]
        for f in files:
            if not f.is_file():
                raise RehearsalError(f"{where}: spec.corpus.{part}: {f} not found")
        out[part] = files
    return out


def prepare(spec_path: Path, values: dict[str, Any], work: Path, slice_lines: int | None):
    """The local spec (sliced corpus, local store) for `ttt run`, and the cluster's: the corpus
    in the store's bucket under rehearse/, the store as the values name it."""
    doc = yaml.safe_load(spec_path.read_text())
    files = local_files(doc, str(spec_path))
    sliced: dict[str, list[Path]] = {}
    for part, paths in files.items():
        folder = work / "corpus" / part
        folder.mkdir(parents=True, exist_ok=True)
        sliced[part] = [slice_corpus(p, slice_lines, folder / p.name) for p in paths]
    local = copy.deepcopy(doc)
    for part, paths in sliced.items():
        local["spec"]["corpus"][part] = [str(p) for p in paths]
    local["spec"]["storage"] = {"root": str(work / "local-store")}
    storage = values.get("run", {}).get("spec", {}).get("storage", {})
    if not storage.get("endpoint") or not storage.get("bucket"):
        raise RehearsalError("values: run.spec.storage needs endpoint and bucket (the store)")
    cluster = copy.deepcopy(doc)
    uploads = {}
    for part, paths in sliced.items():
        keys = [f"rehearse/{doc['metadata']['name']}/{part}/{p.name}" for p in paths]
        cluster["spec"]["corpus"][part] = [f"s3://{storage['bucket']}/{k}" for k in keys]
        uploads |= dict(zip(keys, paths, strict=True))
    cluster["spec"]["storage"] = {
        k: v for k, v in storage.items() if k in ("endpoint", "bucket", "secure", "region")
    }
    return local, cluster, uploads, storage


def render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects as Helm's engine renders them (release ttt, namespace ttt)."""
    try:
        import helm_python as helm
    except ImportError as exc:
        raise RehearsalError(
            "ttt rehearse needs Helm's engine: pip install 'ttt-nn[rehearse]'"
        ) from exc
    rendered = helm.Chart.load(ROOT / "charts" / "ttt").render(
        values=values, name=RELEASE, namespace=NAMESPACE
    )
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        d["metadata"].setdefault("namespace", NAMESPACE)
    return docs


def reference_run(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """`ttt run` of the same spec on this machine, as a user runs it: its summary."""
    path = work / "local.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = work / "logs" / "ttt-run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "ttt", "run", str(path)], stdout=out,
                              stderr=subprocess.STDOUT, cwd=work, check=False)  # fmt: skip
    if done.returncode:
        raise RehearsalError(
            f"ttt run {path} failed ({done.returncode}):\n{log.read_text()[-4000:]}"
        )
    from ttt.spec import load_spec
    from ttt.store import open_store

    run = load_spec(path)
    return json.loads(open_store(run.spec.storage).get_bytes(f"{run.prefix}/report/summary.json"))


def compare(reference: dict[str, Any], rehearsed: dict[str, Any]) -> list[str]:
    """Every task's bits per byte (each checkpoint), to the printed digit, and the table."""
    diffs = []
    tasks = sorted(set(reference["tasks"]) | set(rehearsed["tasks"]))
    for task in tasks:
        a, b = reference["tasks"].get(task), rehearsed["tasks"].get(task)
        if a is None or b is None:
            diffs.append(f"{task}: only in {'the rehearsal' if a is None else 'ttt run'}")
            continue
        for key in ("documents", "before", "after"):
            x, y = a[key], b[key]
            if (f"{x:.3f}" if isinstance(x, float) else x) != (
                f"{y:.3f}" if isinstance(y, float) else y
            ):
                diffs.append(f"{task} {key}: ttt run {x} vs rehearsal {y}")
    if not diffs and format_table(reference) != format_table(rehearsed):
        diffs.append(f"the tables differ:\n{format_table(reference)}\n{format_table(rehearsed)}")
    return diffs


def rehearse(spec_path: Path, values_files: list[Path], *, pipeline: Path | None = None,
             slice_lines: int | None = None, workdir: Path | None = None,
             reference: bool = True, store_service: str = KFP_STORE, push_models: bool = False,
             log: Any = print) -> Rehearsal:  # fmt: skip
    """Run `pipeline` (default pipelines/full-cpu.yaml) and the chart rendered with
    `values_files` on this node as the kind workflow runs them on a cluster, and compare the
    report with `ttt run` of the same spec. Needs root (network and mount namespaces) and is
    meant to run in a network namespace of its own (the CLI puts it there).

    `push_models`: the cluster's spec names its models by store path, pushed into the store
    stand-in first (the route of values-gpu.yaml); `ttt run` keeps the spec's own names."""
    pipeline = pipeline or ROOT / "pipelines" / "full-cpu.yaml"
    work = Path(workdir or tempfile.mkdtemp(prefix="ttt-rehearse-"))
    work.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {}
    for f in values_files:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    local, cluster_spec, uploads, storage = prepare(spec_path, values, work, slice_lines)
    pushes = plan_pushes(cluster_spec, storage["bucket"], str(spec_path)) if push_models else {}
    if "metrics" in values.get("run", {}).get("spec", {}):
        cluster_spec["spec"]["metrics"] = values["run"]["spec"]["metrics"]
    values["run"] = cluster_spec  # the chart serves the run the pipeline makes (as kind's)
    rendered = render_chart(values)
    pipeline_spec, platform = read_pipeline(pipeline)
    ip("link", "set", "lo", "up")  # the node's own loopback (`ttt run` serves its shards there)
    expected = None
    if reference:
        log(f"rehearse: ttt run {spec_path} on this machine (the reference)")
        t0 = time.monotonic()
        expected = reference_run(local, work)
        log(f"rehearse: reference done in {time.monotonic() - t0:.0f} s")
    # KFP's object store is where it is, whatever the values say (a wrong name must fail).
    host, _, port = store_service.rpartition(":")
    service, svc_ns = host.split(".")[:2]
    cluster = Cluster(work, (service, svc_ns, int(port)), [storage["bucket"], "mlpipeline"])
    result = Rehearsal(ok=False, table="", notes=[STAND_IN])
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request lines
    try:
        cluster.up(rendered)
        client = cluster.store.client()
        for key, path in uploads.items():
            client.upload_file(str(path), storage["bucket"], key)
        for line in push_all(pushes, node_store(cluster, cluster_spec)):
            log(f"rehearse: {line}")
        log(f"rehearse: chart up ({len(cluster.statefulsets)} StatefulSet(s), "
            f"{len(cluster.jobs)} Job(s)); not enforced here: {', '.join(cluster.ignored) or '-'}")  # fmt: skip
        arguments = _arguments(pipeline_spec, rendered, cluster_spec)
        tasks = TaskPods(cluster, pipeline_spec, platform, arguments)
        log(f"rehearse: {pipeline.name} through kfp's local orchestrator, each task a pod")
        t0 = time.monotonic()
        ok = run_pipeline(tasks, pipeline, work / "kfp")
        log(f"rehearse: pipeline {'succeeded' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s "
            f"({len(tasks.tasks)} tasks)")  # fmt: skip
        result.failures += [f"task pod {name} exited {code}" for name, code in tasks.tasks if code]
        if ok:
            result.failures += _serving(cluster)
            from ttt.spec import loads_spec

            prefix = loads_spec(yaml.safe_dump(cluster_spec), environ={}).prefix
            store = node_store(cluster, cluster_spec)
            summary = json.loads(store.get_bytes(f"{prefix}/report/summary.json"))
            result.table = format_table(summary)
            if expected is None:
                result.notes.append("not compared with `ttt run` (--skip-reference)")
            else:
                result.differences = compare(expected, summary)
        else:
            result.failures.append(getattr(tasks, "error", "") or "the pipeline did not succeed")
        result.ok = ok and not result.failures and not result.differences
        result.notes.append(
            f"API requests: {len(cluster.api.requests)} ({', '.join(sorted({r.split(' as ')[0] for r in cluster.api.requests}))})"
        )
    finally:
        if not result.ok:
            result.logs = {p.name: p.read_text()[-6000:] for p in cluster.logs()}
        cluster.down()
    return result


def node_store(cluster: Cluster, cluster_spec: dict[str, Any]) -> Any:
    """The cluster's store as this node reaches it: the stand-in's address (the pods' cluster
    name is theirs), the read-write keys of the documented Secret."""
    from ttt.spec import loads_spec
    from ttt.store import open_store

    node_view = copy.deepcopy(cluster_spec)
    node_view["spec"]["storage"]["endpoint"] = cluster.store.endpoint.removeprefix("http://")
    os.environ["TTT_S3_ACCESS_KEY"] = cluster.store.keys.access
    os.environ["TTT_S3_SECRET_KEY"] = cluster.store.keys.secret
    return open_store(loads_spec(yaml.safe_dump(node_view), environ={}).spec.storage)


def _arguments(spec: dict[str, Any], rendered: list[dict], run: dict[str, Any]) -> dict[str, Any]:
    """The `kfp run create` line of the docs: spec, namespace, the index Service's address."""
    sts = next(o for o in rendered if o["kind"] == "StatefulSet")
    headless = sts["spec"]["serviceName"]
    port = next(
        s for s in rendered if s["kind"] == "Service" and s["metadata"]["name"] == headless
    )["spec"]["ports"][0]["port"]
    args = {
        "spec": yaml.safe_dump(run, sort_keys=False),
        "namespace": NAMESPACE,
        "index_service": f"{headless}.{headless}.{NAMESPACE}.svc.cluster.local:{port}",
        "index_statefulset": sts["metadata"]["name"],
    }
    known = spec["root"]["inputDefinitions"]["parameters"]
    out = {k: v for k, v in args.items() if k in known}
    for name, p in known.items():  # the defaults a submitted run gets
        if name not in out and "defaultValue" in p:
            out[name] = p["defaultValue"]
    return out


def _serving(cluster: Cluster) -> list[str]:
    """After the run, the chart's index servers serve it (the kind workflow's last step)."""
    import httpx

    problems = []
    for sts in cluster.statefulsets.values():
        for pod in sts.pods.values():
            port = pod.pod.port(pod.pod.container["readinessProbe"]["httpGet"]["port"])
            try:
                ok = httpx.get(f"http://{pod.pod.ip}:{port}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                problems.append(f"pod {pod.pod.name} does not serve /readyz after the run")
    return problems

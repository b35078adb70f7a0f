"""MLflow tracking against a real `mlflow server` (SQLite, its own artifact folder): what `ttt run`,
its eval rank and the report log, read back through MlflowClient; a server that is down or
hangs, or mlflow missing, is a warning and never a failed or slow stage."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import tiny_spec

from ttt.embed import embed_shard
from ttt.eval import evaluate_rank
from ttt.eval.records import parse_results, task_totals
from ttt.index.build import build_shard_index
from ttt.report import REPORT_FILES, build_report
from ttt.report.headline import metric_name
from ttt.spec import SpecError, loads_spec
from ttt.stages import publish_corpus
from ttt.store import open_store
from ttt.tracking import KEY_TAG, PARENT_TAG, Tracker, spec_params, tracked_rank, tracked_run

KFP_RUN = "3f2a9c1e-77b0-4d7e-9a51-0c6f1d2e8b44"
SERVER_START_S = 180  # a cold `mlflow server` imports for ~15 s on a loaded 2-core box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on a free loopback port, with its own SQLite backend
    and artifact folder (artifacts served through it, as a cluster's server would)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server's until it stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server not ready"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the worker it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tracking(uri: str, experiment: str = "ttt-test", **more) -> str:
    fields = ", ".join([f"trackingUri: '{uri}'", f"experiment: {experiment}"] +
                       [f"{k}: {v}" for k, v in more.items()])  # fmt: skip
    return f"  tracking:\n    mlflow: {{{fields}}}\n"


def _spec_text(root: Path, uri: str, **more) -> str:
    text = tiny_spec(root, "tracked", workers=1, shards=1, extra=_tracking(uri, **more))
    # one document of each of two tasks: per-task figures at three checkpoints, quickly
    text = text.replace("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1")
    return text.replace("eval: {portion", "eval: {tasks: [Python Docs, Man Pages], portion")


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """A tiny run with tracking on, its stages in this process as `ttt run` calls them (inside
    `tracked_run`, which opens the parent first), under one KFP run id: `tracked_run` reads it
    from $KFP_RUN_ID, the rank and the report get it as the components pass it."""
    root = tmp_path_factory.mktemp("run")
    run = loads_spec(_spec_text(root, mlflow_server), environ={})
    store = open_store(run.spec.storage)
    patch = pytest.MonkeyPatch()
    patch.setenv("KFP_RUN_ID", KFP_RUN)
    started = time.monotonic()
    try:
        with tracked_run(run):  # reads $KFP_RUN_ID; the rank and the report are given it
            publish_corpus(run, store, progress=False)
            embed_shard(run, store, 0)
            build_shard_index(run, store, 0)
            patch.delenv("KFP_RUN_ID")
            evaluate_rank(run, store, 0, 1, local_index=True, progress=False, kfp_run_id=KFP_RUN)
            summary = build_report(run, store, kfp_run_id=KFP_RUN)
    finally:
        patch.undo()
    return run, summary, root, time.monotonic() - started


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, run) -> list:
    experiment = client.get_experiment_by_name(run.spec.tracking.mlflow.experiment)
    return client.search_runs([experiment.experiment_id], f"tags.`ttt.run` = '{run.name}'")


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_ttt_run_logs_spec_figures_and_report_files_to_a_real_server(tracked, mlflow_server):
    run, _, root, seconds = tracked
    client = _client(mlflow_server)
    runs = _runs(client, run)  # in experiment ttt-test, where other tests' runs also go
    eval_hash = run.stage_hash("eval")
    (parent,) = [r for r in runs if r.data.tags.get("ttt.role") == "run"]
    (child,) = [r for r in runs if r.data.tags.get("ttt.role") == "rank"]

    # names and tags tie the MLflow runs to the KFP run and the spec
    assert parent.info.run_name == f"tracked-{eval_hash[:8]}-kfp-{KFP_RUN[:8]}"
    assert parent.data.tags["kfp.run_id"] == child.data.tags["kfp.run_id"] == KFP_RUN
    assert parent.data.tags["ttt.spec_hash"] == eval_hash
    assert parent.data.tags[KEY_TAG] == f"tracked/{eval_hash}/{KFP_RUN}"
    assert child.info.run_name == f"{parent.info.run_name}-rank-00000"
    assert child.data.tags[PARENT_TAG] == parent.info.run_id
    assert (child.data.tags["ttt.rank"], child.data.tags["ttt.world_size"]) == ("0", "1")
    assert parent.info.status == child.info.status == "FINISHED"

    # the resolved spec as params (defaults included), on both; no tracking settings
    for r in (parent, child):
        assert r.data.params["spec.ttt.learningRate"] == "0.001"
        assert r.data.params["spec.ttt.evalAfter"] == "[0, 2, 4]"
        assert r.data.params["spec.retrieval.neighbors"] == "4"
        assert r.data.params["spec.ttt.optimizer"] == "adam"  # a default the YAML left out
        assert r.data.params["metadata.name"] == "tracked"
        assert not [k for k in r.data.params if k.startswith("spec.tracking")]

    # bits per byte per task and checkpoint (step = neighbors), equal to the report's
    stored = json.loads(open_store(run.spec.storage).get_bytes(f"{run.prefix}/report/summary.json"))
    assert sorted(stored["tasks"]) == ["Man Pages", "Python Docs"]
    assert stored["checkpoints"] == [0, 2, 4]
    for task, v in stored["tasks"].items():
        curve = _history(client, parent.info.run_id, f"bpb.{metric_name(task)}")
        want = {n: v["checkpoints"][str(n)]["bits_per_byte"] for n in (0, 2, 4)}
        assert curve == pytest.approx(want, rel=1e-12), task
        after = client.get_metric_history(parent.info.run_id, f"bpb_after.{metric_name(task)}")
        assert [m.value for m in after] == pytest.approx([v["after"]])
    mean = _history(client, parent.info.run_id, "bpb.pile_mean")
    assert mean == pytest.approx({int(n): b for n, b in stored["mean"]["bits_per_byte"].items()})

    # the rank's own figures: sums over its records (one rank: the report's per-task curves)
    store = open_store(run.spec.storage)
    key = f"{run.prefix}/eval/rank-00000/results.jsonl"
    records = parse_results(store.get_bytes(key), key)
    assert _history(client, child.info.run_id, "documents") == {0: float(len(records))}
    for n in (0, 2, 4):
        for task, totals in task_totals(records, n).items():
            got = _history(client, child.info.run_id, f"bpb.{metric_name(task)}")[n]
            assert got == pytest.approx(totals.bits_per_byte, rel=1e-12)
            assert got == pytest.approx(
                stored["tasks"][task]["checkpoints"][str(n)]["bits_per_byte"]
            )

    # the report's files and the resolved spec as artifacts
    files = {f.path: f.file_size for f in client.list_artifacts(parent.info.run_id, "report")}
    assert set(files) == {f"report/{name}" for name in REPORT_FILES}
    assert all(size > 0 for size in files.values()), files
    local = client.download_artifacts(parent.info.run_id, "report/summary.json", str(root))
    assert json.loads(Path(local).read_text())["spec_hash"] == eval_hash
    spec_yaml = client.download_artifacts(parent.info.run_id, "spec.yaml", str(root))
    assert loads_spec(Path(spec_yaml).read_text(), environ={}) == run
    print(f"tracked tiny run: {seconds:.1f} s")


@pytest.mark.slow
def test_ttt_runs_parent_is_running_while_it_works_and_failed_when_it_fails(
    mlflow_server, tmp_path
):
    """`ttt run` (run_local) opens the parent before any worker; a failure marks it FAILED
    and a resumed run sets it RUNNING again."""
    run = loads_spec(tiny_spec(tmp_path, "failing", extra=_tracking(mlflow_server)), environ={})
    client = _client(mlflow_server)
    with pytest.raises(RuntimeError, match="a stage broke"), tracked_run(run):
        parent = Tracker(run).parent_id()
        assert client.get_run(parent).info.status == "RUNNING"
        raise RuntimeError("a stage broke")
    assert client.get_run(parent).info.status == "FAILED"
    with tracked_run(run):
        assert client.get_run(parent).info.status == "RUNNING"
        assert Tracker(run).parent_id() == parent  # the same parent: the run resumes
    # a rank that fails (an OOM kill's restart aside) ends FAILED, nested under the parent
    store = open_store(run.spec.storage)
    with pytest.raises(MemoryError), tracked_rank(run, store, 1, 2, "unused") as outcome:
        raise MemoryError
    assert "manifest" not in outcome
    (rank,) = [r for r in _runs(client, run) if r.data.tags.get("ttt.rank") == "1"]
    assert (rank.info.status, rank.data.tags[PARENT_TAG]) == ("FAILED", parent)


@pytest.mark.slow
def test_a_server_that_is_down_is_a_warning_not_a_failed_or_slow_stage(tracked, caplog):
    """The same finished run (tracking is in no stage hash: its results stay valid) pointed
    at a closed port: the rank and the report finish, each process warns once, quickly."""
    run, _, root, _ = tracked
    closed = f"http://127.0.0.1:{_free_port()}"
    down = loads_spec(
        run.to_yaml().replace(run.spec.tracking.mlflow.tracking_uri, closed), environ={}
    )
    assert down.spec.tracking.mlflow.tracking_uri == closed
    assert all(down.stage_hash(s) == run.stage_hash(s) for s in ("embed", "index", "eval"))
    store = open_store(down.spec.storage)
    import mlflow  # noqa: F401 - imported once here, so the timing below is the server's

    with caplog.at_level(logging.WARNING, logger="ttt.tracking"):
        started = time.monotonic()
        manifest = evaluate_rank(down, store, 0, 1, progress=False)
        summary = build_report(down, store, out_dir=root / "again")
        seconds = time.monotonic() - started
    assert summary["documents"] == manifest["count"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "ttt.tracking"]
    assert len(warnings) == 2, warnings  # one per tracker (the rank's, the report's)
    assert all(closed in w and "the run goes on" in w for w in warnings), warnings
    assert seconds < 20, f"a closed port cost {seconds:.1f} s"
    print(f"finished rank and report with a closed tracking port: {seconds:.1f} s")


def test_a_server_that_hangs_costs_one_timeout_then_tracking_is_off(tmp_path, caplog):
    """A server that accepts and never answers: one request's timeout (spec's 1 s, no
    retries), one warning, and no further call waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # accepted, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        text = tiny_spec(tmp_path, "hang", extra=_tracking(uri, timeoutSeconds=1, retries=0))
        run = loads_spec(text, environ={})
        t = Tracker(run)
        import mlflow  # noqa: F401 - the import's time is not the server's

        with caplog.at_level(logging.WARNING, logger="ttt.tracking"):
            started = time.monotonic()
            assert t.start_rank(0, 1) is None
            t.log_report({"checkpoints": [0], "tasks": {}, "mean": {}}, {})
            t.end("FAILED")
            seconds = time.monotonic() - started
        assert not t.enabled
        assert len([r for r in caplog.records if r.name == "ttt.tracking"]) == 1
        assert seconds < 10, f"a hanging server cost {seconds:.1f} s"
        # the spec's limits held only around the calls: the process's environment is as it was
        assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


def test_mlflow_not_installed_is_a_warning_naming_the_extra(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    run = loads_spec(
        tiny_spec(tmp_path, "absent", extra=_tracking("http://127.0.0.1:9")), environ={}
    )
    t = Tracker(run)
    with caplog.at_level(logging.WARNING, logger="ttt.tracking"):
        assert t.start_rank(0, 1) is None
        t.end("FINISHED")
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ttt.tracking"]
    assert "pip install 'ttt-nn[mlflow]'" in warning


@pytest.mark.slow
def test_ranks_that_raced_settle_on_one_parent_and_a_resumed_rank_reuses_its_run(
    mlflow_server, tmp_path
):
    """Two ranks of a KFP run that each made a parent: every tracker settles on the lowest
    run id and deletes the other; a rank's restarted pod logs into the same nested run."""
    run = loads_spec(
        tiny_spec(tmp_path, "raced", extra=_tracking(mlflow_server, "races")), environ={}
    )
    t = Tracker(run, kfp_id="race-1")
    client = _client(mlflow_server)
    made = [
        client.create_run(t.experiment_id(), run_name=t.name, tags={KEY_TAG: t.key}).info.run_id
        for _ in range(2)
    ]
    first = t.start_rank(3, 4)
    assert t.parent_id() == min(made)
    assert client.get_run(max(made)).info.lifecycle_stage == "deleted"
    assert client.get_run(first).data.tags[PARENT_TAG] == min(made)
    again = Tracker(run, kfp_id="race-1").start_rank(3, 4)
    assert again == first
    assert client.get_run(first).info.status == "RUNNING"
    other_kfp_run = Tracker(run, kfp_id="race-2")
    assert other_kfp_run.parent_id() not in made  # another KFP run: its own parent


def test_tracking_is_validated_named_and_overridden_and_in_no_stage_hash(tmp_path):
    base = tiny_spec(tmp_path, "spec")
    plain = loads_spec(base, environ={})
    tracked = loads_spec(base + _tracking("http://mlflow.mlflow:5000", runName="mine"), environ={})
    assert tracked.spec.tracking.mlflow.run_name == "mine"
    assert Tracker(tracked).name == "mine"
    for stage in ("corpus", "embed", "index", "eval", "report"):
        assert plain.stage_hash(stage) == tracked.stage_hash(stage), stage
    with pytest.raises(SpecError, match=r"spec\.tracking\.mlflow\.trackingUri: .*a URI"):
        loads_spec(base + _tracking("mlruns"), environ={})
    with pytest.raises(SpecError, match=r"spec\.tracking\.mlflow\.retries"):
        loads_spec(base + _tracking("http://m:5000", retries=-1), environ={})
    with pytest.raises(SpecError, match=r"spec\.tracking\.mlflow\.experimnt: unknown field"):
        loads_spec(base + "  tracking:\n    mlflow: {trackingUri: 'http://m:5000', experimnt: x}\n",
                   environ={})  # fmt: skip
    env = {
        "TTT_TRACKING__MLFLOW__TRACKING_URI": "http://mlflow:5000",
        "TTT_TRACKING__MLFLOW__EXPERIMENT": "from-env",
    }
    from_env = loads_spec(base, environ=env)
    assert from_env.spec.tracking.mlflow.tracking_uri == "http://mlflow:5000"
    assert from_env.spec.tracking.mlflow.experiment == "from-env"
    with pytest.raises(
        SpecError, match="TTT_TRACKING__MLFLOW__URI: spec.tracking.mlflow has no field"
    ):
        loads_spec(base, environ={"TTT_TRACKING__MLFLOW__URI": "http://m:5000"})
    with pytest.raises(SpecError, match="TTT_TTT__MODEL__NAME: spec.ttt.model is not a section"):
        loads_spec(base, environ={"TTT_TTT__MODEL__NAME": "x"})
    params = spec_params(tracked)
    assert params["spec.retrieval.distanceThreshold"] == "null"
    assert not [k for k in params if "tracking" in k]
    # an unresolved KFP placeholder (a component run by hand) is no run id: a local run's key
    local = Tracker(tracked, kfp_id="{{$.pipeline_job_uuid}}")
    assert local.kfp_id is None and local.key.endswith("/local")

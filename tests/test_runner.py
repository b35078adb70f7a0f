"""`ttt run` end to end: killed mid-evaluation and resumed, a dead shard server and worker, a bad spec."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import save_tiny_lm, tiny_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 480  # a shared 2-core CI box: a tiny run took 202 s under load


def _write_spec(root: Path, name: str, model: Path) -> Path:
    """A two-shard, two-worker run over one document per task, sharing one model directory."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "lm").exists():
        shutil.copytree(model, root / "lm")  # the same weights in every root
    text = tiny_spec(root, name, workers=2, shards=2)
    text = text.replace("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1")
    path = root / "spec.yaml"
    path.write_text(text)
    return path


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the eval workers keep a local copy of their results under $TMPDIR: keep it per test
    env["TMPDIR"] = str(root)
    env["PYTHONPATH"] = str(REPO)
    return env


def _ttt_run(spec: Path, workdir: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttt", "run", str(spec), "--workdir", str(workdir)],
        check=False,
        cwd=REPO,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _start(spec: Path, workdir: Path, root: Path, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child's now
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ttt", "run", str(spec), "--workdir", str(workdir)],
            cwd=REPO,
            env=_env(root),
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    finally:
        if log:
            out.close()


def _wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not check():
        assert proc.poll() is None, f"ttt run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of the live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                line
                for line in (entry / "status").read_text().splitlines()
                if line.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append((int(entry.name), cmdline))
    return found


def _summary(root: Path, name: str) -> dict:
    return json.loads((root / "store" / "runs" / name / "report" / "summary.json").read_text())


def _figures(summary: dict) -> dict[str, float]:
    """Every per-task number of the summary but the timings, by path."""
    out: dict[str, float] = {}

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                if key != "seconds":
                    walk(sub, f"{path}.{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = float(value)

    walk(summary["tasks"], "tasks")
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("model") / "lm")


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, model: Path) -> dict[str, float]:
    """The figures of an uninterrupted run, every shard up: what a faulted run must equal."""
    whole_root = tmp_path_factory.mktemp("whole")
    done = _ttt_run(_write_spec(whole_root, "whole", model), whole_root / "work", whole_root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Pile-weighted mean" in done.stdout and "runs/whole/report/" in done.stdout
    summary = _summary(whole_root, "whole")
    assert summary["partial_retrievals"] == 0 and summary["complete"] is True
    return _figures(summary)


def _assert_same_figures(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.timeout(1200)
def test_killed_mid_eval_and_resumed_equals_uninterrupted(
    tmp_path: Path, model: Path, whole: dict[str, float]
) -> None:
    cut_root = tmp_path / "cut"

    spec, work = _write_spec(cut_root, "cut", model), cut_root / "work"
    eval_dir = cut_root / "store" / "runs" / "cut" / "eval"
    proc = _start(spec, work, cut_root)
    try:
        # under way: a worker has finished a document (its local results file, under $TMPDIR,
        # gets a line per document; the store's copy every few seconds), and not every rank
        # is done
        def some_finished() -> bool:
            files = [*eval_dir.glob("rank-*/*.jsonl"), *eval_dir.glob("rank-*/attempts/*.jsonl")]
            return any(p.stat().st_size > 0 for p in files)

        _wait_for("a finished document", some_finished, proc)
        finished = list(eval_dir.glob("rank-*/manifest.json"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(finished) < 2, "evaluation had ended before the kill: raise the spec's work"
    # the servers and workers got SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(work / "spec.yaml")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(work / "spec.yaml")) == []

    resumed = _ttt_run(spec, work, cut_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the workers resumed: some documents were done before the kill, some were left
    counts = [
        tuple(map(int, m))
        for log in work.glob("eval-*.log")
        for m in re.findall(r"(\d+) done before, (\d+) to go", log.read_text())
    ]
    assert sum(done for done, _ in counts) > 0 and sum(left for _, left in counts) > 0, counts
    b = _figures(_summary(cut_root, "cut"))
    _assert_same_figures(whole, b)

    # a finished run: every stage is skipped and the report is the same
    started = time.monotonic()
    again = _ttt_run(spec, work, cut_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "already finished, skipping" in again.stderr
    assert "=== serve" not in again.stderr
    assert _figures(_summary(cut_root, "cut")) == b


@pytest.mark.timeout(1200)  # two tiny runs (the fixture's and this one) on a shared CI box
def test_a_killed_shard_server_and_worker_are_restarted_and_the_report_equals_all_shards(
    tmp_path: Path, model: Path, whole: dict[str, float]
) -> None:
    spec, work = _write_spec(tmp_path, "deadshard", model), tmp_path / "work"
    registry = tmp_path / "store" / "runs" / "deadshard" / "registry" / "shard-00001.json"
    run_log = tmp_path / "run.log"  # `ttt run`'s own log, as a file (no terminal)
    proc = _start(spec, work, tmp_path, run_log)
    logs = [work / "eval-0.log", work / "eval-1.log"]
    try:
        # both workers start training on their first document (the first line goes out at
        # once): the kills land mid-evaluation, before most retrievals (the engine looks one
        # ahead)
        _wait_for(
            "training",
            lambda: all(p.exists() and ": training" in p.read_text() for p in logs),
            proc,
        )
        assert registry.exists()
        url = json.loads(registry.read_text())["url"]
        ours = _processes_mentioning(str(work / "spec.yaml"))
        servers = [pid for pid, c in ours if " serve " in c and "--shard 1 " in c]
        workers = [pid for pid, c in ours if " eval " in c and "--rank 1 " in c]
        assert len(servers) == 1 and len(workers) == 1, ours
        assert f"--port {url.rsplit(':', 1)[1]}" in next(c for p, c in ours if p == servers[0])
        os.kill(servers[0], signal.SIGKILL)
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer does
        # the runner starts both again (as Kubernetes would); the workers wait for the server
        _wait_for("the restarted server", lambda: (work / "server-1.1.log").exists(), proc)
        _wait_for("the restarted worker", lambda: (work / "eval-1.1.log").exists(), proc)
        # reported as it happened (before its replacement started), not when the run ends
        assert "eval-1 exited with code -9 (killed: out of memory?)" in run_log.read_text()
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, run_log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = run_log.read_text()
    assert "\r" not in text  # no carriage-return bar in a log file, embed stage included
    # the runner's line carries every worker's counts
    assert re.search(r"eval: \d/5 documents, eval-0 .*; eval-1 ", text), text[-3000:]
    summary = _summary(tmp_path, "deadshard")
    # no document was scored without shard 1, none twice: the figures are the all-shards run's
    assert summary["partial_retrievals"] == 0 and summary["complete"] is True
    assert summary["documents"] == 5
    _assert_same_figures(whole, _figures(summary))


def test_bad_spec_exits_1_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: bad}\nspec:\n"
        f"  corpus: {{train: {tmp_path}/t.jsonl, test: {tmp_path}/t.jsonl, shards: 1}}\n"
        "  ttt: {model: gpt2}\n  eval: {workers: 0}\n"
    )
    result = _ttt_run(spec, tmp_path / "work", tmp_path)
    assert result.returncode == 1
    assert "spec.eval.workers" in result.stderr and str(spec) in result.stderr


def test_progress_counts_each_published_document_once(tmp_path):
    """The eval progress bar's figure: documents in the ranks' results, once, this spec only."""
    from ttt.runner import _documents_published
    from ttt.spec import loads_spec
    from ttt.store import LocalStore

    run = loads_spec(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: p}\n", environ={}
    )
    store = LocalStore(tmp_path)
    h = run.stage_hash("eval")

    def record(doc: str, spec_hash: str = h) -> str:
        fields = {"doc": doc, "task": "t", "bytes": 1, "words": 1, "tokens": 1, "loglik": {}}
        return json.dumps({**fields, "spec_hash": spec_hash})

    assert _documents_published(run, store, h) == 0
    rank0 = "\n".join([record("a"), record("b"), record("old", "another-spec")]) + "\n"
    store.put_bytes(f"{run.prefix}/eval/rank-00000/results.jsonl", rank0.encode())
    # rank 1 repeats "b" (a document counted once) and was cut mid-line by a crash
    rank1 = record("b") + "\n" + record("c") + "\n" + record("d")[:20]
    store.put_bytes(f"{run.prefix}/eval/rank-00001/results.jsonl", rank1.encode())
    assert _documents_published(run, store, h) == 3
    # a running attempt's own file counts too
    store.put_bytes(f"{run.prefix}/eval/rank-00001/attempts/pod-a.jsonl", record("e").encode())
    assert _documents_published(run, store, h) == 4

"""The fault matrix's store and evaluation rows: uploads, workers and results under faults."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ttt.bench.faults import Row
from ttt.bench.world import local_retriever


def copy_run(run: Any, root: Path) -> Any:
    import shutil

    from ttt.spec import loads_spec

    old = Path(run.spec.storage.root)
    shutil.copytree(old, root / "store", ignore=shutil.ignore_patterns("eval", "report"))
    return loads_spec(run.to_yaml().replace(str(old), str(root / "store")), environ={})


def _figures(summary: dict) -> dict:
    def walk(v: Any, path: str, out: dict) -> dict:
        if isinstance(v, dict):
            for k, sub in v.items():
                if k != "seconds":
                    walk(sub, f"{path}.{k}", out)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[path] = float(v)
        return out

    return walk(summary["tasks"], "tasks", {})


def report_copy(run: Any, out: Path) -> dict:
    from ttt.report import build_report
    from ttt.store import open_store

    return build_report(run, open_store(run.spec.storage), out_dir=out)


def _equal(a: dict, b: dict) -> bool:
    fa, fb = _figures(a), _figures(b)
    return fa.keys() == fb.keys() and all(np.isclose(fa[k], fb[k], rtol=1e-9) for k in fa)


def evaluate_copy(run: Any, work: Path, retriever: Any = None, store: Any = None) -> dict:
    from ttt.eval import evaluate_rank
    from ttt.store import open_store

    store = store or open_store(run.spec.storage)
    return evaluate_rank(run, store, 0, 1, retriever=retriever or local_retriever(run, store),
                         work_dir=work, flush_seconds=0.0, progress=False)  # fmt: skip


class _FlakyStore:
    """The run's store, unreachable for uploads from the `fail_from`-th on (until healed)."""

    def __init__(self, inner: Any, fail_from: int) -> None:
        self.inner, self.fail_from, self.uploads, self.healed = inner, fail_from, 0, False

    def put_file(self, *args: Any, **kwargs: Any) -> Any:
        from ttt.store import StoreUnreachable

        self.uploads += 1
        if not self.healed and self.uploads >= self.fail_from:
            raise StoreUnreachable("bench: store down (connection refused)")
        return self.inner.put_file(*args, **kwargs)

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        from ttt.store import Store

        return Store.publish(self, *args, **kwargs)  # through this put_file

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def store_down_mid_upload(spec: Path, run: Any, store: Any, root: Path, ref: dict) -> Row:
    from ttt.store import StoreError

    files = {}
    for name in ("a.bin", "b.bin", "c.bin"):
        files[name] = root / name
        files[name].write_bytes(os.urandom(1000))
    flaky = _FlakyStore(store, fail_from=2)
    prefix = f"{run.prefix}/bench/upload"
    try:
        flaky.publish(prefix, files, {"stage": "bench"})
        raised = False
    except StoreError:
        raised = True
    unfinished = store.read_manifest(prefix) is None
    flaky.healed = True
    manifest = flaky.publish(prefix, files, {"stage": "bench"})
    ok = (
        raised
        and unfinished
        and all(store.fetch(f"{prefix}/{n}", sha256=manifest["files"][n]["sha256"]) for n in files)
    )
    return Row("store down mid-upload (2nd of 3 files)",
               f"publish raised, no manifest (stage not finished: {unfinished}); retried: "
               "3/3 files verified by sha256", 0, 0, ok)  # fmt: skip


def store_down_mid_eval(spec: Path, run: Any, store: Any, root: Path, ref: dict) -> Row:
    from ttt.store import StoreError, open_store

    r = copy_run(run, root)
    flaky = _FlakyStore(open_store(r.spec.storage), fail_from=4)
    try:
        evaluate_copy(r, root / "w1", store=flaky)
        raised = "no error"
    except StoreError as exc:
        raised = type(exc).__name__
    evaluate_copy(r, root / "w2")
    got = report_copy(r, root / "rep")
    ok = raised == "StoreUnreachable" and _equal(got, ref) and got["documents"] == ref["documents"]
    return Row("store down mid-eval (from the 4th upload)",
               f"worker stopped with {raised}; rerun: {got['documents']} documents, report = "
               "uninterrupted", ref["documents"] - got["documents"],
               got["duplicates_or_stale"], ok)  # fmt: skip


def worker_sigkill(spec: Path, run: Any, store: Any, root: Path, ref: dict) -> Row:
    r = copy_run(run, root)
    yaml = root / "run.yaml"
    yaml.write_text(r.to_yaml())
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from ttt.bench.faults_eval import evaluate_copy\n"
        "from ttt.bench.world import local_retriever\n"
        "from ttt.spec import load_spec\n"
        "from ttt.store import open_store\n"
        "run = load_spec(sys.argv[1], environ={})\n"
        "inner = local_retriever(run, open_store(run.spec.storage))\n"
        "class Kill:\n"
        "    n = 0\n"
        "    def search(self, texts, k=None, with_text=True):\n"
        "        self.n += 1\n"
        "        if self.n == 4:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return inner.search(texts, k=k, with_text=with_text)\n"
        "evaluate_copy(run, Path(sys.argv[2]), Kill())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(yaml), str(root / "w1")],
                          capture_output=True, timeout=600, check=False)  # fmt: skip
    evaluate_copy(r, root / "w2")  # a fresh pod: nothing local survives
    got = report_copy(r, root / "rep")
    ok = proc.returncode == -signal.SIGKILL and _equal(got, ref)
    return Row("worker SIGKILL mid-document (at its 4th)",
               f"exit {proc.returncode}; restarted: {got['documents']} documents, report = "
               "uninterrupted", ref["documents"] - got["documents"],
               got["duplicates_or_stale"], ok)  # fmt: skip


class _Stepper:
    def __init__(self, inner: Any) -> None:
        self.inner, self.kill = inner, False
        self.go, self.entered = threading.Semaphore(0), threading.Semaphore(0)

    def search(self, texts: Any, k: Any = None, with_text: bool = True) -> Any:
        self.entered.release()
        self.go.acquire(timeout=120)
        if self.kill:
            raise KeyboardInterrupt("bench: pod killed")
        return self.inner.search(texts, k=k, with_text=with_text)

    def step(self) -> None:
        self.go.release()
        self.entered.acquire(timeout=120)


def two_writers(spec: Path, run: Any, store: Any, root: Path, ref: dict) -> Row:
    from ttt.store import open_store

    r = copy_run(run, root)
    inner = local_retriever(r, open_store(r.spec.storage))
    pods = {name: _Stepper(inner) for name in ("old", "new")}

    def pod(name: str) -> None:
        with contextlib.suppress(KeyboardInterrupt):
            evaluate_copy(r, root / name, pods[name])

    threads = {n: threading.Thread(target=pod, args=(n,)) for n in pods}
    threads["old"].start()
    pods["old"].entered.acquire(timeout=120)
    threads["new"].start()
    pods["new"].entered.acquire(timeout=120)
    pods["old"].step()
    pods["old"].step()
    pods["new"].step()
    for name in ("old", "new"):
        pods[name].kill = True
        pods[name].go.release()
        threads[name].join(120)
    evaluate_copy(r, root / "w3")
    got = report_copy(r, root / "rep")
    return Row("two writers on one rank (old pod and its replacement)",
               f"both attempts' files kept, merged: {got['documents']} documents, report = "
               "uninterrupted", ref["documents"] - got["documents"],
               got["duplicates_or_stale"], _equal(got, ref))  # fmt: skip


def flipped_byte(spec: Path, run: Any, store: Any, root: Path, ref: dict) -> Row:
    from ttt.errors import TTTError
    from ttt.index.shard import load_shard
    from ttt.stages import shard_prefix
    from ttt.store import open_store

    r = copy_run(run, root)
    s = open_store(r.spec.storage)
    evaluate_copy(r, root / "w")
    caught = []
    targets: list[tuple[str, Callable[[], Any]]] = [
        (f"{r.prefix}/eval/rank-00000/results.jsonl", lambda: report_copy(r, root / "rep")),
        (f"{r.prefix}/eval/rank-00000/manifest.json", lambda: report_copy(r, root / "rep")),
        (f"{shard_prefix(r, 'index', 0)}/index.faiss", lambda: load_shard(r, s, 0)),
    ]
    for key, read in targets:
        path = s.root / key
        data = bytearray(path.read_bytes())
        i = data.find(b"1") if key.endswith(".json") else len(data) // 2
        data[i] ^= 0x01  # one bit: the same size
        path.write_bytes(bytes(data))
        try:
            read()
        except TTTError as exc:
            caught.append(type(exc).__name__)
    n = len(targets)
    return Row("flipped byte (results, manifest, index; same size)",
               f"{len(caught)}/{n} refused ({', '.join(caught)}), never read as numbers",
               0, 0, len(caught) == n)  # fmt: skip


EVAL_FAULTS = [store_down_mid_upload, store_down_mid_eval, worker_sigkill, two_writers,
               flipped_byte]  # fmt: skip

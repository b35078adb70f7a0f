"""Tiny published runs and loopback shard servers for the index server and client tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import uvicorn

from ttt.bench import world as bench_world
from ttt.corpus import TextStore
from ttt.index.server import bind_socket, create_app
from ttt.index.shard import load_shard
from ttt.spec import TTTRun, load_spec
from ttt.stages import publish_corpus, shard_prefix
from ttt.store import open_store

DOMAINS = ["Github", "ArXiv", "Pile-CC", "Wikipedia (en)"]
TOKEN = "s3cret"  # the shard servers' bearer token in the tests
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_corpus(path: Path, n_docs: int) -> list[str]:
    texts = [
        f"document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(i % 9 + 3))
        for i in range(n_docs)
    ]
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            meta = {"pile_set_name": DOMAINS[i % len(DOMAINS)]}
            fh.write(json.dumps({"text": text, "meta": meta}) + "\n")
    return texts


def write_spec(directory: Path, corpus: Path, shards: int, extra: str = "") -> Path:
    spec = directory / "run.yaml"
    spec.write_text(
        "apiVersion: ttt.dev/v1alpha1\nkind: TTTRun\nmetadata: {name: shards-test}\n"
        f"spec:\n  corpus: {{train: ['{corpus}'], shards: {shards}}}\n"
        f"  storage: {{root: '{directory / 'store'}'}}\n{extra}"
    )
    return spec


def flat_index(vectors: np.ndarray) -> faiss.IndexFlatL2:
    """An exact (flat L2) FAISS index over the rows of `vectors`."""
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def publish_index(run: TTTRun, store, shard: int, vectors: np.ndarray) -> None:
    """Publish a flat index over `vectors` as the index stage would (embeddings bypassed)."""
    index = flat_index(vectors)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        manifest = {
            "stage": "index",
            "shard": shard,
            "spec_hash": run.stage_hash("index"),
            "created": datetime.now(UTC).isoformat(),
            "type": "flat",
        }
        store.publish(shard_prefix(run, "index", shard), {"index.faiss": path}, manifest)


def make_run(
    directory: Path,
    shards: int = 3,
    n_docs: int = 90,
    dim: int = 16,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    extra: str = "",
):
    """A published run: corpus shards, and per shard a flat index of random (or embedded)
    vectors. Returns (spec path, run, store, per-shard vectors, per-shard text stores)."""
    corpus = directory / "train.jsonl"
    write_corpus(corpus, n_docs)
    spec = write_spec(directory, corpus, shards, extra)
    run = load_spec(spec)
    store = open_store(run.spec.storage)
    publish_corpus(run, store, progress=False)
    rng = np.random.default_rng(0)
    vectors, stores = [], []
    for s in range(shards):
        texts = TextStore(directory / "store" / shard_prefix(run, "corpus", s))
        docs = [texts.text(r) for r in range(len(texts))]
        v = embed(docs) if embed else rng.standard_normal((len(texts), dim)).astype(np.float32)
        publish_index(run, store, s, v)
        vectors.append(v)
        stores.append(texts)
    return spec, run, store, vectors, stores


free_port = bench_world.free_port  # one definition, the benchmarks'


def wait_ready(url: str, timeout: float = 20.0) -> None:
    """The benchmarks' readiness wait, with the tests' shorter default."""
    bench_world.wait_ready(url, timeout)


@contextlib.contextmanager
def app_server(app, ready: bool = True) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        if ready:
            wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def serve_shard(
    run: TTTRun, store, shard: int, token: str | None = TOKEN, **options
) -> Iterator[str]:
    """An in-process shard server of a published run (create_app's `options`: limits, ...),
    served until the block ends; yields its URL once it is ready."""
    app = create_app(lambda: load_shard(run, store, shard), shard, token=token, **options)
    with app_server(app) as url:
        yield url


def start_server(
    spec: Path, shard: int, port: int, token: str = TOKEN, *extra: str
) -> subprocess.Popen:
    """`python -m ttt serve` as a subprocess (a real process to kill and SIGTERM)."""
    env = {**os.environ, "TTT_AUTH_TOKEN": token, "TTT_LOG_LEVEL": "WARNING"}
    cmd = [
        sys.executable,
        "-m",
        "ttt",
        "serve",
        "--spec",
        str(spec),
        "--shard",
        str(shard),
        "--port",
        str(port),
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> str:
    """Kill a server (if still running) and return what it printed."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is None or proc.stdout.closed:
        return ""
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    return output


@contextlib.contextmanager
def shard_processes(spec: Path, ports: list[int], token: str = TOKEN) -> Iterator[list]:
    """`ttt serve` of shard s on ports[s], for every shard; yields the list of processes
    (a test may replace one) and stops every process in it at the end."""
    procs = [start_server(spec, s, port, token) for s, port in enumerate(ports)]
    try:
        yield procs
    finally:
        for proc in procs:
            stop(proc)


class SimpleTexts:
    """A text store of the given rows."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def meta(self, row: int) -> tuple[str, str, int]:
        return f"doc:{row}", "Github", len(self.rows[row])

    def text(self, row: int) -> str:
        return self.rows[row]

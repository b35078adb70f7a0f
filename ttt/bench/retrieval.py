"""Fan-out retrieval benchmark: query latency and resident memory of N shard server processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttt.bench.text_memory import (
    mean,
    memory_figures,
    read_every_text,
    rss_bytes,
    write_text_store,
)

log = logging.getLogger(__name__)

# The paper served its flat index from 180 CPU servers; one query took 1.35 s.
PAPER_QUERY_SECONDS = 1.35
PRESETS: dict[str, dict[str, int]] = {
    # Finishes within a minute on a 2-core CI machine.
    "cpu": {
        "shards": 3,
        "vectors_per_shard": 20_000,
        "dim": 384,
        "k": 50,
        "queries": 100,
        "batch": 1,
        # A real text store per shard: 20k x 4 KB = 80 MB of text against 320 KB of offsets,
        # so that a server's resident memory shows whether it grows with the text.
        "doc_bytes": 4096,
    },
    # A paper-shaped load (1024-d RoBERTa-large vectors) for a big machine.
    "large": {
        "shards": 8,
        "vectors_per_shard": 250_000,
        "dim": 1024,
        "k": 50,
        "queries": 500,
        "batch": 1,
        "doc_bytes": 1024,
    },
}


class _SyntheticTexts:
    """A text store stand-in for random vectors: ids and a domain, no texts to hold."""

    def __init__(self, shard: int, n: int) -> None:
        self.shard, self.n = shard, n

    def __len__(self) -> int:
        return self.n

    def meta(self, row: int) -> tuple[str, str, int]:
        return f"bench-{self.shard}:{row}", "bench", 0

    def text(self, row: int) -> str:
        return f"synthetic document {row} of shard {self.shard}"


def _shard_vectors(shard: int, n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + shard).standard_normal((n, dim), dtype=np.float32)


def _serve_random_shard(
    shard: int,
    n: int,
    dim: int,
    seed: int,
    token: str,
    threads: int,
    ports: Any,
    texts: str | None = None,
    loads: Any = None,
) -> None:
    """A shard server process over random vectors (the child side of bench_retrieval).

    `texts` is the directory of a text store to serve; `loads` gets (shard, RSS before, RSS
    after) opening it.
    """
    import faiss
    import uvicorn

    from ttt.corpus import TextStore
    from ttt.index.server import bind_socket, create_app

    def load() -> tuple[Any, Any]:
        index = faiss.IndexFlatL2(dim)
        index.add(_shard_vectors(shard, n, dim, seed))
        if texts is None:
            return index, _SyntheticTexts(shard, n)
        before = rss_bytes()
        store = TextStore(texts)
        loads.put((shard, before, rss_bytes()))
        return index, store

    sock = bind_socket("127.0.0.1", 0)
    ports.put((shard, sock.getsockname()[1]))
    app = create_app(load, shard, token=token, threads=threads)  # N servers share the cores
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def _wait_ready(urls: list[str], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"shard server {url} not ready within {timeout:.0f} s")
            time.sleep(0.1)


def _command(preset: str, params: dict[str, Any]) -> str:
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in params.items() if v != PRESETS[preset].get(k)
    )
    return f"ttt bench retrieval --preset {preset}" + (f" {flags}" if flags else "")


def bench_retrieval(
    preset: str = "cpu",
    *,
    shards: int | None = None,
    vectors_per_shard: int | None = None,
    dim: int | None = None,
    k: int | None = None,
    queries: int | None = None,
    batch: int | None = None,
    doc_bytes: int | None = None,
    seed: int = 0,
    with_text: bool = False,
    baseline: bool | None = None,
) -> dict[str, Any]:
    """Fan-out k-NN latency (p50/p99 per request) over `shards` local server processes.

    Each server holds a flat index of random vectors; the client is the `ShardedRetriever`
    the evaluation uses (parallel fan-out, persistent connections, heap merge). `baseline`
    (default: when it fits in ~1 GB) also times one in-process flat index over all vectors.
    With `doc_bytes` > 0 each server also serves a real text store of documents that long,
    and the figures add its resident memory after loading and after serving every text,
    against the store's text and offsets bytes.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    given = {
        "shards": shards,
        "vectors_per_shard": vectors_per_shard,
        "dim": dim,
        "k": k,
        "queries": queries,
        "batch": batch,
        "doc_bytes": doc_bytes,
    }
    params = {**PRESETS[preset], **{n: v for n, v in given.items() if v is not None}}
    with tempfile.TemporaryDirectory(prefix="ttt-bench-retrieval-") as tmp:
        figures = _run_servers(params, Path(tmp), seed, with_text)
    lat = np.asarray(figures.pop("latencies"))
    s, n, d = params["shards"], params["vectors_per_shard"], params["dim"]
    figures = {
        "benchmark": "retrieval",
        "preset": preset,
        **params,
        "with_text": with_text,
        "requests": len(lat),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
        "mean_ms": round(float(lat.mean()) * 1e3, 3),
        "queries_per_s": round(params["queries"] / float(lat.sum()), 1),
        **figures,
        "paper_query_s": PAPER_QUERY_SECONDS,
    }
    figures["vs_paper_p50"] = round(PAPER_QUERY_SECONDS / (figures["p50_ms"] / 1e3), 1)
    if baseline if baseline is not None else s * n * d <= 256_000_000:
        q = _queries(params, seed)
        figures["single_index_p50_ms"] = _single_index_p50(s, n, d, seed, q, params)
    figures["command"] = _command(preset, {**params, "seed": seed} if seed else params)
    _print(figures)
    return figures


def _queries(params: dict[str, Any], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 10_000)
    return rng.standard_normal((params["queries"], params["dim"]), dtype=np.float32)


def _run_servers(params: dict[str, Any], tmp: Path, seed: int, with_text: bool) -> dict:
    """Start the shard servers, time the requests, read back every text; the raw figures."""
    from ttt.index.client import ShardedRetriever

    s, n, d = params["shards"], params["vectors_per_shard"], params["dim"]
    doc_bytes = params.get("doc_bytes") or 0
    stores: list[dict] = []
    for i in range(s if doc_bytes else 0):
        stores.append(write_text_store(tmp / f"shard-{i}", i, n, doc_bytes, seed))
    token = secrets.token_hex(16)
    ctx = mp.get_context("spawn")  # no forked copies of this process's threads or BLAS state
    ports, loads = ctx.Queue(), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // s)
    procs = [
        ctx.Process(
            target=_serve_random_shard,
            args=(i, n, d, seed, token, threads, ports),
            kwargs={"texts": str(tmp / f"shard-{i}") if doc_bytes else None, "loads": loads},
            daemon=True,
        )
        for i in range(s)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    try:
        found = dict(ports.get(timeout=120) for _ in procs)
        urls = [f"http://127.0.0.1:{found[i]}" for i in range(s)]
        _wait_ready(urls, timeout=600)
        figures: dict[str, Any] = {"startup_s": round(time.perf_counter() - start, 2)}
        loaded = [rss_bytes(p.pid) for p in procs]
        q, b = _queries(params, seed), params["batch"]
        latencies, partial = [], 0
        with ShardedRetriever(
            None, urls, token, k=params["k"], exclude_identical=False, timeout=60, retries=0
        ) as retriever:
            for lo in range(0, min(len(q), 5 * b), b):  # warm connections and caches
                retriever.search_vectors(q[lo : lo + b], with_text=with_text)
            for lo in range(0, len(q), b):
                t = time.perf_counter()
                results = retriever.search_vectors(q[lo : lo + b], with_text=with_text)
                latencies.append(time.perf_counter() - t)
                partial += sum(r.partial for r in results)
        figures.update(latencies=latencies, partial=partial)
        if doc_bytes:
            opened = {
                shard: after - before for shard, before, after in (loads.get() for _ in procs)
            }
            served = [read_every_text(url, token, n) for url in urls]
            after = [rss_bytes(p.pid) for p in procs]
            figures.update(memory_figures(stores, tmp, opened, loaded, after, served))
            # A second pass over the same texts: a steady server does not grow again.
            for url in urls:
                read_every_text(url, token, n)
            again = mean([rss_bytes(p.pid) - a for p, a in zip(procs, after, strict=True)])
            figures["rss_growth_second_pass_bytes"] = int(again)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return figures


def _single_index_p50(s: int, n: int, d: int, seed: int, q: np.ndarray, params: dict) -> float:
    """p50 of the same requests against one in-process flat index over every shard."""
    import faiss

    index = faiss.IndexFlatL2(d)
    for i in range(s):
        index.add(_shard_vectors(i, n, d, seed))
    b, times = params["batch"], []
    faiss.omp_set_num_threads(max(1, min(os.cpu_count() or 1, b)))  # as the servers do
    for lo in range(0, len(q), b):
        t = time.perf_counter()
        index.search(q[lo : lo + b], params["k"])
        times.append(time.perf_counter() - t)
    return round(float(np.percentile(times, 50)) * 1e3, 3)


def _print(f: dict[str, Any]) -> None:
    print(
        f"retrieval [{f['preset']}]: {f['shards']} shard servers x {f['vectors_per_shard']:,} "
        f"vectors ({f['dim']}-d, flat), k={f['k']}, {f['requests']} requests of {f['batch']}"
    )
    print(
        f"  fan-out latency p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms, "
        f"{f['queries_per_s']:.0f} queries/s, {f['partial']} partial"
    )
    if "single_index_p50_ms" in f:
        print(
            f"  one in-process flat index over all vectors: p50 {f['single_index_p50_ms']:.2f} ms"
        )
    if "text_bytes_per_shard" in f:
        mb = 2**20
        print(
            f"  text store per shard: {f['text_bytes_per_shard'] / mb:.1f} MB of text "
            f"({f['text_file_bytes_per_shard'] / mb:.1f} MB compressed), "
            f"{f['offsets_bytes_per_shard'] / 1024:.0f} KB of offsets"
        )
        print(
            f"  server RSS {f['rss_loaded_mb']:.0f} MB loaded; opening the text store took "
            f"{f['textstore_rss_bytes'] / mb:.2f} MB = {f['textstore_rss_per_offsets']}x its "
            f"offsets, {f['textstore_rss_per_text']:.2%} of its text"
        )
        print(
            f"  after serving every text ({f['texts_served_bytes_per_shard'] / mb:.1f} MB): "
            f"RSS {f['rss_served_mb']:.0f} MB, grew {f['rss_growth_serving_bytes'] / mb:.2f} MB "
            f"= {f['rss_growth_per_text']:.2%} of the text; a second pass: "
            f"{f['rss_growth_second_pass_bytes'] / mb:+.2f} MB"
        )
    print(f"  paper: {f['paper_query_s']} s per query -> {f['vs_paper_p50']}x faster at p50")
    print(f"  reproduce: {f['command']}")

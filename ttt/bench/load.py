"""A bounded loopback load run against N shard server processes: rate, latency, memory, probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ttt.bench.text_memory import rss_bytes
from ttt.bench.world import TOKEN, free_port, wait_ready

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class SyntheticTexts:
    """A text store of n rows of `size`-byte texts (a corpus on disk is not what is measured)."""

    def __init__(self, n: int, size: int = 200) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def meta(self, row: int) -> tuple[str, str, int]:
        return f"doc:{row}", "Github", self.size

    def text(self, row: int) -> str:
        return "x" * self.size


def serve_synthetic(shard: int, vectors: int, dim: int, port: int) -> None:
    """The child side: a real shard server (create_app, uvicorn, the header timeout) over a
    flat index of random vectors."""
    import faiss
    import uvicorn

    from ttt.index.server import HeaderTimeoutH11, bind_socket, create_app

    def load() -> tuple[Any, SyntheticTexts]:
        index = faiss.IndexFlatL2(dim)
        rng = np.random.default_rng(shard)
        index.add(rng.standard_normal((vectors, dim)).astype(np.float32))
        return index, SyntheticTexts(vectors)

    app = create_app(load, shard, token=TOKEN)
    config = uvicorn.Config(app, log_level="error", http=HeaderTimeoutH11, lifespan="on")
    uvicorn.Server(config).run(sockets=[bind_socket("127.0.0.1", port)])


@contextlib.contextmanager
def synthetic_servers(shards: int, vectors: int, dim: int) -> Iterator[list[tuple[str, int]]]:
    """(URL, pid) of `shards` server processes, each over `vectors` random vectors."""
    procs, urls = [], []
    try:
        for s in range(shards):
            port = free_port()
            code = f"from ttt.bench.load import serve_synthetic; serve_synthetic({s}, " \
                   f"{vectors}, {dim}, {port})"  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
            urls.append(f"http://127.0.0.1:{port}")
        for u in urls:
            wait_ready(u, timeout=120)
        yield [(u, p.pid) for u, p in zip(urls, procs, strict=True)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


async def _drive(urls: list[str], requests: int, concurrency: int, body: bytes) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    todo = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in todo:
            start = time.perf_counter()
            try:
                r = await client.post(f"{urls[i % len(urls)]}/v1/search", content=body)
                errors += r.status_code != 200
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {**AUTH, "Content-Type": "application/json"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {
        "requests": requests,
        "errors": errors,
        "requests_per_second": requests / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
    }


def load_run(
    shards: int = 3,
    vectors: int = 20_000,
    dim: int = 64,
    requests: int = 10_000,
    concurrency: int = 16,
    k: int = 10,
    batch: int = 4,
) -> dict[str, Any]:
    """`requests` searches (batch x dim, k) over `shards` servers; memory before and after."""
    queries = np.random.default_rng(7).standard_normal((batch, dim)).astype(np.float32)
    body = json.dumps({"vectors": queries.tolist(), "k": k}).encode()
    with synthetic_servers(shards, vectors, dim) as servers:
        urls = [u for u, _ in servers]
        asyncio.run(_drive(urls, 500, concurrency, body))  # warm-up: allocators, pools
        before = [rss_bytes(pid) for _, pid in servers]
        figures = asyncio.run(_drive(urls, requests, concurrency, body))
        after = [rss_bytes(pid) for _, pid in servers]
    growth = max(a - b for a, b in zip(after, before, strict=True))
    return {
        "shards": shards, "vectors_per_shard": vectors, "dim": dim, "k": k, "batch": batch,
        "concurrency": concurrency, **figures,
        "rss_mb_before": round(max(before) / 2**20, 1),
        "rss_mb_after": round(max(after) / 2**20, 1),
        "rss_growth_mb": round(growth / 2**20, 1),
    }  # fmt: skip


LARGE_SEARCHES = """
import os, sys, json, concurrent.futures, numpy as np, httpx
os.nice(10)
url, dim, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = np.random.default_rng(1).standard_normal((256, dim)).astype(np.float32)
body = json.dumps({"vectors": q.tolist(), "k": 100, "include_text": True}).encode()
def one(_):
    r = httpx.post(url + "/v1/search", content=body, timeout=300,
                   headers={"Authorization": "Bearer " + sys.argv[4]})
    return r.status_code
with concurrent.futures.ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(one, range(n)))))
"""


def probes_under_load(in_flight: int = 16, vectors: int = 20_000, dim: int = 128) -> dict:
    """/healthz latency while `in_flight` large searches (256 queries, k=100, texts: about
    6 MB each) run; the searches come from another (niced) process, as from another machine."""
    import httpx

    with synthetic_servers(1, vectors, dim) as [(url, _)]:
        # The clients stand in for other machines: niced, so that on a loopback box their
        # CPU does not pass for the server's (the server's own search threads are niced too).
        load = subprocess.Popen(
            [sys.executable, "-c", LARGE_SEARCHES, url, str(dim), str(in_flight), TOKEN],
            stdout=subprocess.PIPE,
        )
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as probe:
            while load.poll() is None:
                start = time.perf_counter()
                ok = probe.get("/healthz").status_code == 200
                latencies.append((time.perf_counter() - start) if ok else float("inf"))
                time.sleep(0.01)
        codes = json.loads(load.stdout.read() or b"[]")
    lat = np.asarray(latencies)
    return {
        "large_searches": in_flight,
        "searches_ok": sum(c == 200 for c in codes),
        "probes": len(lat),
        "probe_p50_ms": float(np.percentile(lat, 50) * 1000),
        "probe_p99_ms": float(np.percentile(lat, 99) * 1000),
        "probe_max_ms": float(lat.max() * 1000),
    }

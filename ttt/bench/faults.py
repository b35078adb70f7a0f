"""The reliability fault matrix: each fault injected for real, and what became of the numbers.

The retrieval rows are here; the store and evaluation rows in `faults_eval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttt.bench.world import (
    TOKEN,
    HashEncoder,
    app_thread,
    free_port,
    local_retriever,
    serve_process,
    wait_ready,
)


@dataclass
class Row:
    fault: str
    happened: str
    lost: int  # documents or answers lost
    double: int  # documents counted twice
    ok: bool


# --- retrieval faults --------------------------------------------------------------------


def _queries(n: int = 20) -> tuple[list[str], np.ndarray]:
    texts = [f"query {i} model graph proof" for i in range(n)]
    return texts, HashEncoder().encode(texts)


def _same(a: list, b: list) -> int:
    """How many retrievals agree (ids and distances) between two lists of Retrievals."""
    return sum(
        [n.id for n in x.neighbors] == [n.id for n in y.neighbors]
        and np.allclose([n.distance for n in x.neighbors], [n.distance for n in y.neighbors])
        for x, y in zip(a, b, strict=True)
    )


def _client(endpoints: list, **options: Any) -> Any:
    from ttt.index.client import ShardedRetriever

    base = {"k": 5, "timeout": 1.0, "retries": 1, "backoff": 0.02, "down_seconds": 0.2}
    return ShardedRetriever(HashEncoder(), endpoints, TOKEN, **{**base, **options})


def _apps(run: Any, store: Any, stack: contextlib.ExitStack) -> list[str]:
    from ttt.index.server import create_app
    from ttt.index.shard import load_shard

    return [
        stack.enter_context(
            app_thread(create_app(lambda s=s: load_shard(run, store, s), s, token=TOKEN))
        )
        for s in range(run.spec.corpus.shards)
    ]


def _fixed(body: bytes, *, status: int = 200, trickle: float = 0.0, sleep: float = 0.0):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(sleep)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        step = 1 if trickle else len(body)
        for i in range(0, len(body), step):
            await asyncio.sleep(trickle)
            await send({"type": "http.response.body", "body": body[i : i + step],
                        "more_body": True})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})

    return app


def shard_killed(spec: Path, run: Any, store: Any) -> Row:
    from ttt.index.retrieval import ShardsUnavailable

    _texts, q = _queries()
    ref = local_retriever(run, store).search_vectors(q, 5)
    ports = [free_port() for _ in range(run.spec.corpus.shards)]
    procs = [serve_process(spec, s, p) for s, p in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for u in urls:
            wait_ready(u)
        with _client(urls) as client:
            before = _same(client.search_vectors(q), ref)
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            try:
                got = client.search_vectors(q)
                refused = f"returned {sum(r.partial for r in got)} partial answers"
            except ShardsUnavailable as exc:
                refused, got = f"ShardsUnavailable (failed {exc.failed})", None
            procs[1] = serve_process(spec, 1, ports[1])
            wait_ready(urls[1])
            time.sleep(0.25)  # past the down period
            after = _same(client.search_vectors(q), ref)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    ok = got is None and before == after == len(q)
    return Row("shard server SIGKILLed", f"search raised {refused}, no partial result; after "
               f"restart {after}/{len(q)} answers = all-shards", len(q) - after, 0, ok)  # fmt: skip


def _with_bad_shard(run: Any, store: Any, app: Any, **options: Any) -> tuple[Any, float, str]:
    from ttt.index.retrieval import ShardsUnavailable

    _, q = _queries(4)
    with contextlib.ExitStack() as stack:
        urls = _apps(run, store, stack)
        urls[2] = stack.enter_context(app_thread(app))
        with _client(urls, **options) as client:
            start = time.monotonic()
            try:
                got = client.search_vectors(q)
                what = f"partial, failed_shards {got[0].failed_shards}"
            except ShardsUnavailable as exc:
                got, what = None, f"ShardsUnavailable (failed {exc.failed})"
            return got, time.monotonic() - start, what


def shard_slow(spec: Path, run: Any, store: Any) -> Row:
    app = _fixed(b"{}", sleep=10)
    got, took, what = _with_bad_shard(run, store, app, timeout=0.5, deadline=2.0)
    return Row("shard slow (10 s per answer; timeout 0.5 s, deadline 2 s)",
               f"{what} after {took:.2f} s", 0, 0, got is None and took < 2.2)  # fmt: skip


def shard_trickling(spec: Path, run: Any, store: Any) -> Row:
    body = json.dumps({"shard": 2, "results": []}).encode() * 3
    app = _fixed(body, trickle=0.1)  # each byte on time for a 0.5 s read timeout
    got, took, what = _with_bad_shard(run, store, app, timeout=0.5, deadline=1.5)
    return Row("shard trickling (a byte per 0.1 s; deadline 1.5 s)",
               f"{what} after {took:.2f} s", 0, 0, got is None and took < 1.7)  # fmt: skip


GARBAGE = {
    "not JSON": b"<html>",
    "missing key": b'{"shard": 2}',
    "short list": b'{"shard": 2, "results": [{"ids": [], "rows": [0], "domains": ["x"], '
    b'"distances": [0.1]}]}',
    "NaN": b'{"shard": 2, "results": [{"ids": ["a"], "rows": [0], "domains": ["x"], '
    b'"distances": [NaN]}]}',
    "negative distance": b'{"shard": 2, "results": [{"ids": ["a"], "rows": [0], '
    b'"domains": ["x"], "distances": [-5.0]}]}',
    "wrong shard": b'{"shard": 0, "results": []}',
}


def shard_garbage(spec: Path, run: Any, store: Any) -> Row:
    from ttt.index.retrieval import ShardsUnavailable

    _, q = _queries(1)
    ref = local_retriever(run, store).search_vectors(q, 5)
    refused = fell_over = 0
    with contextlib.ExitStack() as stack:
        urls = _apps(run, store, stack)
        for body in GARBAGE.values():
            bad = stack.enter_context(app_thread(_fixed(body)))
            with _client([*urls[:2], bad], retries=0) as client:
                with contextlib.suppress(ShardsUnavailable):
                    client.search_vectors(q)
                    continue
                refused += 1
            with _client([[urls[0]], [urls[1]], [bad, urls[2]]], retries=0) as client:
                fell_over += _same(client.search_vectors(q), ref)
    n = len(GARBAGE)
    return Row(f"shard garbage ({', '.join(GARBAGE)})",
               f"{refused}/{n} refused as that shard's failure (no other exception); with a "
               f"replica {fell_over}/{n} answers = all-shards", n - fell_over, 0,
               refused == fell_over == n)  # fmt: skip


def sigterm_drain(spec: Path, run: Any, store: Any) -> Row:
    _texts, q = _queries(4)
    ref = local_retriever(run, store).search_vectors(q, 5)
    shards = run.spec.corpus.shards
    ports = [free_port() for _ in range(shards + 1)]  # shard 0 twice
    procs = [serve_process(spec, s % shards, p, "--drain-seconds", "1")
             for s, p in enumerate([*ports[:shards], ports[shards]])]  # fmt: skip
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    errors = answers = same = 0
    try:
        for u in urls:
            wait_ready(u)
        endpoints = [[urls[0], urls[shards]], *[[u] for u in urls[1:shards]]]
        with _client(endpoints) as client:
            stop = time.monotonic() + 3
            procs[0].send_signal(signal.SIGTERM)
            while time.monotonic() < stop:
                try:
                    got = client.search_vectors(q)
                    answers += 1
                    same += _same(got, ref) == len(q)
                except Exception:  # noqa: BLE001 - counted: the row must show none
                    errors += 1
        code = procs[0].wait(20)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return Row("SIGTERM to a shard replica under queries",
               f"exit {code}; {answers} searches during the drain, {errors} errors, "
               f"{same} = all-shards", answers - same, 0,
               code == 0 and errors == 0 and same == answers > 0)  # fmt: skip


RETRIEVAL_FAULTS = [shard_killed, shard_slow, shard_trickling, shard_garbage, sigterm_drain]

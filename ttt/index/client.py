"""Fan-out retrieval: query every shard, merge per-shard top-k into the global top-k."""

from __future__ import annotations

import heapq
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import httpx
import numpy as np

from ttt import telemetry

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # the shard server's (ttt.index.server.DEFAULT_PORT, not imported: no fastapi)
# Responses that retrying cannot fix: the request or the configuration is wrong.
_FATAL = {400, 401, 403, 404, 405, 413, 422}


class RetrievalError(RuntimeError):
    """A misconfigured retrieval (bad token, wrong dimension, no servers), never a dead shard."""


class Encoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Neighbor:
    """One retrieved document: squared-L2 `distance` to the query, `row` within `shard`."""

    id: str
    domain: str
    distance: float
    shard: int
    row: int
    text: str | None = None


@dataclass
class Retrieval:
    """The neighbors of one query, nearest first; `partial` when some shard did not answer."""

    neighbors: list[Neighbor]
    partial: bool = False
    failed_shards: list[int] = field(default_factory=list)
    excluded: int = 0  # neighbors dropped by the leakage guard


@dataclass
class _Hits:
    """One shard's answer to one query, as the server sends it (distances ascending)."""

    distances: list[float]
    rows: list[int]
    ids: list[str]
    domains: list[str]


def merge_topk(per_shard: dict[int, _Hits], k: int) -> list[Neighbor]:
    """The global top-k of per-shard top-k lists: ties broken by (distance, shard, row).

    For exact (flat) shard indexes this is exactly the top-k of one index over all shards,
    since each shard's k best include every one of its rows in the global k best.
    """
    candidates = (
        (float(d), shard, int(row), i)
        for shard, hits in per_shard.items()
        for i, (d, row) in enumerate(zip(hits.distances, hits.rows, strict=True))
    )
    return [
        Neighbor(per_shard[s].ids[i], per_shard[s].domains[i], d, s, row)
        for d, s, row, i in heapq.nsmallest(k, candidates)
    ]


class _Retriever:
    """What both retrievers share: embedding, the leakage guard, the threshold, the cut to k."""

    def __init__(
        self,
        encoder: Encoder | None,
        k: int = 50,
        distance_threshold: float | None = None,
        exclude_identical: bool = True,
        identical_distance: float = 1e-6,
        exclude_margin: int = 8,
    ) -> None:
        self.encoder, self.k = encoder, k
        self.distance_threshold = distance_threshold
        self.exclude_identical, self.identical_distance = exclude_identical, identical_distance
        # Extra candidates fetched so that excluded copies of the query still leave k.
        self.exclude_margin = exclude_margin if exclude_identical else 0

    def search(
        self, texts: Sequence[str], k: int | None = None, with_text: bool = True
    ) -> list[Retrieval]:
        """The neighbors of each query text (the query is embedded with the encoder)."""
        texts = list(texts)
        if not texts:
            return []
        if self.encoder is None:
            raise RetrievalError("this retriever has no encoder; use search_vectors")
        vectors = np.asarray(self.encoder.encode(texts), dtype=np.float32)
        return self.search_vectors(vectors, k, with_text, query_texts=texts)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int | None = None,
        with_text: bool = True,
        query_texts: Sequence[str] | None = None,
    ) -> list[Retrieval]:
        """The neighbors of each query vector (n x dim float32)."""
        k = self.k if k is None else k
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if k <= 0 or len(vectors) == 0:
            return [Retrieval([]) for _ in range(len(vectors))]
        start = time.perf_counter()
        merged, failed = self._fan_out(vectors, k + self.exclude_margin, with_text)
        telemetry.RETRIEVAL_LATENCY.observe(time.perf_counter() - start)
        for shard in failed:
            telemetry.RETRIEVAL_PARTIAL.labels(str(shard)).inc(len(vectors))
        out = []
        for q, neighbors in enumerate(merged):
            query = query_texts[q] if query_texts is not None else None
            kept, excluded = self._select(neighbors, k, query)
            out.append(Retrieval(kept, bool(failed), sorted(failed), excluded))
        return out

    def _select(self, neighbors: list[Neighbor], k: int, query: str | None):
        kept, excluded = [], 0
        for n in neighbors:  # ascending distance
            if self.distance_threshold is not None and n.distance > self.distance_threshold:
                break
            identical = n.distance <= self.identical_distance or (
                query is not None and n.text is not None and n.text == query
            )
            if self.exclude_identical and identical:
                excluded += 1
                continue
            if len(kept) < k:
                kept.append(n)
        return kept, excluded

    def _fan_out(
        self, vectors: np.ndarray, k: int, with_text: bool
    ) -> tuple[list[list[Neighbor]], set[int]]:
        raise NotImplementedError


class LocalRetriever(_Retriever):
    """The same search over shard indexes held in this process (tests, tiny runs)."""

    def __init__(
        self,
        encoder: Encoder | None,
        indexes: Sequence[Any],
        text_stores: Sequence[Any],
        **options: Any,
    ) -> None:
        super().__init__(encoder, **options)
        if len(indexes) != len(text_stores):
            raise RetrievalError(f"{len(indexes)} indexes but {len(text_stores)} text stores")
        self.indexes, self.text_stores = list(indexes), list(text_stores)

    @classmethod
    def from_run(
        cls, run: Any, encoder: Encoder | None = None, store: Any = None, **options: Any
    ) -> LocalRetriever:
        """Every shard of a run loaded from the store into this process."""
        from ttt.index.shard import load_shard

        store = store or _open_store(run)
        shards = [load_shard(run, store, s) for s in range(run.spec.corpus.shards)]
        return cls(
            encoder or _encoder(run),
            [i for i, _ in shards],
            [t for _, t in shards],
            **{**_retrieval_options(run), **options},
        )

    def _fan_out(self, vectors, k, with_text):
        per_shard = {}
        for shard, (index, texts) in enumerate(zip(self.indexes, self.text_stores, strict=True)):
            d, labels = index.search(vectors, k)
            per_shard[shard] = [
                _local_hits(texts, dq, lq) for dq, lq in zip(d, labels, strict=True)
            ]
        merged = [
            merge_topk({s: per_shard[s][q] for s in per_shard}, k) for q in range(len(vectors))
        ]
        if with_text:
            merged = [
                [_with_text(n, self.text_stores[n.shard].text(n.row)) for n in ns] for ns in merged
            ]
        return merged, set()


def _local_hits(texts: Any, distances: np.ndarray, labels: np.ndarray) -> _Hits:
    keep = labels >= 0
    rows = labels[keep].tolist()
    metas = [texts.meta(r) for r in rows]
    return _Hits(distances[keep].tolist(), rows, [m[0] for m in metas], [m[1] for m in metas])


def _with_text(n: Neighbor, text: str) -> Neighbor:
    return Neighbor(n.id, n.domain, n.distance, n.shard, n.row, text)


class _ShardDown(Exception):
    pass


class ShardedRetriever(_Retriever):
    """Queries every shard server in parallel over persistent connections and merges.

    `endpoints[s]` lists the URLs serving shard s (replicas: the next one is tried when one
    fails). A shard that fails after `retries` (with backoff) is left out: the retrieval comes
    back `partial`, is logged and counted, and the shard is skipped for `down_seconds` so that
    a dead shard costs its timeout once, not on every query. Misconfiguration (a bad token,
    a wrong vector dimension) raises `RetrievalError`.
    """

    def __init__(
        self,
        encoder: Encoder | None,
        endpoints: Sequence[Sequence[str] | str],
        token: str | None = None,
        k: int = 50,
        distance_threshold: float | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        exclude_identical: bool = True,
        identical_distance: float = 1e-6,
        *,
        backoff: float = 0.1,
        down_seconds: float = 5.0,
        batch_size: int = 64,
        rows_per_request: int = 1024,
        exclude_margin: int = 8,
    ) -> None:
        super().__init__(
            encoder, k, distance_threshold, exclude_identical, identical_distance, exclude_margin
        )
        self.endpoints = [[_url(u) for u in ([e] if isinstance(e, str) else e)] for e in endpoints]
        if not self.endpoints or not all(self.endpoints):
            raise RetrievalError("ShardedRetriever: every shard needs at least one endpoint")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.down_seconds, self.batch_size = down_seconds, batch_size
        self.rows_per_request = rows_per_request
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        n = sum(len(e) for e in self.endpoints)
        # TCP_NODELAY: a request's headers and body go out without waiting for an ACK.
        nodelay = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=4 * n, max_keepalive_connections=4 * n),
        )
        self._http = httpx.Client(
            headers=headers,
            timeout=timeout,
            transport=nodelay,
        )
        self._pool = ThreadPoolExecutor(max_workers=len(self.endpoints), thread_name_prefix="shard")
        self._down_until = [0.0] * len(self.endpoints)
        self._preferred = [0] * len(self.endpoints)
        self._lock = threading.Lock()

    @classmethod
    def from_run(
        cls,
        run: Any,
        encoder: Encoder | None = None,
        store: Any = None,
        token: str | None = None,
        **options: Any,
    ) -> ShardedRetriever:
        """A retriever for a run's shard servers, found by `discover_endpoints`."""
        from ttt.index.shard import read_token

        endpoints = discover_endpoints(run, store)
        r = run.spec.retrieval
        return cls(
            encoder or _encoder(run),
            endpoints,
            read_token(token),
            **{
                **_retrieval_options(run),
                "timeout": r.timeout_seconds,
                "retries": r.retries,
                **options,
            },
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, shard: int, path: str, payload: dict) -> dict:
        """One shard's answer, trying replicas and retrying with backoff; _ShardDown if none."""
        if time.monotonic() < self._down_until[shard]:
            raise _ShardDown(f"shard {shard} marked down")
        replicas, last = self.endpoints[shard], ""
        for attempt in range(self.retries + 1):
            for j in range(len(replicas)):
                which = (self._preferred[shard] + j) % len(replicas)
                url = replicas[which] + path
                try:
                    response = self._http.post(url, json=payload)
                except httpx.HTTPError as exc:
                    last = f"{url}: {type(exc).__name__}: {exc}"
                    continue
                if response.status_code == 200:
                    self._preferred[shard] = which
                    if self._down_until[shard]:
                        log.info("shard %d is back (%s)", shard, replicas[which])
                        self._down_until[shard] = 0.0
                    return response.json()
                detail = _error_text(response)
                if response.status_code in _FATAL:
                    raise RetrievalError(
                        f"shard {shard} at {url} refused the request "
                        f"(HTTP {response.status_code}): {detail}"
                    )
                last = f"{url}: HTTP {response.status_code}: {detail}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt * random.uniform(0.5, 1.0))
        self._down_until[shard] = time.monotonic() + self.down_seconds
        telemetry.SHARD_FAILURES.labels(str(shard)).inc()
        log.warning(
            "shard %d failed after %d attempts, answering without it for %.0f s: %s",
            shard,
            self.retries + 1,
            self.down_seconds,
            last,
        )
        raise _ShardDown(last)

    def _search_shard(self, shard: int, vectors: np.ndarray, k: int) -> list[_Hits]:
        hits = []
        for lo in range(0, len(vectors), self.batch_size):
            body = self._post(
                shard,
                "/v1/search",
                {"vectors": vectors[lo : lo + self.batch_size].tolist(), "k": k},
            )
            hits += [
                _Hits(r["distances"], r["rows"], r["ids"], r["domains"]) for r in body["results"]
            ]
        return hits

    def _texts_of(self, shard: int, rows: list[int]) -> list[str]:
        texts: list[str] = []
        for lo in range(0, len(rows), self.rows_per_request):
            chunk = rows[lo : lo + self.rows_per_request]
            texts += self._post(shard, "/v1/documents", {"rows": chunk})["texts"]
        return texts

    def _fan_out(self, vectors, k, with_text):
        futures = {
            s: self._pool.submit(self._search_shard, s, vectors, k)
            for s in range(len(self.endpoints))
        }
        per_shard, failed = self._gather(futures)
        merged = [
            merge_topk({s: h[q] for s, h in per_shard.items()}, k) for q in range(len(vectors))
        ]
        if with_text:
            merged, text_failed = self._fetch_texts(merged)
            failed |= text_failed
        return merged, failed

    def _gather(self, futures: dict) -> tuple[dict, set[int]]:
        results, failed = {}, set()
        for shard, future in futures.items():
            try:
                results[shard] = future.result()
            except _ShardDown:
                failed.add(shard)
        return results, failed

    def _fetch_texts(self, merged: list[list[Neighbor]]) -> tuple[list[list[Neighbor]], set[int]]:
        """Second phase: texts of the winners only, one request per shard that has any."""
        wanted: dict[int, list[int]] = {}
        for ns in merged:
            for n in ns:
                wanted.setdefault(n.shard, []).append(n.row)
        rows = {s: sorted(set(r)) for s, r in wanted.items()}
        futures = {s: self._pool.submit(self._texts_of, s, r) for s, r in rows.items()}
        bodies, failed = self._gather(futures)
        texts = {(s, row): t for s, b in bodies.items() for row, t in zip(rows[s], b, strict=True)}
        return [
            [_with_text(n, texts[n.shard, n.row]) for n in ns if n.shard not in failed]
            for ns in merged
        ], failed


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:500]
    except ValueError:
        return response.text[:500]


def _url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if re.match(r"^https?://", url) else f"http://{url}"


def discover_endpoints(run: Any, store: Any = None) -> list[list[str]]:
    """URLs of each shard's servers: spec.retrieval.servers, a headless Service, or a registry.

    Server i of a static list or a StatefulSet serves shard i % shards (its replica i // shards).
    `service` is '<statefulset>.<service domain>[:port]'; pod i is '<statefulset>-i.<domain>'.
    Without either, a local run's servers are read from runs/<name>/registry/ in the store.
    """
    shards, r = run.spec.corpus.shards, run.spec.retrieval
    endpoints: list[list[str]] = [[] for _ in range(shards)]
    if r.servers:
        if len(r.servers) % shards:
            raise RetrievalError(
                f"spec.retrieval.servers: {len(r.servers)} URLs for {shards} shards; "
                "give shards x replicas URLs, server i serving shard i % shards"
            )
        for i, url in enumerate(r.servers):
            endpoints[i % shards].append(_url(url))
        return endpoints
    if r.service:
        host, port = _split_port(re.sub(r"^https?://", "", r.service))
        name, dot, domain = host.partition(".")
        if not dot or not name or not domain:
            raise RetrievalError(
                f"spec.retrieval.service: {r.service!r} is not '<statefulset>.<service>[:port]'"
            )
        for i in range(shards * run.spec.index.replicas):
            endpoints[i % shards].append(f"http://{name}-{i}.{domain}:{port}")
        return endpoints
    store = store or _open_store(run)
    prefix = f"{run.prefix}/registry/"
    found = []
    for key in store.list(prefix):
        match = re.search(r"shard-(\d+)(?:\.(\d+))?\.json$", key)
        if match and int(match.group(1)) < shards:
            found.append((int(match.group(1)), int(match.group(2) or 0), key))
    for shard, _, key in sorted(found):  # replica 0 first
        endpoints[shard].append(_url(store.get_json(key)["url"]))
    missing = [s for s, e in enumerate(endpoints) if not e]
    if missing:
        raise RetrievalError(
            f"no server registered for shard(s) {_ranges(missing)} under {prefix}: start them "
            "with `ttt serve --spec FILE --shard I`, or set spec.retrieval.servers or .service"
        )
    return endpoints


def _split_port(host: str) -> tuple[str, int]:
    if ":" in host:
        host, _, port = host.rpartition(":")
        if not port.isdigit():
            raise RetrievalError(f"spec.retrieval.service: bad port {port!r}")
        return host, int(port)
    return host, DEFAULT_PORT


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def _open_store(run: Any) -> Any:
    from ttt.store import open_store

    return open_store(run.spec.storage)


def _encoder(run: Any) -> Encoder:
    from ttt.embed import Encoder as TextEncoder

    return TextEncoder.from_spec(run.spec.embedding)


def _retrieval_options(run: Any) -> dict:
    r = run.spec.retrieval
    return {
        "k": r.neighbors,
        "distance_threshold": r.distance_threshold,
        "exclude_identical": r.exclude_identical,
        "identical_distance": r.identical_distance,
    }


def query(
    run: Any, texts: Sequence[str], k: int | None = None, *, local: bool = False, store: Any = None
) -> list[Retrieval]:
    """Neighbors of `texts` from a run's shard servers (or its shards loaded here: `local`)."""
    if local:
        retriever: _Retriever = LocalRetriever.from_run(run, store=store)
        return retriever.search(texts, k)
    with ShardedRetriever.from_run(run, store=store) as retriever:
        return retriever.search(texts, k)

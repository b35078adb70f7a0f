"""Fan-out retrieval over shard servers: parallel requests, retries, partial results, merge."""

from __future__ import annotations

import functools
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Self

import httpx
import numpy as np

from ttt import telemetry
from ttt.index.api import (
    BadAnswer,
    check_documents_answer,
    check_search_answer,
    collect_texts,
)
from ttt.index.discovery import discover_endpoints, normalize_url
from ttt.index.retrieval import (
    BaseRetriever,
    Encoder,
    Hits,
    LocalRetriever,
    Neighbor,
    Retrieval,
    RetrievalError,
    ShardsUnavailable,
    merge_topk,
    neighbor_with_text,
    retrieval_options,
    run_encoder,
)

__all__ = [
    "LocalRetriever",
    "Neighbor",
    "Retrieval",
    "RetrievalError",
    "ShardedRetriever",
    "ShardsUnavailable",
    "discover_endpoints",
    "merge_topk",
    "query",
]

log = logging.getLogger(__name__)

# Candidate vectors per search response (JSON, ~12 bytes a number): SIFT's K' x dim floats.
VECTOR_RESPONSE_BYTES = 8 * 2**20

# Responses that retrying cannot fix: the request or the configuration is wrong.
_FATAL = {400, 401, 403, 404, 405, 413, 422}


class _ShardDown(Exception):
    pass


class _Late(Exception):
    """The search's deadline passed while a response was still arriving."""


class ShardedRetriever(BaseRetriever):
    """Queries every shard server in parallel over persistent connections and merges.

    `endpoints[s]` lists the URLs serving shard s (replicas: the next one is tried when one
    fails). Every answer is validated (`ttt.index.api.check_search_answer`): garbage, NaN or
    a wrong shard id is that server's failure, like a timeout. A shard that fails after
    `retries` (with backoff capped at `max_backoff`) is skipped for `down_seconds` so that a
    dead shard costs its timeout once, not on every query; without `allow_partial` the
    search then raises `ShardsUnavailable`, with it the retrieval comes back `partial` if
    `min_shards` answered (none answering is always `ShardsUnavailable`). One search never
    takes longer than `deadline` seconds in all, however slowly a server trickles bytes. With `rediscover` (a function
    returning every shard's URLs, as `discover_endpoints`), a down shard's URLs are looked up
    again once its down period is over, before it is retried: a server restarted elsewhere
    (a local one on another port) is found again. Misconfiguration (a bad token, a wrong
    vector dimension) raises `RetrievalError`.
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
        identical_distance: float = 1e-3,
        *,
        backoff: float = 0.1,
        down_seconds: float = 5.0,
        batch_size: int = 64,
        rows_per_request: int = 1024,
        exclude_margin: int = 8,
        rediscover: Callable[[], Sequence[Sequence[str]]] | None = None,
        allow_partial: bool = False,
        min_shards: int = 1,
        deadline: float = 30.0,
        max_backoff: float = 2.0,
        max_response: int = 64 * 2**20,
    ) -> None:
        super().__init__(
            encoder,
            k,
            distance_threshold,
            exclude_identical,
            identical_distance,
            exclude_margin,
            allow_partial,
            min_shards,
        )
        self.deadline, self.max_backoff, self.max_response = deadline, max_backoff, max_response
        self.endpoints = [
            [normalize_url(u) for u in ([e] if isinstance(e, str) else e)] for e in endpoints
        ]
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
        # Twice the shards: a thread still reading a late answer never delays the next search.
        self._pool = ThreadPoolExecutor(
            max_workers=2 * len(self.endpoints), thread_name_prefix="shard"
        )
        self._down_until = [0.0] * len(self.endpoints)
        self._preferred = [0] * len(self.endpoints)
        self._rediscover = rediscover
        # per shard, the down period (its end) whose endpoints were looked up again
        self._rediscovered = [0.0] * len(self.endpoints)
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
        """A retriever for a run's shard servers, found (and found again after a failure)
        by `discover_endpoints`."""
        from ttt.index.shard import read_token

        endpoints = discover_endpoints(run, store)
        rediscover = None  # a static list or a Service: looking again finds the same URLs
        if not (run.spec.retrieval.servers or run.spec.retrieval.service):
            rediscover = functools.partial(discover_endpoints, run, store, missing_ok=True)
        r = run.spec.retrieval
        return cls(
            encoder or run_encoder(run),
            endpoints,
            read_token(token),
            **{
                **retrieval_options(run),
                "timeout": r.timeout_seconds,
                "retries": r.retries,
                "deadline": r.deadline_seconds,
                "max_backoff": r.max_backoff_seconds,
                "rediscover": rediscover,
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

    @property
    def shards(self) -> int:
        return len(self.endpoints)

    def _receive(self, url: str, payload: dict, deadline: float) -> tuple[int, bytes]:
        """POST and read the whole answer, within the timeout, the deadline and the byte cap."""
        timeout = max(0.001, min(self.timeout, deadline - time.monotonic()))
        with self._http.stream("POST", url, json=payload, timeout=timeout) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_response:
                    raise BadAnswer(f"answer larger than {self.max_response} bytes")
                if time.monotonic() > deadline:  # a trickle: each read is on time, the whole not
                    raise _Late(f"still receiving after the {self.deadline:.1f} s deadline")
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)

    def _post(self, shard: int, path: str, payload: dict, check: Callable, deadline: float) -> Any:
        """One shard's validated answer, trying replicas and retrying with capped backoff
        until the search's deadline; _ShardDown if none."""
        down_until = self._down_until[shard]
        if time.monotonic() < down_until:
            raise _ShardDown(f"shard {shard} marked down")
        if down_until and self._rediscover is not None:
            self._refresh_endpoints(shard, down_until, self._rediscover)
        replicas, last, attempts = self.endpoints[shard], "", 0
        for attempt in range(self.retries + 1):
            for j in range(len(replicas)):
                if time.monotonic() >= deadline:
                    last = last or f"the {self.deadline:.1f} s deadline passed"
                    break
                which = (self._preferred[shard] + j) % len(replicas)
                url = replicas[which] + path
                attempts += 1
                try:
                    status, data = self._receive(url, payload, deadline)
                    if status == 200:
                        body = check(data)
                    elif status in _FATAL:
                        raise RetrievalError(
                            f"shard {shard} at {url} refused the request "
                            f"(HTTP {status}): {_error_text(data)}"
                        )
                    else:
                        last = f"{url}: HTTP {status}: {_error_text(data)}"
                        continue
                except (httpx.HTTPError, _Late) as exc:
                    last = f"{url}: {type(exc).__name__}: {exc}"
                    continue
                except BadAnswer as exc:
                    telemetry.SHARD_BAD_ANSWERS.labels(str(shard)).inc()
                    last = f"{url}: bad answer: {exc}"
                    log.warning("shard %d: %s", shard, last)
                    continue
                self._preferred[shard] = which
                if self._down_until[shard]:
                    log.info("shard %d is back (%s)", shard, replicas[which])
                    self._down_until[shard] = 0.0
                return body
            left = deadline - time.monotonic()
            if attempt == self.retries or left <= 0:
                break
            pause = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            log.info("shard %d: retrying in %.2f s (%s)", shard, min(pause, left), last)
            time.sleep(min(pause, left))
        self._down_until[shard] = time.monotonic() + self.down_seconds
        telemetry.SHARD_FAILURES.labels(str(shard)).inc()
        log.warning(
            "shard %d failed after %d attempt(s), skipping it for %.0f s: %s",
            shard,
            attempts,
            self.down_seconds,
            last,
        )
        raise _ShardDown(last)

    def _refresh_endpoints(
        self, shard: int, down_until: float, rediscover: Callable[[], Sequence[Sequence[str]]]
    ) -> None:
        """Look a down shard's URLs up again, at most once per down period."""
        with self._lock:
            if self._rediscovered[shard] == down_until:
                return
            self._rediscovered[shard] = down_until
        try:
            found = [normalize_url(u) for u in rediscover()[shard]]
        except Exception as exc:  # noqa: BLE001 - discovery is a hint: the old URLs stay
            log.warning("shard %d: discovering its servers again failed: %s", shard, exc)
            return
        if found and found != self.endpoints[shard]:
            log.info("shard %d: servers %s now at %s", shard, self.endpoints[shard], found)
            self.endpoints[shard], self._preferred[shard] = found, 0

    def _search_shard(
        self, shard: int, vectors: np.ndarray, k: int, deadline: float, with_vectors: bool = False
    ) -> list:
        hits = []
        size = self.batch_size
        if with_vectors:  # k vectors per query come back: keep one response near 8 MB of JSON
            size = max(1, min(size, VECTOR_RESPONSE_BYTES // (k * vectors.shape[1] * 12)))
        for lo in range(0, len(vectors), size):
            batch = vectors[lo : lo + size]
            payload = {"vectors": batch.tolist(), "k": k}
            if with_vectors:
                payload["include_vectors"] = True
            body = self._post(
                shard,
                "/v1/search",
                payload,
                functools.partial(
                    check_search_answer,
                    shard=shard,
                    queries=len(batch),
                    k=k,
                    with_vectors=with_vectors,
                ),
                deadline,
            )
            hits += [Hits(r.distances, r.rows, r.ids, r.domains, r.vectors) for r in body.results]
        return hits

    def _texts_of(self, shard: int, rows: list[int], deadline: float) -> list[str]:
        """The texts of `rows`, page by page (ttt.index.api.collect_texts)."""

        def ask(chunk: list[int], offset: int) -> Any:
            payload = {"rows": chunk, **({"offset": offset} if offset else {})}
            check = functools.partial(check_documents_answer, shard=shard, rows=len(chunk))
            return self._post(shard, "/v1/documents", payload, check, deadline)

        return collect_texts(ask, rows, self.rows_per_request)

    def _fan_out(self, vectors, k, with_text, with_vectors=False):
        start = time.monotonic()
        deadline = start + self.deadline
        # The search phase may take 3/4 of the deadline, so that a shard slow to search
        # still leaves the others time to send their texts within the one deadline.
        search_deadline = start + (0.75 * self.deadline if with_text else self.deadline)
        futures = {
            s: self._pool.submit(self._search_shard, s, vectors, k, search_deadline, with_vectors)
            for s in range(len(self.endpoints))
        }
        per_shard, failed = self._gather(futures, search_deadline)
        merged = [
            merge_topk({s: h[q] for s, h in per_shard.items()}, k) for q in range(len(vectors))
        ]
        if with_text:
            merged, text_failed = self._fetch_texts(merged, deadline)
            failed |= text_failed
        return merged, failed

    def _gather(self, futures: dict, deadline: float) -> tuple[dict, set[int]]:
        results, failed = {}, set()
        for shard, future in futures.items():
            try:
                # At the deadline a request still reading is left to finish on its own (the
                # pool has room for it): the search goes on without that shard.
                results[shard] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except _ShardDown:
                failed.add(shard)
            except FutureTimeout:
                log.warning("shard %d: no answer by the search's deadline", shard)
                failed.add(shard)
        return results, failed

    def _fetch_texts(
        self, merged: list[list[Neighbor]], deadline: float
    ) -> tuple[list[list[Neighbor]], set[int]]:
        """Second phase: texts of the winners only, one request per shard that has any."""
        wanted: dict[int, list[int]] = {}
        for ns in merged:
            for n in ns:
                wanted.setdefault(n.shard, []).append(n.row)
        rows = {s: sorted(set(r)) for s, r in wanted.items()}
        futures = {s: self._pool.submit(self._texts_of, s, r, deadline) for s, r in rows.items()}
        bodies, failed = self._gather(futures, deadline)
        texts = {(s, row): t for s, b in bodies.items() for row, t in zip(rows[s], b, strict=True)}
        return [
            [neighbor_with_text(n, texts[n.shard, n.row]) for n in ns if n.shard not in failed]
            for ns in merged
        ], failed


def _error_text(data: bytes) -> str:
    try:
        body = json.loads(data)
        return str(body.get("error", body) if isinstance(body, dict) else body)[:500]
    except ValueError:
        return data[:500].decode("utf-8", "replace")


def query(
    run: Any, texts: Sequence[str], k: int | None = None, *, local: bool = False, store: Any = None
) -> list[Retrieval]:
    """Neighbors of `texts` from a run's shard servers (or its shards loaded here: `local`)."""
    if local:
        retriever: BaseRetriever = LocalRetriever.from_run(run, store=store)
        return retriever.search(texts, k)
    with ShardedRetriever.from_run(run, store=store) as retriever:
        return retriever.search(texts, k)

"""One shard's k-NN server: loads its index and text store, answers batched searches over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import faiss
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ttt import telemetry
from ttt.index.api import (
    ApiError,
    DocumentsRequest,
    DocumentsResponse,
    Limits,
    SearchRequest,
    SearchResponse,
    parse_body,
    query_matrix,
    read_body,
)
from ttt.index.rerank import RerankedIndex
from ttt.index.serving import (
    HeaderTimeoutH11,
    bind_socket,
    check_response_size,
    encode,
    lower_thread_priority,
    page_texts,
)
from ttt.index.shard import ShardError

log = logging.getLogger(__name__)

# bind_socket and HeaderTimeoutH11 are importable from here with create_app: what a caller
# needs to run the app on its own socket.
__all__ = [
    "DEFAULT_PORT",
    "HeaderTimeoutH11",
    "Limits",
    "Loader",
    "ShardState",
    "bind_socket",
    "create_app",
]

DEFAULT_PORT = 8000
# A loader returns (index, text store); the text store needs meta(row), text(row), len().
Loader = Callable[[], tuple[faiss.Index, Any]]


class ShardState:
    """What a server holds: its index and text store once loaded, and where it is in its life."""

    def __init__(self, shard: int, threads: int | None = None) -> None:
        self.shard = shard
        # the pod's share (OMP_NUM_THREADS, the chart's CPU limit), else every core
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        self.label = str(shard)
        self.index: faiss.Index | None = None
        self.texts: Any = None
        self.error: str | None = None
        self.draining = False
        self.loaded = threading.Event()
        self.can_reconstruct = False

    def load(self, loader: Loader, on_ready: Callable[[], None] | None = None) -> None:
        start = time.perf_counter()
        try:
            index, texts = loader()
            if len(texts) != index.ntotal:
                raise ShardError(
                    f"shard {self.shard}: {index.ntotal} vectors but {len(texts)} documents"
                )
            # A re-ranked index reconstructs rows from its stored vectors; others need the
            # direct map for include_vectors on IVF indexes.
            ivf = None if isinstance(index, RerankedIndex) else faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.make_direct_map()
            self.can_reconstruct = _can_reconstruct(index)
            # Registered before /readyz answers 200: whoever waits for ready finds the URL.
            if on_ready is not None:
                on_ready()
            self.index, self.texts = index, texts
        except Exception as exc:  # noqa: BLE001 - any load failure is reported by /readyz
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("shard %d: loading failed: %s", self.shard, self.error)
            return
        finally:
            self.loaded.set()
        telemetry.SHARD_VECTORS.labels(self.label).set(index.ntotal)
        telemetry.SHARD_READY.labels(self.label).set(1)
        log.info(
            "shard %d: %d vectors of dimension %d ready in %.1f s",
            self.shard,
            index.ntotal,
            index.d,
            time.perf_counter() - start,
        )

    @property
    def ready(self) -> bool:
        return self.index is not None and not self.draining

    def require_ready(self) -> faiss.Index:
        if self.error is not None:
            raise ApiError(503, f"shard {self.shard} failed to load: {self.error}")
        if self.index is None:
            raise ApiError(503, f"shard {self.shard} is still loading its index")
        return self.index


def _can_reconstruct(index: faiss.Index) -> bool:
    try:
        index.reconstruct(0) if index.ntotal else None
    except RuntimeError:
        return False
    return True


def _search(state: ShardState, req: SearchRequest, limits: Limits) -> dict:
    index = state.require_ready()
    x = query_matrix(req, index.d, limits)
    if req.include_vectors and not state.can_reconstruct:
        raise ApiError(422, "include_vectors: this shard's index type cannot return vectors")
    # FAISS parallelises a search over its queries: extra OpenMP threads for a small batch
    # only spin (a 1-query search took 15x longer with 2 threads than with 1).
    faiss.omp_set_num_threads(max(1, min(state.threads, len(x))))
    distances, labels = index.search(x, req.k)
    results, served, nbytes = [], 0, 0
    for d, rows in zip(distances, labels, strict=True):
        keep = rows >= 0  # FAISS pads with -1 when the shard holds fewer than k vectors
        rows, d = rows[keep], d[keep]
        metas = [state.texts.meta(int(r)) for r in rows]
        hits: dict[str, Any] = {
            "ids": [m[0] for m in metas],
            "rows": rows.tolist(),
            "domains": [m[1] for m in metas],
            "distances": d.tolist(),
        }
        if req.include_text:
            hits["texts"] = [state.texts.text(int(r)) for r in rows]
            nbytes += sum(len(t) for t in hits["texts"])
            # checked as the texts are gathered: the response is never built past the cap
            check_response_size(nbytes, limits)
        if req.include_vectors:
            hits["vectors"] = index.reconstruct_batch(rows).tolist() if len(rows) else []
        results.append(hits)
        served += len(rows)
    telemetry.VECTORS_SERVED.labels(state.label).inc(served)
    return {"shard": state.shard, "results": results}


def _documents(state: ShardState, req: DocumentsRequest, limits: Limits) -> dict:
    state.require_ready()
    if len(req.rows) > limits.max_rows:
        raise ApiError(422, f"rows: {len(req.rows)} rows in one request; at most {limits.max_rows}")
    n = len(state.texts)
    for i, r in enumerate(req.rows):
        if not 0 <= r < n:
            raise ApiError(422, f"rows[{i}]: row {r} is out of range; this shard has {n} rows")
    if req.rows and req.offset > len(state.texts.text(req.rows[0])):
        raise ApiError(422, f"offset: {req.offset} is past the end of row {req.rows[0]}'s text")
    texts, metas, next_offset = page_texts(state.texts, req.rows, req.offset, limits)
    return {
        "shard": state.shard,
        "ids": [m[0] for m in metas],
        "domains": [m[1] for m in metas],
        "texts": texts,
        **({"next_offset": next_offset} if next_offset is not None else {}),
    }


def create_app(
    loader: Loader,
    shard: int,
    *,
    token: str | None,
    auth_disabled: bool = False,
    limits: Limits | None = None,
    on_ready: Callable[[], None] | None = None,
    threads: int | None = None,
    run: str | None = None,
) -> FastAPI:
    """The shard's ASGI app; the index loads in a background thread once the app starts.

    `threads` caps the FAISS threads of one search (default: every core); `run` (the TTTRun's
    name) labels every series /metrics exports.
    """
    if not token and not auth_disabled:
        raise ShardError(
            f"shard {shard}: refusing to serve without an auth token; set $TTT_AUTH_TOKEN, "
            "pass --token-file FILE, or disable auth explicitly with --no-auth"
        )
    state = ShardState(shard, threads)
    limits = limits or Limits()
    expected = f"Bearer {token}".encode() if token else b""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        telemetry.SHARD_READY.labels(state.label).set(0)
        thread = threading.Thread(
            target=state.load, args=(loader, on_ready), name=f"load-shard-{shard}", daemon=True
        )
        thread.start()
        yield

    app = FastAPI(
        title=f"ttt shard {shard} k-NN server",
        version="1",
        summary="Exact or approximate k-NN search over one corpus shard (squared L2).",
        lifespan=lifespan,
        # No unauthenticated /docs or /redoc; the schema is served behind the token below.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.shard = state
    # Searches run in threads, at most max_concurrent at once and max_queued waiting; the
    # event loop only moves bytes, so /healthz and /readyz answer however busy the shard is.
    slots = asyncio.Semaphore(limits.max_concurrent)
    waiting = [0]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    def authorize(request: Request) -> None:
        if auth_disabled:
            return
        given = request.headers.get("authorization")
        if given is None:
            raise ApiError(401, "missing 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(given.encode(), expected):  # constant time
            raise ApiError(401, "invalid bearer token")

    def handle(model: type[BaseModel], work: Callable, data: bytes) -> bytes:
        # Parsing, the search and serializing, all off the event loop, in threads the kernel
        # schedules after the loop's: a busy shard still answers its probes.
        lower_thread_priority()
        return encode(work(state, parse_body(data, model), limits), limits)

    async def counted(request: Request, model: type[BaseModel], work: Callable) -> Response:
        start, code = time.perf_counter(), 500
        try:
            authorize(request)
            data = await read_body(request, limits.max_body)
            if slots.locked() and waiting[0] >= limits.max_queued:
                raise ApiError(503, f"busy: {limits.max_concurrent} searches running and "
                               f"{waiting[0]} waiting; retry later")  # fmt: skip
            waiting[0] += 1
            try:
                await slots.acquire()
            finally:
                waiting[0] -= 1
            try:
                body = await run_in_threadpool(handle, model, work, data)
            finally:
                slots.release()
            code = 200
            return Response(body, media_type="application/json")
        except ApiError as exc:
            code = exc.status
            raise
        finally:
            telemetry.SEARCH_REQUESTS.labels(state.label, str(code)).inc()
            if code == 200:
                telemetry.SEARCH_LATENCY.labels(state.label).observe(time.perf_counter() - start)

    def body_doc(model: type[BaseModel]) -> dict:
        schema = {"content": {"application/json": {"schema": model.model_json_schema()}}}
        return {"requestBody": {**schema, "required": True}}

    errors = {
        code: {"description": why}
        for code, why in [
            (400, "malformed JSON"),
            (401, "missing or invalid bearer token"),
            (413, "body too large"),
            (422, "a limit or field violated"),
            (503, "not ready"),
        ]
    }

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        openapi_extra=body_doc(SearchRequest),
        responses=errors,
    )
    async def search(request: Request) -> JSONResponse:
        """k nearest rows of this shard per query vector, with ids, domains and distances."""
        return await counted(request, SearchRequest, _search)

    @app.post(
        "/v1/documents",
        response_model=DocumentsResponse,
        openapi_extra=body_doc(DocumentsRequest),
        responses=errors,
    )
    async def documents(request: Request) -> JSONResponse:
        """Ids, domains and texts of rows of this shard."""
        return await counted(request, DocumentsRequest, _documents)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        """The OpenAPI schema, behind the token like the API it describes."""
        authorize(request)
        return JSONResponse(app.openapi())

    # Probes are coroutines: they run on the event loop, never queued behind a busy thread pool.
    @app.get("/healthz")
    async def healthz() -> dict:
        """Alive (answers while the index loads)."""
        return {"status": "alive", "shard": shard}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the index is loaded; 503 while loading, after a failed load and draining."""
        if state.ready:
            body = {
                "status": "ready",
                "shard": shard,
                "vectors": int(state.index.ntotal),
                "dimension": int(state.index.d),
            }
            return JSONResponse(body)
        status = "draining" if state.draining else "failed" if state.error else "loading"
        # The load error (it may name endpoints, buckets and keys) goes to the log, not here.
        return JSONResponse({"status": status, "shard": shard}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition of this process."""
        return Response(telemetry.exposition(run), media_type=CONTENT_TYPE_LATEST)

    return app

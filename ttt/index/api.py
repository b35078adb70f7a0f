"""The HTTP API of a shard server: request and response schemas, limits, their 4xx errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttt.spec import SERVER_MAX_K

if TYPE_CHECKING:  # the client validates answers with these models and needs no fastapi
    from fastapi import Request

# Squared L2 of an exact copy can come out of FAISS's BLAS path a little below zero.
MIN_DISTANCE = -1e-3


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 4xx that says which limit.

    `max_results` bounds k x queries, `max_vector_values` the numbers include_vectors
    returns (k x queries x dimension), `max_response` the bytes of one response: a small
    request must not be able to draw a response of hundreds of MB. `max_concurrent`
    searches run at once, `max_queued` more wait; past that the server answers 503 (busy).
    """

    max_k: int = SERVER_MAX_K
    max_batch: int = 256
    max_body: int = 16 * 2**20
    max_rows: int = 4096
    max_results: int = 65_536
    max_vector_values: int = 4 * 2**20
    max_response: int = 64 * 2**20
    # one search per core at a time: more threads only contend for the cores and the GIL
    max_concurrent: int = field(default_factory=lambda: max(2, os.cpu_count() or 1))
    max_queued: int = 64


class SearchRequest(BaseModel):
    """POST /v1/search: k nearest rows of this shard for each query vector."""

    # strict: "1.5" is not a number and true is not an int; NaN and inf are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    vectors: list[list[float]] = Field(description="query vectors, one list per query")
    k: int = Field(10, description="neighbors per query")
    include_text: bool = Field(False, description="return each neighbor's text")
    include_vectors: bool = Field(False, description="return each neighbor's stored vector")


class QueryHits(BaseModel):
    # The client validates every answer with these models: NaN, a negative row or distance,
    # lists of different lengths or distances out of order are a bad answer, never data.
    model_config = ConfigDict(allow_inf_nan=False)
    ids: list[str]
    rows: list[Annotated[int, Field(ge=0)]]
    domains: list[str]
    distances: list[Annotated[float, Field(ge=MIN_DISTANCE)]] = Field(
        description="squared L2, ascending"
    )
    texts: list[str] | None = None
    vectors: list[list[float]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> QueryHits:
        n = len(self.rows)
        lengths = [len(self.ids), len(self.domains), len(self.distances)]
        lengths += [len(x) for x in (self.texts, self.vectors) if x is not None]
        if any(m != n for m in lengths):
            raise ValueError(f"{n} rows but lists of lengths {lengths}")
        if any(b < a for a, b in zip(self.distances, self.distances[1:], strict=False)):
            raise ValueError("distances are not in ascending order")
        return self


class SearchResponse(BaseModel):
    shard: Annotated[int, Field(ge=0)]
    results: list[QueryHits]


class DocumentsRequest(BaseModel):
    """POST /v1/documents: ids, domains and texts of rows (the second phase of a fan-out).

    Paged: an answer holds the texts of the first rows that fit the response cap, and a text
    too long for one answer comes in pieces; `offset` is where rows[0]'s text resumes (its
    characters already received)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rows: list[int]
    offset: Annotated[int, Field(ge=0)] = 0


class DocumentsResponse(BaseModel):
    """The texts of the first len(texts) rows asked for (texts[0] from the request's offset);
    `next_offset`, when set, says the last text is cut there: ask again from that row."""

    shard: Annotated[int, Field(ge=0)]
    ids: list[str]
    domains: list[str]
    texts: list[str]
    next_offset: Annotated[int, Field(ge=1)] | None = None


class BadAnswer(ValueError):
    """A shard's answer that does not hold up: not JSON, a wrong shape, value or shard id."""


def check_search_answer(
    data: bytes, shard: int, queries: int, k: int, with_vectors: bool = False
) -> SearchResponse:
    """A shard's /v1/search answer, validated against the request it answers."""
    body = _validated(data, SearchResponse)
    if body.shard != shard:
        raise BadAnswer(f"answered for shard {body.shard}, not {shard}")
    if len(body.results) != queries:
        raise BadAnswer(f"{len(body.results)} results for {queries} queries")
    for q, hits in enumerate(body.results):
        if len(hits.rows) > k:
            raise BadAnswer(f"results[{q}]: {len(hits.rows)} neighbors for k={k}")
        if with_vectors and hits.vectors is None:
            raise BadAnswer(f"results[{q}]: no vectors although include_vectors was asked")
    return body


def check_documents_answer(data: bytes, shard: int, rows: int) -> DocumentsResponse:
    """A shard's /v1/documents answer, validated against the rows asked for."""
    body = _validated(data, DocumentsResponse)
    if body.shard != shard:
        raise BadAnswer(f"answered for shard {body.shard}, not {shard}")
    n = len(body.texts)
    if not n == len(body.ids) == len(body.domains) or not min(rows, 1) <= n <= rows:
        raise BadAnswer(f"{n} texts for {rows} rows")  # a page holds at least one
    return body


def collect_texts(
    ask: Callable[[list[int], int], DocumentsResponse], rows: list[int], per_request: int
) -> list[str]:
    """The texts of `rows` from a paged /v1/documents: `ask(rows, offset)` answers the first
    rows that fit a response, and cuts a longer text (`next_offset`); ask on until every text
    is whole, so no answer's size is ever fatal."""
    texts: list[str] = []
    pending, offset, partial = list(rows), 0, ""
    while pending:
        body = ask(pending[:per_request], offset)
        got = list(body.texts)
        got[0], partial = partial + got[0], ""
        if body.next_offset is None:
            texts += got
            pending, offset = pending[len(got) :], 0
            continue
        if len(got) == 1 and body.next_offset <= offset:
            raise BadAnswer(f"next_offset {body.next_offset} does not move past {offset}")
        texts += got[:-1]
        pending, offset, partial = pending[len(got) - 1 :], body.next_offset, got[-1]
    return texts


def _validated(data: bytes, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise BadAnswer(describe_errors(exc, limit=2)) from None


class ApiError(Exception):
    """A request this server refuses: an HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """Pydantic errors as 'vectors[0][2]: Input should be a finite number; ...'."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc.lstrip('.') or 'body'}: {msg}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more errors)" if more > 0 else "")


async def read_body(request: Request, max_body: int) -> bytes:
    """The raw body: 413 over `max_body` (declared or streamed), 400 when empty."""
    declared = request.headers.get("content-length")
    too_big = f"this server accepts at most {max_body} bytes; send fewer vectors per request"
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"request body is {declared} bytes; {too_big}")
    chunks, size = [], 0
    async for chunk in request.stream():  # bounded even when no Content-Length is sent
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body exceeds {max_body} bytes; {too_big}")
        chunks.append(chunk)
    if size == 0:
        raise ApiError(400, "empty request body; send a JSON object")
    return b"".join(chunks)


def parse_body(data: bytes, model: type[BaseModel]) -> Any:
    """The body parsed into `model`: 400 not JSON, 422 wrong fields (run off the event loop)."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ApiError(400, f"malformed JSON: {exc.errors()[0]['msg']}") from None
        raise ApiError(422, describe_errors(exc)) from None


def query_matrix(req: SearchRequest, dim: int, limits: Limits) -> np.ndarray:
    """The query vectors as float32 once every limit and the dimension are checked."""
    if not req.vectors:
        raise ApiError(422, "vectors: at least one query vector is required")
    if len(req.vectors) > limits.max_batch:
        raise ApiError(
            422, f"vectors: {len(req.vectors)} queries in one request; at most {limits.max_batch}"
        )
    if not 1 <= req.k <= limits.max_k:
        raise ApiError(422, f"k: {req.k} is out of range; 1 <= k <= {limits.max_k}")
    if req.k * len(req.vectors) > limits.max_results:
        raise ApiError(
            422,
            f"k x queries = {req.k} x {len(req.vectors)} = {req.k * len(req.vectors)} neighbors; "
            f"at most {limits.max_results} per request: send fewer queries",
        )
    values = req.k * len(req.vectors) * dim
    if req.include_vectors and values > limits.max_vector_values:
        raise ApiError(
            422,
            f"include_vectors: k x queries x dimension = {values} numbers; at most "
            f"{limits.max_vector_values} per request: send fewer queries or a smaller k",
        )
    for i, v in enumerate(req.vectors):
        if len(v) != dim:
            raise ApiError(
                422, f"vectors[{i}] has {len(v)} numbers; this shard's index has dimension {dim}"
            )
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        x = np.asarray(req.vectors, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ApiError(422, f"vectors[{bad}] holds a number too large for float32")
    return x

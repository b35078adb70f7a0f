"""The HTTP API of a shard server: request and response schemas, limits, their 4xx errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 4xx that says which limit."""

    max_k: int = 1024
    max_batch: int = 256
    max_body: int = 16 * 2**20
    max_rows: int = 4096


class SearchRequest(BaseModel):
    """POST /v1/search: k nearest rows of this shard for each query vector."""

    # strict: "1.5" is not a number and true is not an int; NaN and inf are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    vectors: list[list[float]] = Field(description="query vectors, one list per query")
    k: int = Field(10, description="neighbors per query")
    include_text: bool = Field(False, description="return each neighbor's text")
    include_vectors: bool = Field(False, description="return each neighbor's stored vector")


class QueryHits(BaseModel):
    ids: list[str]
    rows: list[int]
    domains: list[str]
    distances: list[float] = Field(description="squared L2, ascending")
    texts: list[str] | None = None
    vectors: list[list[float]] | None = None


class SearchResponse(BaseModel):
    shard: int
    results: list[QueryHits]


class DocumentsRequest(BaseModel):
    """POST /v1/documents: ids, domains and texts of rows (the second phase of a fan-out)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rows: list[int]


class DocumentsResponse(BaseModel):
    shard: int
    ids: list[str]
    domains: list[str]
    texts: list[str]


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


async def read_json(request: Request, model: type[BaseModel], max_body: int) -> Any:
    """The body parsed into `model`: 413 over `max_body`, 400 not JSON, 422 wrong fields."""
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
    try:
        return model.model_validate_json(b"".join(chunks))
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

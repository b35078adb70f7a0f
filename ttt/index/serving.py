"""The shard server's HTTP plumbing: bounded responses, niced worker threads, header timeout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ttt.index.api import ApiError, Limits

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # a connection that sends no complete request headers is closed


_niced = threading.local()
WORKER_NICE = 10


def lower_thread_priority() -> None:
    """Nice this worker thread (Linux: per thread), once; the event loop keeps its priority."""
    if getattr(_niced, "done", False):
        return
    _niced.done = True
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)


def check_response_size(nbytes: int, limits: Limits) -> None:
    if nbytes > limits.max_response:
        raise ApiError(
            413,
            f"the response would exceed {limits.max_response} bytes; ask for fewer queries, "
            "a smaller k or no texts (fetch texts of the merged top-k with /v1/documents)",
        )


def page_texts(
    store: Any, rows: list[int], offset: int, limits: Limits
) -> tuple[list[str], list[Any], int | None]:
    """/v1/documents' page: the texts (and id, domain) of the first rows whose JSON fits the
    response cap, rows[0]'s from `offset`; a first text too long for one answer is cut, and
    the character to resume at is returned (else None). Never a 413 for size."""
    budget = limits.max_response - 256  # the object around the lists
    texts: list[str] = []
    metas: list[Any] = []
    used = 0
    for i, row in enumerate(rows):
        meta = store.meta(row)
        text = store.text(row)[offset:] if i == 0 else store.text(row)
        overhead = len(json.dumps(list(meta[:2]), ensure_ascii=False).encode()) + 8
        size = len(json.dumps(text, ensure_ascii=False).encode()) + overhead
        if used + size <= budget:
            texts.append(text)
            metas.append(meta)
            used += size
            continue
        if texts:
            break  # the rest on the next page
        # one text longer than a whole answer: a piece (JSON spends at most 6 B a character)
        piece = min(max(1, (budget - overhead) // 6), max(1, len(text) - 1))
        return [text[:piece]], [meta], offset + piece
    return texts, metas, None


def encode(result: dict, limits: Limits) -> bytes:
    """The JSON of a response, piece by piece (no one long GIL-holding call), within the cap."""
    fields, size = [], 0
    for key, value in result.items():
        if isinstance(value, list):
            items = [json.dumps(v, ensure_ascii=False).encode() for v in value]
            encoded = b"[" + b",".join(items) + b"]"
        else:
            encoded = json.dumps(value).encode()
        size += len(encoded)
        check_response_size(size, limits)
        fields.append(json.dumps(key).encode() + b": " + encoded)
    return b"{" + b", ".join(fields) + b"}"


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that sends no request headers in
    HEADER_TIMEOUT_S (uvicorn only times out idle keep-alive connections): idle or trickling
    sockets cannot pile up against a shard server."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._no_headers)

    def _no_headers(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            log.info("closing a connection from %s that sent no request headers", self.client)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response waits 40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

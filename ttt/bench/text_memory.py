"""Whether a shard server's memory grows with its text: a real text store of random-word
documents, every text read back through the paged /v1/documents, and the RSS it accounts for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ROWS_PER_REQUEST = 256  # /v1/documents batches when every text is read back


def write_text_store(directory: Path, shard: int, n: int, doc_bytes: int, seed: int) -> dict:
    """A text store (the corpus stage's format) of `n` random-word documents of `doc_bytes`."""
    from ttt.corpus.documents import Document
    from ttt.corpus.textstore import _ShardWriter

    rng = np.random.default_rng(seed + 20_000 + shard)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype="S1")
    vocab = [b"".join(rng.choice(letters, rng.integers(2, 11))).decode() for _ in range(4096)]
    # Documents are slices of one long random-word text: ~2x compressible, like prose.
    pool = " ".join(rng.choice(vocab, max(4 * doc_bytes, 1 << 22) // 6))
    writer = _ShardWriter(directory, shard)
    try:
        for row, start in enumerate(rng.integers(0, len(pool) - doc_bytes, n)):
            text = pool[start : start + doc_bytes]
            writer.add(Document(f"bench-{shard}:{row}", "bench", text, len(text), "bench", row))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (default: this one): psutil, else /proc/PID/status."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            kb = next(line.split()[1] for line in fh if line.startswith("VmRSS:"))
        return int(kb) * 1024
    return int(psutil.Process(pid).memory_info().rss)


def read_every_text(url: str, token: str, n: int) -> int:
    """Ask a server for every text of its shard; the bytes of text it returned."""
    import httpx

    from ttt.index.api import DocumentsResponse, collect_texts

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:

        def ask(rows: list[int], offset: int) -> DocumentsResponse:  # one page
            r = http.post("/v1/documents", json={"rows": rows, "offset": offset})
            r.raise_for_status()
            return DocumentsResponse.model_validate_json(r.content)

        texts = collect_texts(ask, list(range(n)), ROWS_PER_REQUEST)
    return sum(len(t.encode("utf-8")) for t in texts)


def mean(values: Any) -> float:
    values = list(values)
    return float(sum(values)) / max(len(values), 1)


def memory_figures(
    stores: list[dict],
    tmp: Path,
    opened: dict[int, int],
    loaded: list[int],
    after: list[int],
    served: list[int],
) -> dict[str, Any]:
    """Per-shard means: text and offsets bytes, and the server RSS the text store accounts for.

    A text store holds its offsets (memory-mapped), ids and domain codes; texts are read
    with pread per request. RSS should grow with the documents, not with their text.
    """
    from ttt.corpus.textstore import DOCS, OFFSETS, TEXTS

    text = mean(st["bytes"] for st in stores)
    offsets = mean((tmp / f"shard-{i}" / OFFSETS).stat().st_size for i in range(len(stores)))
    store_rss = mean(opened.values())
    growth = mean(a - b for a, b in zip(after, loaded, strict=True))
    return {
        "text_bytes_per_shard": int(text),
        "text_file_bytes_per_shard": int(
            mean((tmp / f"shard-{i}" / TEXTS).stat().st_size for i in range(len(stores)))
        ),
        "offsets_bytes_per_shard": int(offsets),
        "docs_file_bytes_per_shard": int(
            mean((tmp / f"shard-{i}" / DOCS).stat().st_size for i in range(len(stores)))
        ),
        "rss_loaded_mb": round(mean(loaded) / 2**20, 1),
        "rss_served_mb": round(mean(after) / 2**20, 1),
        "textstore_rss_bytes": int(store_rss),
        "textstore_rss_per_offsets": round(store_rss / max(offsets, 1), 2),
        "textstore_rss_per_text": round(store_rss / max(text, 1), 4),
        "texts_served_bytes_per_shard": int(mean(served)),
        "rss_growth_serving_bytes": int(growth),
        "rss_growth_per_text": round(growth / max(text, 1), 4),
    }

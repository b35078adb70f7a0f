"""Deterministic shards and the per-shard text store: one zstd frame per document."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import zstandard
from tqdm import tqdm

from ttt.corpus.documents import CorpusError, CorpusStats, Document
from ttt.corpus.reader import iter_documents, progress_disabled, resolve_sources

log = logging.getLogger(__name__)

TEXTS, OFFSETS, DOCS = "texts.zst", "offsets.npy", "docs.jsonl"


def shard_of(doc_id: str, n_shards: int) -> int:
    """The shard of a document: a stable hash of its id (not Python's salted hash)."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_shards


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class _ShardWriter:
    """Appends one document at a time to a text store being written."""

    def __init__(self, directory: Path, shard: int) -> None:
        directory.mkdir(parents=True)
        self.directory, self.shard = directory, shard
        # The files stay open while documents stream in; close() or abort() ends them.
        self.texts = open(directory / TEXTS, "wb")  # noqa: SIM115
        self.docs = open(directory / DOCS, "w", encoding="utf-8")  # noqa: SIM115
        # Offsets stream to a raw int64 file and become offsets.npy on close.
        self.raw_offsets = open(directory / "offsets.raw", "wb")  # noqa: SIM115
        self.compressor = zstandard.ZstdCompressor(level=3, write_content_size=True)
        self.position = 0
        self.documents: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def add(self, doc: Document) -> None:
        frame = self.compressor.compress(doc.text.encode("utf-8"))
        self.texts.write(frame)
        self.raw_offsets.write(np.array([self.position, len(frame)], dtype="<i8").tobytes())
        self.position += len(frame)
        record = {"id": doc.id, "domain": doc.domain, "nbytes": doc.nbytes}
        self.docs.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.documents[doc.domain] = self.documents.get(doc.domain, 0) + 1
        self.bytes[doc.domain] = self.bytes.get(doc.domain, 0) + doc.nbytes

    def close(self) -> dict[str, Any]:
        for fh in (self.texts, self.docs, self.raw_offsets):
            fh.close()
        raw = self.directory / "offsets.raw"
        np.save(self.directory / OFFSETS, np.fromfile(raw, dtype="<i8").reshape(-1, 2))
        raw.unlink()
        return {
            "shard": self.shard,
            "documents": sum(self.documents.values()),
            "bytes": sum(self.bytes.values()),
            "compressed_bytes": self.position,
            "domains": {
                d: {"documents": self.documents[d], "bytes": self.bytes[d]}
                for d in sorted(self.documents)
            },
        }

    def abort(self) -> None:
        for fh in (self.texts, self.docs, self.raw_offsets):
            fh.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def text_store_files(directory: str | Path) -> dict[str, Path]:
    """The files of a text store, as `Store.publish` takes them."""
    return {name: Path(directory) / name for name in (TEXTS, OFFSETS, DOCS)}


def write_text_shards(
    paths: Sequence[str],
    n_shards: int,
    out_dir: str | Path,
    *,
    store: Any = None,
    strict: bool = False,
    progress: bool = True,
) -> CorpusStats:
    """Split a corpus into `n_shards` text stores under `out_dir/shard-NNNNN/`, streaming.

    Files are read in the order of their stems, so the same set of files gives byte-identical
    shards whatever the order of `paths`. `stats.shards[i]` is shard i's manifest body
    (documents, bytes, per-domain counts) for the caller to publish with `text_store_files`.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(resolve_sources(paths, store), key=lambda s: s.stem)
    ordered = [s.name for s in sources]
    # Write into .partial directories and rename at the end: an interrupted run never
    # leaves a text store that looks complete.
    writers = []
    for shard in range(n_shards):
        partial = out / f".partial-{shard_name(shard)}"
        shutil.rmtree(partial, ignore_errors=True)
        writers.append(_ShardWriter(partial, shard))
    stats = CorpusStats()
    start = time.monotonic()
    try:
        docs = iter_documents(ordered, store=store, strict=strict, stats=stats)
        bar = tqdm(
            docs,
            desc="corpus shard",
            unit="doc",
            unit_scale=True,
            disable=progress_disabled(progress),
        )
        for doc in bar:
            writers[shard_of(doc.id, n_shards)].add(doc)
        stats.shards = [w.close() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        final = out / shard_name(w.shard)
        shutil.rmtree(final, ignore_errors=True)
        w.directory.rename(final)
    elapsed = max(time.monotonic() - start, 1e-9)
    log.info(
        "corpus shard: %d documents (%.1f MB) into %d shards in %.1f s (%.0f docs/s)",
        stats.total_documents,
        stats.total_bytes / 1e6,
        n_shards,
        elapsed,
        stats.total_documents / elapsed,
    )
    return stats


class TextStore:
    """Random access to one shard's texts by row; holds offsets and ids, never the texts."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._fd = -1
        files = text_store_files(self.directory)
        for path in files.values():
            if not path.is_file():
                raise CorpusError(f"{path}: missing (not a text store: {self.directory})")
        offsets = np.load(files[OFFSETS], mmap_mode="r", allow_pickle=False)
        if offsets.ndim != 2 or offsets.shape[1] != 2:
            raise CorpusError(f"{files[OFFSETS]}: expected shape (n, 2), got {offsets.shape}")
        self._offsets = offsets
        self.ids: list[str] = []
        domains: dict[str, int] = {}
        codes: list[int] = []
        nbytes: list[int] = []
        with open(files[DOCS], encoding="utf-8") as fh:
            for line, record in enumerate(fh, start=1):
                try:
                    rec = json.loads(record)
                    self.ids.append(rec["id"])
                    codes.append(domains.setdefault(rec["domain"], len(domains)))
                    nbytes.append(int(rec["nbytes"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise CorpusError(f"{files[DOCS]}:{line}: bad record ({e!r})") from e
        if len(self.ids) != len(offsets):
            raise CorpusError(
                f"{self.directory}: {DOCS} has {len(self.ids)} rows, {OFFSETS} {len(offsets)}"
            )
        # Domains as small codes: per-row metadata stays a few bytes per document.
        self._domains = list(domains)
        self._codes = np.asarray(codes, dtype=np.int32)
        self._nbytes = np.asarray(nbytes, dtype=np.int64)
        self._rows: dict[str, int] | None = None
        self._fd = os.open(files[TEXTS], os.O_RDONLY)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.ids)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _check(self, row: int) -> int:
        r = int(row)
        if not 0 <= r < len(self.ids):
            raise IndexError(f"row {row} out of range for {self.directory} ({len(self)} rows)")
        return r

    def row_of(self, doc_id: str) -> int:
        if self._rows is None:
            self._rows = {d: i for i, d in enumerate(self.ids)}
        try:
            return self._rows[doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id!r} is not in {self.directory}") from None

    def text(self, row: int) -> str:
        r = self._check(row)
        start, length = (int(v) for v in self._offsets[r])
        frame = os.pread(self._fd, length, start)  # pread: safe from many threads at once
        if len(frame) != length:
            raise CorpusError(f"{self.directory / TEXTS}: truncated at row {r}")
        # A decompressor per thread: zstandard objects must not be shared across threads.
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx.decompress(frame).decode("utf-8")

    def meta(self, row: int) -> tuple[str, str, int]:
        r = self._check(row)
        return self.ids[r], self._domains[self._codes[r]], int(self._nbytes[r])

    def document(self, row: int) -> Document:
        """The document at `row`; `source` is the file stem and `line` comes from the id."""
        doc_id, domain, nbytes = self.meta(row)
        stem, _, line = doc_id.rpartition(":")
        return Document(doc_id, domain, self.text(row), nbytes, stem, int(line))

    def __iter__(self) -> Iterator[Document]:
        for row in range(len(self)):
            yield self.document(row)

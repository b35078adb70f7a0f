"""Streaming reader for Pile-format .jsonl and .jsonl.zst files: local, globs and s3://."""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from tqdm import tqdm

from ttt.corpus.documents import UNKNOWN_DOMAIN, BadLine, CorpusError, CorpusStats, Document

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl.zst", ".jsonl")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One input file: a local path, or an object of the store's bucket."""

    name: str  # what messages and Document.source show: a path or an s3:// URI
    stem: str
    key: str | None = None  # the store key of an s3:// source


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    raise CorpusError(f"{name}: not a Pile-format file (expected one of {', '.join(SUFFIXES)})")


def _resolve_s3(uri: str, store: Any) -> list[Source]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise CorpusError(f"{uri}: expected s3://bucket/key")
    if store is None:
        raise CorpusError(f"{uri}: reading s3:// needs a store for bucket {bucket!r}")
    if getattr(store, "bucket", None) != bucket:
        where = store.describe() if hasattr(store, "describe") else repr(store)
        raise CorpusError(f"{uri}: bucket {bucket!r} is not the store's bucket ({where})")
    if not any(c in key for c in GLOB_CHARS):
        return [Source(uri, _stem(key), key)]
    cut = min(key.index(c) for c in GLOB_CHARS if c in key)
    keys = sorted(k for k in store.list(key[:cut]) if fnmatch.fnmatchcase(k, key))
    if not keys:
        raise CorpusError(f"{uri}: no objects match in bucket {bucket!r}")
    return [Source(f"s3://{bucket}/{k}", _stem(k), k) for k in keys]


def _resolve_local(pattern: str) -> list[Source]:
    if any(c in pattern for c in GLOB_CHARS):
        names = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not names:
            raise CorpusError(f"{pattern}: no files match")
    elif os.path.isdir(pattern):
        names = sorted(
            str(p) for p in Path(pattern).iterdir() if p.is_file() and p.name.endswith(SUFFIXES)
        )
        if not names:
            raise CorpusError(f"{pattern}: directory holds no {' or '.join(SUFFIXES)} files")
    elif os.path.isfile(pattern):
        names = [pattern]
    else:
        raise CorpusError(f"{pattern}: no such file")
    return [Source(n, _stem(n)) for n in names]


def resolve_sources(paths: Sequence[str], store: Any = None) -> list[Source]:
    """Expand paths, globs (sorted) and s3:// URIs into files; ids must not collide."""
    if isinstance(paths, str):
        paths = [paths]
    sources: dict[str, Source] = {}
    for p in paths:
        found = _resolve_s3(p, store) if p.startswith("s3://") else _resolve_local(p)
        for s in found:
            sources.setdefault(s.name, s)
    by_stem: dict[str, str] = {}
    for s in sources.values():
        if s.stem in by_stem:
            raise CorpusError(
                f"{by_stem[s.stem]} and {s.name} share the stem {s.stem!r}: "
                "document ids (<stem>:<line>) would collide; rename one"
            )
        by_stem[s.stem] = s.name
    return list(sources.values())


def _iter_lines(path: Path, compressed: bool) -> Iterator[bytes]:
    """Lines as bytes, decompressing .zst as a stream (all frames), never the whole file."""
    with open(path, "rb") as fh:
        if compressed:
            raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
            yield from io.BufferedReader(raw, buffer_size=1 << 20)
        else:
            yield from fh


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _parse(raw: bytes, src: Source, line: int) -> Document | BadLine:
    def bad(reason: str, detail: str) -> BadLine:
        return BadLine(src.name, line, reason, detail)

    raw = raw.rstrip(b"\r\n")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad("invalid_utf8", f"byte {e.start}: {e.reason}")
    if not decoded.strip():
        return bad("blank_line", "line is empty")
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return bad("malformed_json", f"{e.msg}: column {e.colno}")
    if not isinstance(obj, dict):
        return bad("not_an_object", f"a JSON {_json_type(obj)}, not an object")
    if "text" not in obj:
        return bad("missing_text", "no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        return bad("text_not_string", f"'text' is a JSON {_json_type(text)}")
    meta = obj.get("meta")
    domain = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(domain, str) or not domain:
        domain = UNKNOWN_DOMAIN
    doc_id = f"{src.stem}:{line}"
    if not text:
        return BadLine(src.name, line, "empty_text", "'text' is empty", doc_id, domain)
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        # Valid UTF-8 bytes can still carry "\ud800"-style escapes of lone surrogates.
        detail = f"'text' has a lone surrogate escape at character {e.start}"
        return BadLine(src.name, line, "invalid_utf8", detail, doc_id, domain)
    return Document(doc_id, domain, text, nbytes, src.name, line)


def _documents_of(
    src: Source,
    path: Path,
    strict: bool,
    stats: CorpusStats,
    skipped: list[BadLine] | None = None,
) -> Iterator[Document]:
    line = 0
    try:
        for line, raw in enumerate(_iter_lines(path, src.name.endswith(".zst")), start=1):
            item = _parse(raw, src, line)
            if isinstance(item, Document):
                stats.add_document(item)
                yield item
                continue
            if strict:
                raise CorpusError(f"{item.source}:{item.line}: {item.reason} ({item.detail})")
            if skipped is not None and item.doc_id is not None:
                skipped.append(item)
            if stats.add_bad_line(item):
                log.warning("skipped %s", item)
            else:
                log.debug("skipped %s", item)
    except zstandard.ZstdError as e:
        raise CorpusError(f"{src.name}: corrupt zstd stream after line {line}: {e}") from e


def iter_documents(
    paths: Sequence[str],
    *,
    store: Any = None,
    strict: bool = False,
    stats: CorpusStats | None = None,
    skipped: list[BadLine] | None = None,
) -> Iterator[Document]:
    """Stream the documents of Pile-format files, skipping (and counting) bad lines.

    `paths` are local files, directories, globs (expanded sorted) or `s3://bucket/key`
    URIs (the key may be a glob) read through `store`, whose bucket must match.
    With `strict`, the first bad line raises `CorpusError` naming its file and line.
    `skipped` collects the skipped lines that are documents to the reference (a JSON object
    whose text is empty or holds a lone surrogate), with their id and task.
    """
    stats = stats if stats is not None else CorpusStats()
    for src in resolve_sources(paths, store):
        stats.files.append(src.name)
        path = store.fetch(src.key) if src.key is not None else Path(src.name)
        yield from _documents_of(src, Path(path), strict, stats, skipped)


def collect_stats(
    paths: Sequence[str], *, store: Any = None, strict: bool = False, progress: bool = True
) -> CorpusStats:
    """Read every document once and return the per-domain and bad-line counts."""
    stats = CorpusStats()
    docs = iter_documents(paths, store=store, strict=strict, stats=stats)
    for _ in tqdm(
        docs, desc="corpus stats", unit="doc", unit_scale=True, disable=progress_disabled(progress)
    ):
        pass
    return stats


def progress_disabled(progress: bool) -> bool | None:
    # tqdm's disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return None if progress else True

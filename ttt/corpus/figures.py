"""Corpus figures for planning: documents, bytes and tokens per domain, counted or given."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard

from ttt.corpus.reader import CorpusError, _parse, resolve_sources


@dataclass
class DomainFigures:
    documents: float = 0.0
    bytes: float = 0.0
    tokens: float = 0.0  # LM tokens (bytes / bytesPerToken when not counted)
    embed_tokens: float = 0.0  # encoder tokens, each document cut at embedding.maxTokens


@dataclass
class CorpusFigures:
    """Per domain documents, bytes and tokens of one split; `sampled` when extrapolated."""

    domains: dict[str, DomainFigures] = field(default_factory=dict)
    sampled: bool = False

    def total(self, name: str) -> float:
        return sum(getattr(d, name) for d in self.domains.values())


def count_corpus(
    paths: Sequence[str],
    *,
    max_tokens: int,
    bytes_per_token: float,
    sample_documents: int = 100_000,
) -> CorpusFigures:
    """Documents, bytes and tokens per domain of Pile-format files, sampled where large.

    A file with more than `sample_documents` documents is read that far and its figures are
    scaled by (file size / compressed bytes read): exact for uniform files, an estimate else.
    Tokens are bytes / bytes_per_token per document (so the encoder's cut is per document).
    """
    out = CorpusFigures()
    for src in resolve_sources(list(paths), None):
        path = src.name
        size = os.path.getsize(path)
        part: dict[str, DomainFigures] = {}
        with open(path, "rb") as fh:
            compressed = path.endswith(".zst")
            n = 0
            for line, raw in enumerate(_lines(fh, compressed), start=1):
                doc = _parse(raw, src, line)
                if not hasattr(doc, "domain"):
                    continue
                f = part.setdefault(doc.domain, DomainFigures())
                tokens = doc.nbytes / bytes_per_token
                f.documents += 1
                f.bytes += doc.nbytes
                f.tokens += tokens
                f.embed_tokens += min(tokens, max_tokens)
                n += 1
                if n >= sample_documents:
                    break
            read = fh.tell()
        scale = size / read if n >= sample_documents and read else 1.0
        out.sampled |= scale != 1.0
        for domain, f in part.items():
            total = out.domains.setdefault(domain, DomainFigures())
            for name in ("documents", "bytes", "tokens", "embed_tokens"):
                setattr(total, name, getattr(total, name) + getattr(f, name) * scale)
    return out


def _lines(fh: Any, compressed: bool) -> Any:
    # as the corpus reader, over an open handle, so that fh.tell() says how far it got; a
    # plain loop, since `yield from` would close the handle when the caller stops early
    lines = fh
    if compressed:
        raw = zstandard.ZstdDecompressor().stream_reader(
            fh, read_size=16_384, read_across_frames=True, closefd=False
        )
        lines = io.BufferedReader(raw, buffer_size=1 << 14)  # small read-ahead: tell() is near
    for line in lines:  # noqa: UP028 - see above
        yield line


def given_corpus(data: Any, where: str, max_tokens: int, bytes_per_token: float) -> CorpusFigures:
    """Corpus figures written out per domain: {domain: {documents, bytes[, tokens]}}."""
    out = CorpusFigures(sampled=False)
    if not isinstance(data, dict) or not data:
        raise CorpusError(f"{where}: expected a mapping of domain -> {{documents, bytes}}")
    for domain, v in data.items():
        if not isinstance(v, dict) or "documents" not in v or "bytes" not in v:
            raise CorpusError(f"{where}.{domain}: needs documents and bytes")
        docs, nbytes = float(v["documents"]), float(v["bytes"])
        tokens = float(v.get("tokens", nbytes / bytes_per_token))
        # without per-document counts, the cut is applied to the mean document: an upper bound
        embed = float(v.get("embedTokens", docs * min(tokens / max(docs, 1), max_tokens)))
        out.domains[str(domain)] = DomainFigures(docs, nbytes, tokens, embed)
    return out

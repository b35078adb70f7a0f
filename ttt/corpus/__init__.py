"""Pile-format corpus: streaming reader, deterministic shards and the per-shard text store."""

from ttt.corpus.documents import (
    REASONS,
    UNKNOWN_DOMAIN,
    BadLine,
    CorpusError,
    CorpusStats,
    Document,
)
from ttt.corpus.reader import collect_stats, iter_documents, resolve_sources
from ttt.corpus.textstore import (
    TextStore,
    shard_name,
    shard_of,
    text_store_files,
    write_text_shards,
)

__all__ = [
    "REASONS",
    "UNKNOWN_DOMAIN",
    "BadLine",
    "CorpusError",
    "CorpusStats",
    "Document",
    "TextStore",
    "collect_stats",
    "iter_documents",
    "resolve_sources",
    "shard_name",
    "shard_of",
    "text_store_files",
    "write_text_shards",
]

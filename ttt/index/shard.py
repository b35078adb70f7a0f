"""One shard as a server or a local retriever holds it: its FAISS index and its text store."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import faiss

from ttt.errors import TTTError
from ttt.stages import open_text_store

log = logging.getLogger(__name__)

TOKEN_ENV = "TTT_AUTH_TOKEN"  # nosec B105 - the name of a variable, not a token
TOKEN_FILE_ENV = "TTT_AUTH_TOKEN_FILE"  # nosec B105 - a mounted Secret: the token stays off the pod spec


class ShardError(TTTError, RuntimeError):
    """A shard that cannot be loaded or addressed; the message names the shard and the key."""


def load_shard(run: Any, store: Any, shard: int) -> tuple[faiss.Index, Any]:
    """The published index of `shard` and its text store, checked to belong together.

    With spec.index.rerank > 0 (and an approximate index) the index comes wrapped in a
    `RerankedIndex` over the shard's embeddings.npy, memory-mapped from the store.
    """
    from ttt.index.build import INDEX, load_shard_index
    from ttt.stages import shard_prefix

    prefix = shard_prefix(run, "index", shard)
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise ShardError(
            f"shard {shard}: no index at {prefix}/manifest.json; "
            f"run `ttt index build --spec FILE --shard {shard}` first"
        )
    if manifest.get("spec_hash") != run.stage_hash("index"):
        # A stale index would silently answer for another corpus or encoder.
        raise ShardError(
            f"shard {shard}: the index at {prefix} was built from another spec "
            f"(spec_hash {manifest.get('spec_hash')}, this spec {run.stage_hash('index')}); "
            "rebuild it with `ttt index build`"
        )
    sha = manifest.get("files", {}).get(INDEX, {}).get("sha256")
    index = load_shard_index(store.fetch(f"{prefix}/{INDEX}", sha256=sha), run.spec.index.nprobe)
    if run.spec.index.rerank and manifest.get("type", run.spec.index.type) != "flat":
        index = _reranked(run, store, shard, index, manifest)
    texts = open_text_store(run, store, shard, ShardError)
    if len(texts) != index.ntotal:
        raise ShardError(
            f"shard {shard}: the index holds {index.ntotal} vectors but the text store "
            f"{len(texts)} documents; rebuild the index"
        )
    return index, texts


def _reranked(run: Any, store: Any, shard: int, index: faiss.Index, manifest: dict) -> Any:
    """`index` re-ranked against the shard's float16 embeddings, memory-mapped from the store."""
    import numpy as np

    from ttt.embed import EMBEDDINGS
    from ttt.index.rerank import RerankedIndex
    from ttt.stages import shard_prefix

    prefix = manifest.get("embed") or shard_prefix(run, "embed", shard)
    embedded = store.read_manifest(prefix)
    if embedded is None:
        raise ShardError(
            f"shard {shard}: spec.index.rerank is {run.spec.index.rerank} but there are no "
            f"embeddings at {prefix}/manifest.json to re-rank against; run `ttt embed` or set "
            "spec.index.rerank to 0"
        )
    sha = embedded.get("files", {}).get(EMBEDDINGS, {}).get("sha256")
    # Memory-mapped: a search reads only its candidates' pages, the rest stays on disk.
    vectors = np.load(store.fetch(f"{prefix}/{EMBEDDINGS}", sha256=sha), mmap_mode="r")
    try:
        return RerankedIndex(index, vectors, run.spec.index.rerank)
    except ValueError as exc:
        raise ShardError(f"shard {shard}: {prefix}/{EMBEDDINGS}: {exc}") from None


def read_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The bearer token: given, else read from `token_file` (or $TTT_AUTH_TOKEN_FILE), else
    $TTT_AUTH_TOKEN."""
    if token:
        return token
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        try:
            # A mounted Secret may end in a newline; the token never does.
            value = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ShardError(f"{token_file}: cannot read the auth token: {exc.strerror}") from None
        if not value:
            raise ShardError(f"{token_file}: the auth token file is empty")
        return value
    return os.environ.get(TOKEN_ENV) or None


def ordinal_from_hostname(hostname: str | None = None) -> int:
    """The StatefulSet ordinal N of a pod named `<name>-N`."""
    name = hostname or os.environ.get("HOSTNAME") or socket.gethostname()
    match = re.search(r"-(\d+)$", name.split(".")[0])
    if match is None:
        raise ShardError(
            f"hostname {name!r} does not end in -N (a StatefulSet ordinal); pass --shard I"
        )
    return int(match.group(1))


def shard_of_ordinal(ordinal: int, shards: int) -> tuple[int, int]:
    """(shard, replica) of server `ordinal`: pods 0..S-1 are replica 0, S..2S-1 replica 1..."""
    return ordinal % shards, ordinal // shards

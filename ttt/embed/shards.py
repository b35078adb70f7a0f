"""The embed stage: a shard's published texts -> resumable parts of vectors -> its embeddings."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ttt import telemetry
from ttt.corpus.reader import progress_disabled
from ttt.embed.encoder import EmbedError, Encoder

log = logging.getLogger(__name__)

EMBEDDINGS, IDS = "embeddings.npy", "ids.json"
PART_SIZE = 4096  # documents per resumable part: minutes of work on a GPU, not hours


def open_text_store(run: Any, store: Any, shard: int) -> Any:
    """The published text store of a shard (see `ttt.stages.open_text_store`)."""
    from ttt.stages import open_text_store as open_published

    return open_published(run, store, shard, EmbedError)


def embed_shard(
    run: Any,
    store: Any,
    shard: int,
    *,
    encoder: Encoder | None = None,
    part_size: int = PART_SIZE,
    on_part: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Embed every document of a shard into embeddings.npy and publish it.

    The rows are float32 (the paper's index) or float16 (spec.embedding.storage, our option).

    Work is saved part by part under `<prefix>/parts/<spec hash>/`, so a crashed run resumes
    at the first unfinished part. `on_part(i)` is called after part i is saved. When the
    corpus stage has not been published for this spec, it is run first.
    """
    from ttt.stages import is_done, publish_corpus, shard_prefix

    prefix = shard_prefix(run, "embed", shard)
    spec_hash = run.stage_hash("embed")
    done = store.read_manifest(prefix)
    if done is not None and done.get("spec_hash") == spec_hash:
        log.info("embed shard %d: already published (%s), skipping", shard, spec_hash)
        return done
    if not 0 <= shard < run.spec.corpus.shards:
        raise EmbedError(f"shard {shard}: the spec has {run.spec.corpus.shards} shard(s)")
    if not is_done(run, store, shard_prefix(run, "corpus", shard), "corpus"):
        publish_corpus(run, store, progress=progress)
    texts = open_text_store(run, store, shard)
    encoder = encoder or Encoder.from_spec(run.spec.embedding, run.spec.storage)
    n = len(texts)
    n_parts = math.ceil(n / part_size)
    parts_prefix = f"{prefix}/parts/{spec_hash}"
    storage = run.spec.embedding.storage
    label = str(shard)
    totals = {"tokens": 0, "seconds": 0.0, "resumed_parts": 0}
    # on a terminal only: in a log file a carriage-return bar is one line of several KB per
    # shard; the per-part log lines below say the same there
    bar = tqdm(
        total=n, desc=f"embed shard {shard}", unit="doc", disable=progress_disabled(progress)
    )
    with tempfile.TemporaryDirectory(prefix="ttt-embed-") as tmp:
        infos = []
        for p in range(n_parts):
            key = f"{parts_prefix}/part-{p:05d}"
            rows = range(p * part_size, min(n, (p + 1) * part_size))
            info = store.get_json(f"{key}.json") if store.exists(f"{key}.json") else None
            # A part saved with another part size covers other rows: redo it.
            if info is not None and (info["start"], info["count"]) == (rows.start, len(rows)):
                totals["resumed_parts"] += 1
                bar.update(info["count"])
            else:
                info = _embed_part(encoder, texts, rows, Path(tmp), key, store, bar, label, storage)
                log.info(
                    "embed shard %d: part %d/%d, %.0f tokens/s, %.1f docs/s",
                    shard,
                    p + 1,
                    n_parts,
                    info["tokens"] / max(info["seconds"], 1e-9),
                    info["count"] / max(info["seconds"], 1e-9),
                )
            infos.append(info)
            totals["tokens"] += info["tokens"]
            totals["seconds"] += info["seconds"]
            if on_part is not None:
                on_part(p)
        bar.close()
        files = _assemble(store, parts_prefix, infos, n, encoder.dim, texts.ids, Path(tmp), storage)
        seconds = max(totals["seconds"], 1e-9)
        manifest = {
            "stage": "embed",
            "shard": shard,
            "spec_hash": spec_hash,
            "encoder": encoder.name,
            "pooling": encoder.pooling,
            "max_tokens": encoder.max_tokens,
            "normalize": encoder.normalize,
            "dtype": run.spec.embedding.storage,
            "dim": encoder.dim,
            "count": n,
            "ids": IDS,
            "corpus": shard_prefix(run, "corpus", shard),
            "tokens": totals["tokens"],
            "seconds": round(totals["seconds"], 3),
            "tokens_per_second": round(totals["tokens"] / seconds, 1),
            "documents_per_second": round(n / seconds, 2),
            "parts": n_parts,
            "resumed_parts": totals["resumed_parts"],
            "device": str(encoder.device),
            "compute_dtype": str(encoder.dtype).removeprefix("torch."),
        }
        result = store.publish(prefix, files, manifest)
    texts.close()
    store.delete(f"{prefix}/parts/")
    log.info(
        "embed shard %d: %d documents, %d tokens in %.1f s (%.0f tokens/s, %.1f docs/s)",
        shard,
        n,
        totals["tokens"],
        seconds,
        totals["tokens"] / seconds,
        n / seconds,
    )
    return result if isinstance(result, dict) else manifest


def _embed_part(
    encoder: Encoder,
    texts: Any,
    rows: range,
    tmp: Path,
    key: str,
    store: Any,
    bar: tqdm,
    label: str,
    storage: str = "float32",
) -> dict:
    """Embed one part, save it to the store (vectors first, then its small json record)."""
    start = time.perf_counter()
    part_texts = [texts.text(r) for r in rows]
    out = np.zeros((len(part_texts), encoder.dim), dtype=storage)
    tokens = 0
    for batch_rows, vectors, batch_tokens in encoder.encode_batches(part_texts):
        out[batch_rows] = vectors
        tokens += batch_tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        telemetry.EMBED_TOKENS.labels(shard=label).inc(batch_tokens)
        telemetry.EMBED_DOCUMENTS.labels(shard=label).inc(len(batch_rows))
        bar.update(len(batch_rows))
        bar.set_postfix(tok_s=f"{tokens / elapsed:,.0f}", refresh=False)
    seconds = time.perf_counter() - start
    path = tmp / f"{Path(key).name}.npy"
    np.save(path, out)
    obj = store.put_file(path, f"{key}.npy")
    path.unlink()
    info = {
        "start": rows.start,
        "count": len(rows),
        "tokens": tokens,
        "seconds": seconds,
        "sha256": getattr(obj, "sha256", None),
    }
    store.put_json(f"{key}.json", info)  # written last: its presence marks the part done
    return info


def _assemble(
    store: Any,
    parts_prefix: str,
    infos: list[dict],
    n: int,
    dim: int,
    ids: list[str],
    tmp: Path,
    storage: str = "float32",
) -> dict[str, Path]:
    """Concatenate the parts into one embeddings.npy (memory-mapped, not in RAM)."""
    path = tmp / EMBEDDINGS
    out = np.lib.format.open_memmap(path, mode="w+", dtype=storage, shape=(n, dim))
    for p, info in enumerate(infos):
        key = f"{parts_prefix}/part-{p:05d}.npy"
        part = np.load(store.fetch(key, sha256=info.get("sha256")), allow_pickle=False)
        if part.shape != (info["count"], dim):
            raise EmbedError(f"{key}: shape {part.shape}, expected ({info['count']}, {dim})")
        out[info["start"] : info["start"] + info["count"]] = part
    out.flush()
    del out
    ids_path = tmp / IDS
    ids_path.write_text(json.dumps(list(ids)), encoding="utf-8")
    return {EMBEDDINGS: path, IDS: ids_path}

"""FAISS shard indexes: exact L2 (the paper's flat index) or any factory string, with recall."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ttt.errors import TTTError

log = logging.getLogger(__name__)

INDEX = "index.faiss"
ADD_CHUNK = 262_144  # vectors converted to float32 and added at a time
SEED = 1216


class IndexBuildError(TTTError, RuntimeError):
    """An index that cannot be built; the message names the spec field, shard or file."""


def gpu_count() -> int:
    """GPUs that this faiss build can use (0 with faiss-cpu)."""
    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def make_index(dim: int, index_type: str) -> faiss.Index:
    """An empty L2 index: 'flat' is IndexFlatL2 (exact, as the paper), else a factory string."""
    if index_type == "flat":
        return faiss.IndexFlatL2(dim)
    try:
        index = faiss.index_factory(dim, index_type, faiss.METRIC_L2)
    except RuntimeError as exc:
        reason = _faiss_reason(exc)
        raise IndexBuildError(
            f"spec.index.type: {index_type!r} is not a FAISS factory string that builds a "
            f"{dim}-d index ({reason}); use 'flat' or e.g. 'IVF256,PQ16', 'IVF64,Flat', 'HNSW32'"
        ) from None
    # The factory turns on polysemous training for PQ codes: minutes of simulated annealing
    # that only a Hamming-distance filter uses, which L2 search never does.
    ivf = faiss.try_extract_index_ivf(index)
    for part in (faiss.downcast_index(ivf) if ivf else None, faiss.downcast_index(index)):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def _faiss_reason(exc: Exception) -> str:
    # faiss errors start with a C++ function, file and line; the reason follows "file.cpp:N: ".
    text = " ".join(str(exc).split())
    match = re.search(r"\.(?:cpp|h|cu):\d+: (?:Error: )?(.*)$", text)
    return match.group(1) if match else text


def set_nprobe(index: faiss.Index, nprobe: int | None) -> bool:
    """Set the inverted lists probed per query; False when the index has no inverted lists."""
    if nprobe is None:
        return False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return False
    ivf.nprobe = int(nprobe)
    return True


def _to_gpu(index: faiss.Index, use_gpu: str) -> tuple[faiss.Index, bool]:
    gpus = gpu_count()
    if use_gpu == "always" and gpus == 0:
        raise IndexBuildError("spec.index.useGpu is 'always' but this faiss build sees no GPU")
    if use_gpu == "never" or gpus == 0:
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError) as exc:
        if use_gpu == "always":
            raise IndexBuildError(f"cannot build this index on the GPU: {_faiss_reason(exc)}")
        log.info("index type has no GPU version (%s); building on the CPU", _faiss_reason(exc))
        return index, False


def build_index(
    vectors: np.ndarray,
    index_type: str = "flat",
    *,
    train_sample: int = 100_000,
    nprobe: int | None = None,
    use_gpu: str = "auto",
    seed: int = SEED,
) -> tuple[faiss.Index, dict]:
    """Train (on a seeded sample) and fill an index with `vectors`; returns it with build facts.

    `vectors` may be float16 or memory-mapped: they are converted to float32 chunk by chunk.
    The index comes back on the CPU, ready to serialize, whatever device built it.
    """
    n, dim = vectors.shape
    index = make_index(dim, index_type)
    start = time.perf_counter()
    index, on_gpu = _to_gpu(index, use_gpu)
    trained_on = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(train_sample, n), replace=False))
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise IndexBuildError(
                f"spec.index.type {index_type!r}: training on {len(sample)} vectors failed "
                f"({_faiss_reason(exc)}); use more vectors (spec.index.trainSample) or fewer "
                "lists/centroids"
            ) from None
        trained_on = len(sample)
    train_seconds = time.perf_counter() - start
    for lo in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[lo : lo + ADD_CHUNK], dtype=np.float32))
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    has_lists = set_nprobe(index, nprobe)
    if nprobe is not None and not has_lists:
        log.warning("spec.index.nprobe=%d ignored: %r has no inverted lists", nprobe, index_type)
    return index, {
        "type": index_type,
        "dim": dim,
        "ntotal": int(index.ntotal),
        "trained_on": trained_on,
        "nprobe": nprobe if has_lists else None,
        "gpu": on_gpu,
        "train_seconds": round(train_seconds, 3),
        "build_seconds": round(time.perf_counter() - start, 3),
    }


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared-L2 top-k (distances, labels), the ground truth for recall."""
    flat = faiss.IndexFlatL2(vectors.shape[1])
    for lo in range(0, len(vectors), ADD_CHUNK):
        flat.add(np.ascontiguousarray(vectors[lo : lo + ADD_CHUNK], dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def measure_recall(
    index: faiss.Index, vectors: np.ndarray, k: int, queries: int, seed: int = SEED
) -> float | None:
    """recall@k: the share of the exact top-k that the index returns, over seeded queries.

    Queries are rows of the shard itself (the test documents of the paper come from the same
    distribution). A returned neighbor counts when its true distance is within the exact
    k-th distance, so that ties among duplicate documents (common in the Pile) are not misses.
    """
    n = len(vectors)
    k = min(k, n)
    if n == 0 or k == 0 or queries == 0:
        return None
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    exact_d, _ = exact_search(vectors, q, k)
    _, labels = index.search(q, k)
    found = np.asarray(vectors[np.clip(labels, 0, n - 1).ravel()], dtype=np.float32)
    true_d = ((found.reshape(len(q), k, -1) - q[:, None, :]) ** 2).sum(-1)
    kth = exact_d[:, -1:]
    hits = (labels >= 0) & (true_d <= kth + 1e-4 * np.maximum(kth, 1.0))
    return float(hits.sum(axis=1).mean() / k)


def index_bytes(index: faiss.Index) -> int:
    """Size of the serialized index: what a server holds in memory for it."""
    return int(faiss.serialize_index(index).size)


def load_shard_index(path: str | Path, nprobe: int | None = None) -> faiss.Index:
    """Read a shard's index.faiss; `nprobe` overrides the one it was saved with."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexBuildError(
            f"{path}: not a readable FAISS index ({_faiss_reason(exc)})"
        ) from None
    if nprobe is not None and not set_nprobe(index, nprobe):
        log.warning("%s: nprobe=%d ignored, the index has no inverted lists", path, nprobe)
    return index


# --- the index-build stage -------------------------------------------------------------------


def build_shard_index(run: Any, store: Any, shard: int) -> dict:
    """Build, measure and publish a shard's index.faiss from its published embeddings."""
    from ttt.embed import EMBEDDINGS
    from ttt.stages import shard_prefix

    prefix = shard_prefix(run, "index", shard)
    spec_hash = run.stage_hash("index")
    done = store.read_manifest(prefix)
    if done is not None and done.get("spec_hash") == spec_hash:
        log.info("index shard %d: already published (%s), skipping", shard, spec_hash)
        return done
    embed_prefix = shard_prefix(run, "embed", shard)
    embedded = store.read_manifest(embed_prefix)
    if embedded is None or embedded.get("spec_hash") != run.stage_hash("embed"):
        state = "missing" if embedded is None else "from another spec"
        raise IndexBuildError(
            f"shard {shard}: embeddings at {embed_prefix} are {state}; "
            f"run `ttt embed --spec FILE --shard {shard}` first"
        )
    sha = embedded.get("files", {}).get(EMBEDDINGS, {}).get("sha256")
    vectors = np.load(store.fetch(f"{embed_prefix}/{EMBEDDINGS}", sha256=sha), mmap_mode="r")
    spec = run.spec.index
    log.info("index shard %d: %s over %d x %d vectors", shard, spec.type, *vectors.shape)
    try:
        index, facts = build_index(
            vectors,
            spec.type,
            train_sample=spec.train_sample,
            nprobe=spec.nprobe,
            use_gpu=spec.use_gpu,
            seed=SEED + shard,
        )
    except IndexBuildError as exc:
        raise IndexBuildError(f"shard {shard}: {exc}") from None
    k = max(1, min(run.spec.retrieval.neighbors, len(vectors)))
    rerank = spec.rerank if spec.type != "flat" else 0  # flat is exact already
    searched = index
    if rerank:
        from ttt.index.rerank import RerankedIndex

        # The recall that servers deliver: they re-rank against these same embeddings.
        searched = RerankedIndex(index, vectors, rerank)
    recall = measure_recall(searched, vectors, k, spec.recall_queries, seed=SEED + shard)
    with tempfile.TemporaryDirectory(prefix="ttt-index-") as tmp:
        path = Path(tmp) / INDEX
        faiss.write_index(index, str(path))
        size = path.stat().st_size
        n = int(index.ntotal)
        manifest = {
            "stage": "index",
            "shard": shard,
            "spec_hash": spec_hash,
            "created": datetime.now(UTC).isoformat(),
            **facts,
            "bytes": size,
            "bytes_per_vector": round(size / n, 2) if n else None,
            "recall_k": k,
            "recall_queries": min(spec.recall_queries, n),
            "recall": None if recall is None else round(recall, 4),
            "rerank": rerank,
            "embed": embed_prefix,
            "corpus": shard_prefix(run, "corpus", shard),
        }
        result = store.publish(prefix, {INDEX: path}, manifest)
    log.info(
        "index shard %d: %s, %d vectors, %.1f bytes/vector, recall@%d %s (rerank %d), %.1f s",
        shard,
        spec.type,
        n,
        size / max(n, 1),
        k,
        manifest["recall"],
        rerank,
        facts["build_seconds"],
    )
    return result if isinstance(result, dict) else manifest

"""FAISS shard indexes: flat is exact, approximate ones report their recall, errors are clear."""

from __future__ import annotations

import numpy as np
import pytest

from ttt.index.build import (
    IndexBuildError,
    build_index,
    gpu_count,
    index_bytes,
    load_shard_index,
    make_index,
    measure_recall,
)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors in a few clusters, like document embeddings (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(16, dim)).astype(np.float32)
    x = centers[rng.integers(0, 16, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return x.astype(np.float16)


def test_flat_equals_brute_force_numpy() -> None:
    x = clustered(500, 32)
    index, facts = build_index(x, "flat")
    q = clustered(20, 32, seed=1).astype(np.float32)
    distances, labels = index.search(q, 10)
    x32 = x.astype(np.float32)
    true = ((q[:, None, :] - x32[None, :, :]) ** 2).sum(-1)
    expect = np.argsort(true, axis=1, kind="stable")[:, :10]
    assert np.array_equal(labels, expect)
    assert np.allclose(distances, np.take_along_axis(true, expect, 1), rtol=1e-4, atol=1e-3)
    assert facts["ntotal"] == 500 and facts["trained_on"] == 0 and facts["nprobe"] is None
    assert measure_recall(index, x, 10, 50) == 1.0


def test_ivf_pq_recall_between_zero_and_one_and_smaller_than_flat() -> None:
    x = clustered(3000, 64)
    flat, _ = build_index(x, "flat")
    ivfpq, facts = build_index(x, "IVF16,PQ8", train_sample=2000, nprobe=4)
    recall = measure_recall(ivfpq, x, 50, 100)
    assert recall is not None and 0 < recall <= 1
    assert facts["trained_on"] == 2000 and facts["nprobe"] == 4
    # 8 code bytes + an 8-byte id per vector (+ codebooks) against 256 bytes of float32.
    assert index_bytes(ivfpq) * 4 < index_bytes(flat)


def test_more_probes_never_lose_recall() -> None:
    x = clustered(2000, 32)
    low, _ = build_index(x, "IVF32,Flat", nprobe=1)
    high, _ = build_index(x, "IVF32,Flat", nprobe=32)
    r_low, r_high = measure_recall(low, x, 20, 100), measure_recall(high, x, 20, 100)
    assert r_low < r_high == pytest.approx(1.0)


def test_recall_counts_ties_as_hits() -> None:
    # 40 copies of one vector: any 10 of them are a correct top-10.
    x = np.concatenate([np.ones((40, 8)), np.zeros((10, 8))]).astype(np.float16)
    index, _ = build_index(x, "flat")
    assert measure_recall(index, x, 10, 50) == 1.0


def test_hnsw_builds_without_training() -> None:
    x = clustered(300, 16)
    index, facts = build_index(x, "HNSW16", nprobe=8)  # nprobe: no inverted lists, ignored
    assert facts["trained_on"] == 0 and facts["nprobe"] is None and index.ntotal == 300


def test_bad_factory_string_names_the_field() -> None:
    with pytest.raises(IndexBuildError, match=r"spec\.index\.type: 'IVF8,Bogus'.*factory"):
        make_index(16, "IVF8,Bogus")
    with pytest.raises(IndexBuildError, match=r"multiple of the number of subquantizers"):
        make_index(30, "IVF8,PQ16")


def test_too_few_training_vectors_is_clear() -> None:
    with pytest.raises(IndexBuildError, match=r"training on 50 vectors failed.*trainSample"):
        build_index(clustered(50, 16), "IVF256,Flat")


@pytest.mark.skipif(gpu_count() > 0, reason="this faiss has a GPU")
def test_gpu_always_without_gpu_fails() -> None:
    with pytest.raises(IndexBuildError, match="useGpu is 'always'"):
        build_index(clustered(100, 8), "flat", use_gpu="always")


def test_load_shard_index_overrides_nprobe(tmp_path) -> None:
    import faiss

    x = clustered(1000, 16)
    index, _ = build_index(x, "IVF8,Flat", nprobe=2)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    assert faiss.extract_index_ivf(load_shard_index(tmp_path / "index.faiss")).nprobe == 2
    loaded = load_shard_index(tmp_path / "index.faiss", nprobe=8)
    assert faiss.extract_index_ivf(loaded).nprobe == 8
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(IndexBuildError, match="bad.faiss: not a readable FAISS index"):
        load_shard_index(tmp_path / "bad.faiss")

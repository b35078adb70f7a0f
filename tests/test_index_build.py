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


# --- the stage --------------------------------------------------------------------------------


def publish_embeddings(tmp_path, index_type: str, vectors: np.ndarray, **index: object):
    """A run whose embed stage is published (random vectors stand in for the encoder)."""
    import json

    from ttt.spec import parse_spec
    from ttt.stages import shard_prefix
    from ttt.store import open_store

    raw = {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTRun",
        "metadata": {"name": "index-test"},
        "spec": {
            "index": {"type": index_type, "recallQueries": 100, **index},
            "retrieval": {"neighbors": 20},
            "storage": {"root": str(tmp_path / "store")},
        },
    }
    run = parse_spec(raw, environ={})
    store = open_store(run.spec.storage)
    np.save(tmp_path / "embeddings.npy", vectors)
    (tmp_path / "ids.json").write_text(json.dumps([f"doc:{i}" for i in range(len(vectors))]))
    files = {"embeddings.npy": tmp_path / "embeddings.npy", "ids.json": tmp_path / "ids.json"}
    manifest = {"stage": "embed", "shard": 0, "spec_hash": run.stage_hash("embed")}
    store.publish(shard_prefix(run, "embed", 0), files, manifest)
    return run, store


def test_stage_publishes_flat_index_with_manifest(tmp_path) -> None:
    from ttt.index.build import INDEX, build_shard_index
    from ttt.stages import shard_prefix

    x = clustered(400, 32)
    run, store = publish_embeddings(tmp_path, "flat", x)
    manifest = build_shard_index(run, store, 0)
    prefix = shard_prefix(run, "index", 0)
    assert store.read_manifest(prefix) == manifest
    assert manifest["type"] == "flat" and manifest["ntotal"] == 400 and manifest["recall"] == 1.0
    assert manifest["recall_k"] == 20 and manifest["spec_hash"] == run.stage_hash("index")
    # IndexFlatL2 stores float32: 4 bytes per dimension, plus a small header.
    assert 128 <= manifest["bytes_per_vector"] < 129
    index = load_shard_index(store.fetch(f"{prefix}/{INDEX}"))
    _, labels = index.search(x[:5].astype(np.float32), 1)
    assert labels[:, 0].tolist() == [0, 1, 2, 3, 4]  # a FAISS label is a row of the shard


def test_stage_ivf_pq_reports_recall_and_compression(tmp_path) -> None:
    from ttt.index.build import build_shard_index

    x = clustered(3000, 64)
    run, store = publish_embeddings(tmp_path, "IVF16,PQ8", x, trainSample=2000, nprobe=4)
    manifest = build_shard_index(run, store, 0)
    assert 0 < manifest["recall"] <= 1 and manifest["recall_queries"] == 100
    assert manifest["nprobe"] == 4 and manifest["trained_on"] == 2000
    assert manifest["bytes_per_vector"] < 256 / 4
    assert manifest["build_seconds"] >= manifest["train_seconds"] >= 0


def test_stage_without_embeddings_says_what_to_run(tmp_path) -> None:
    from ttt.index.build import build_shard_index
    from ttt.spec import parse_spec
    from ttt.store import open_store

    raw = {"metadata": {"name": "empty"}, "spec": {"storage": {"root": str(tmp_path)}}}
    run = parse_spec(raw, environ={})
    with pytest.raises(IndexBuildError, match=r"shard 0: embeddings .* missing; run `ttt embed"):
        build_shard_index(run, open_store(run.spec.storage), 0)


def test_stage_bad_type_names_shard_and_field(tmp_path) -> None:
    from ttt.index.build import build_shard_index

    run, store = publish_embeddings(tmp_path, "IVF4,Nonsense", clustered(100, 16))
    with pytest.raises(IndexBuildError, match=r"shard 0: spec\.index\.type: 'IVF4,Nonsense'"):
        build_shard_index(run, store, 0)


def test_bench_index_compares_flat_and_ivf_pq(capsys: pytest.CaptureFixture[str]) -> None:
    from ttt.bench.index import bench_index

    figures = bench_index(vectors=3000, dim=64, index_type="IVF16,PQ8", nprobe=4, queries=50)
    assert figures["flat_recall@50"] == 1.0 and 0 < figures["approx_recall@50"] <= 1
    assert figures["memory_ratio"] > 4
    out = capsys.readouterr().out
    command = "ttt bench index --preset cpu --vectors 3000 --dim 64 --type IVF16,PQ8 --nprobe 4"
    assert f"reproduce: {command} --queries 50" in out

"""Exact re-ranking of IVF-PQ candidates: recall, exact distances, the build stage and a server."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from index_shards import AUTH, make_run, serve_shard

from ttt.bench.index import embedding_like
from ttt.index.build import build_index, build_shard_index, measure_recall
from ttt.index.rerank import RerankedIndex, search_reranked
from ttt.index.shard import ShardError, load_shard
from ttt.stages import shard_prefix


def exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((queries[:, None, :] - vectors.astype(np.float32)[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    path = tmp_path_factory.mktemp("vectors") / "embeddings.npy"
    np.save(path, embedding_like(4000, 64, seed=3))
    vectors = np.load(path, mmap_mode="r")  # as a server holds them
    index, _ = build_index(vectors, "IVF16,PQ4", train_sample=4000, nprobe=16, use_gpu="never")
    return vectors, index


def test_rerank_raises_recall_to_flat_level(clustered):
    vectors, index = clustered
    plain = measure_recall(index, vectors, 20, 100)
    reranked = measure_recall(RerankedIndex(index, vectors, 10), vectors, 20, 100)
    assert plain < 0.9  # PQ4 codes alone miss neighbors
    assert reranked >= 0.99


def test_rerank_returns_exact_distances_sorted(clustered):
    vectors, index = clustered
    q = np.asarray(vectors[:7], dtype=np.float32) + 0.05
    d, labels = search_reranked(index, vectors, q, 10, 8)
    assert d.dtype == np.float32 and labels.shape == (7, 10)
    true = (np.asarray(vectors[labels.ravel()], np.float32).reshape(7, 10, -1) - q[:, None]) ** 2
    np.testing.assert_allclose(d, true.sum(-1), rtol=1e-5)
    assert (np.diff(d, axis=1) >= 0).all()
    exact_d, _ = exact(np.asarray(vectors), q, 10)
    np.testing.assert_allclose(d, exact_d, rtol=1e-4)  # the exact top-10 here


def test_rerank_pads_when_the_index_finds_fewer_than_k():
    vectors = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float16)
    index, _ = build_index(vectors, "flat")
    d, labels = search_reranked(index, vectors, np.zeros((2, 4), np.float32), 8, 3)
    assert (labels[:, 5:] == -1).all() and np.isinf(d[:, 5:]).all()
    assert sorted(labels[0, :5].tolist()) == list(range(5))
    with pytest.raises(ValueError, match="shape"):
        RerankedIndex(index, vectors[:4], 2)


def publish_embeddings(run, store, shard: int, vectors: np.ndarray) -> None:
    """Embeddings as the embed stage publishes them (float16), so the index stage can run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.npy"
        np.save(path, vectors.astype(np.float16))
        manifest = {"stage": "embed", "shard": shard, "spec_hash": run.stage_hash("embed")}
        store.publish(shard_prefix(run, "embed", shard), {"embeddings.npy": path}, manifest)
    store.delete(shard_prefix(run, "index", shard))  # make_run's flat index: build anew


INDEX = "  index: {type: 'IVF4,PQ2x4', nprobe: 4, rerank: 20, recallQueries: 30}\n"


def test_server_with_rerank_answers_as_flat(tmp_path):
    # 90 vectors, k=5 x rerank 20 >= 90 candidates over every list: re-ranking is exhaustive,
    # so the PQ index must answer exactly as a flat index over the float16 vectors.
    _, run, store, vectors, texts = make_run(tmp_path, shards=1, n_docs=90, dim=8, extra=INDEX)
    publish_embeddings(run, store, 0, vectors[0])
    manifest = build_shard_index(run, store, 0)
    assert manifest["rerank"] == 20 and manifest["recall"] == 1.0
    stored = vectors[0].astype(np.float16).astype(np.float32)
    with serve_shard(run, store, 0) as url, httpx.Client(base_url=url, timeout=10) as http:
        q = stored[:4] + 0.01
        body = {"vectors": q.tolist(), "k": 5, "include_vectors": True}
        r = http.post("/v1/search", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        exact_d, exact_i = exact(stored, q, 5)
        for hits, d, rows in zip(r.json()["results"], exact_d, exact_i, strict=True):
            assert hits["rows"] == rows.tolist()
            np.testing.assert_allclose(hits["distances"], d, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(hits["vectors"], stored[rows])
            assert hits["ids"] == [texts[0].meta(int(row))[0] for row in rows]


def test_rerank_without_embeddings_is_a_clear_error(tmp_path):
    _, run, store, vectors, _ = make_run(tmp_path, shards=1, n_docs=90, dim=8, extra=INDEX)
    publish_embeddings(run, store, 0, vectors[0])
    build_shard_index(run, store, 0)
    store.delete(shard_prefix(run, "embed", 0))
    with pytest.raises(ShardError, match="rerank is 20 but there are no embeddings"):
        load_shard(run, store, 0)

"""The retrieval benchmark runs end to end on tiny shards and reports what it promises."""

from __future__ import annotations

import pytest

from ttt.bench.retrieval import bench_retrieval


@pytest.mark.integration
def test_bench_retrieval_reports_latency_and_the_command(capsys):
    figures = bench_retrieval(
        preset="cpu", shards=2, vectors_per_shard=300, dim=16, k=5, queries=8, seed=3
    )
    assert figures["requests"] == 8 and figures["partial"] == 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["single_index_p50_ms"] > 0
    command = (
        "ttt bench retrieval --preset cpu --shards 2 --vectors-per-shard 300 --dim 16 --k 5 "
        "--queries 8 --seed 3"
    )
    assert figures["command"] == command
    out = capsys.readouterr().out
    assert "fan-out latency p50" in out and f"reproduce: {command}" in out
    with pytest.raises(ValueError, match="preset 'tpu'"):
        bench_retrieval(preset="tpu")


@pytest.mark.integration
def test_bench_retrieval_server_memory_does_not_grow_with_text(capsys):
    n, doc_bytes = 400, 16_384  # 6.5 MB of text per shard against 6.4 KB of offsets
    figures = bench_retrieval(
        preset="cpu", shards=2, vectors_per_shard=n, dim=8, k=3, queries=4, doc_bytes=doc_bytes
    )
    assert figures["text_bytes_per_shard"] == n * doc_bytes
    assert figures["texts_served_bytes_per_shard"] == n * doc_bytes  # every text read back
    assert figures["offsets_bytes_per_shard"] == n * 16 + 128  # int64 pairs + .npy header
    assert figures["rss_loaded_mb"] > 0
    # The store holds ids and offsets, never the texts; a second pass over them adds nothing.
    assert figures["textstore_rss_bytes"] < 0.1 * n * doc_bytes
    assert figures["rss_growth_second_pass_bytes"] < 0.1 * n * doc_bytes
    assert "--doc-bytes 16384" in figures["command"]
    assert "after serving every text" in capsys.readouterr().out

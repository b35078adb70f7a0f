"""The retrieval benchmark runs end to end on tiny shards and reports what it promises."""

from __future__ import annotations

import pytest

from ttt.bench_retrieval import bench_retrieval


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

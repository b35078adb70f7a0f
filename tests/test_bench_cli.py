"""`ttt bench`: each benchmark runs from the CLI, prints its figures and how to reproduce them."""

from __future__ import annotations

import json

from ttt.cli import main


def test_bench_index_cli_prints_figures_and_command(capsys):
    code = main(
        [
            "bench",
            "index",
            "--vectors",
            "3000",
            "--dim",
            "32",
            "--type",
            "IVF16,Flat",
            "--nprobe",
            "4",
            "--k",
            "10",
            "--queries",
            "20",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "reproduce: ttt bench index" in out and "--type IVF16,Flat" in out and "--k 10" in out
    figures = json.loads(out[out.index("{") :])
    assert figures["flat_recall@10"] == 1.0
    assert 0 < figures["approx_recall@10"] <= 1.0
    assert figures["flat_bytes_per_vector"] == 32 * 4
    assert figures["approx_query_p50_ms"] > 0 and figures["flat_query_p50_ms"] > 0
    assert figures["at_vectors"] == 210_000_000 and "at_formula" in figures


def test_bench_retrieval_cli(capsys):
    code = main(
        [
            "bench",
            "retrieval",
            "--shards",
            "2",
            "--vectors-per-shard",
            "500",
            "--dim",
            "16",
            "--k",
            "5",
            "--queries",
            "10",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out
    assert "reproduce: ttt bench retrieval --preset cpu --shards 2" in out


def test_bench_index_cli_reranks_against_vectors_on_disk(capsys):
    args = ["bench", "index", "--vectors", "3000", "--dim", "32", "--type", "IVF16,PQ4"]
    args += ["--nprobe", "8", "--rerank", "10", "--k", "10", "--queries", "30", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--rerank 10" in out
    figures = json.loads(out[out.index("{") :])
    assert figures["approx_rerank"] == 10
    assert figures["approx_recall@10"] >= 0.99 > figures["approx_recall@10_without_rerank"]
    assert figures["approx_disk_bytes_per_vector"] == 32 * 2  # float16 on disk, not in RAM
    assert figures["memory_ratio"] == round(32 * 4 / figures["approx_bytes_per_vector"], 1)

"""`ttt bench ttt`: the GPU presets' code path runs on a CPU at tiny sizes and reports figures."""

from __future__ import annotations

import json
import math

from ttt.cli import main


def test_bench_ttt_gpt2_preset_runs_tiny_on_cpu(capsys):
    args = ["bench", "ttt", "--preset", "gpt2", "--device", "cpu", "--layers", "1"]
    args += ["--width", "32", "--max-length", "32", "--documents", "3", "--neighbors", "2"]
    assert main([*args, "--members", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: ttt bench ttt --preset gpt2 --documents 3 --neighbors 2" in out
    figures = json.loads(out[out.index("{") :])
    # GPT-2 keeps the paper's dropout 0.1: the loop path, two members, float32 on a CPU
    assert (figures["ours_path"], figures["ours_members"]) == ("loop", 2)
    assert figures["ours_precision"] == "float32"
    assert figures["documents"] == 3 and figures["neighbors_per_document"] == 2
    for loop in ("paper", "sequential", "ours"):
        assert figures[f"{loop}_ms_per_neighbor"] > 0 and figures[f"{loop}_tokens_per_second"] > 0
        assert 0 < figures[f"{loop}_percent_of_peak"] and math.isfinite(figures[f"{loop}_tflops"])
    # one base model: the same score before training; ours trains as the sequential loop
    assert figures["paper_bpb_before"] == figures["ours_bpb_before"]
    assert abs(figures["ours_bpb_after"] - figures["sequential_bpb_after"]) < 1e-3
    assert figures["speedup_vs_paper"] > 0 and figures["peak_tflops"] > 0


def test_bench_ttt_profile_counts_each_path_on_a_cpu(capsys):
    args = ["bench", "ttt", "--preset", "gpt2", "--device", "cpu", "--layers", "1"]
    args += ["--width", "32", "--max-length", "32", "--documents", "2", "--neighbors", "2"]
    assert main([*args, "--profile", "--json"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: ttt bench ttt --preset gpt2" in out and out.count("--profile") == 1
    assert "engine_vmap.host_syncs" in out  # printed flat, one figure a line
    figures = json.loads(out[out.index("{") :])
    seq, loop, vmap = figures["sequential"], figures["engine_loop"], figures["engine_vmap"]
    stacked = figures["engine_stacked"]
    # the paper's step reads Adam's step counts back per parameter; the engine reads nothing
    assert seq["host_syncs"] >= 1
    assert loop["host_syncs"] == vmap["host_syncs"] == stacked["host_syncs"] == 0
    # per member-step: the stacked path launches each kernel once for both members
    assert stacked["kernels"] < 0.7 * loop["kernels"] < seq["kernels"]
    assert stacked["operators"] < loop["operators"] < seq["operators"]
    # GPT-2's attention dropout: a CPU's SDPA takes its math fallback; vmap runs eager
    assert seq["attention"] == loop["attention"] == vmap["attention"] == "unfused"
    assert stacked["attention"] == "unfused"  # dropout on a CPU: the math fallback too
    # no table-sized zeros, sum or gradient copy: less traffic than the loop path
    assert stacked["param_traffic_bytes_per_param"] < loop["param_traffic_bytes_per_param"]
    for path in (seq, loop, vmap, stacked):
        assert 8 < path["param_traffic_bytes_per_param"] < 200
        assert path["bytes_allocated_per_param"] > 0
    # a worker holds one saved copy: the engine's base is the sequential loop's saved weights
    held = figures["engine_loop_held_bytes_per_param"]
    assert held["saved weights"] < 5 and held["member weights"] == 8.0  # two members
    assert abs(held["total"] - sum(v for k, v in held.items() if k != "total")) < 0.05
    assert figures["sequential_held_bytes_per_param"]["optimizer moments"] == 8.0
    assert figures["resident_peak_bytes_per_param"] > 0


def test_attention_kind_tells_one_call_for_all_members_from_one_per_member():
    from ttt.bench.ttt_profile import attention_kind
    from ttt.engine.profile import StepCounts

    counts = StepCounts()
    counts.by_operator["_scaled_dot_product_flash_attention"] = 12
    assert attention_kind(counts, layers=12, members=4) == "fused, all members in one call"
    counts.by_operator["_scaled_dot_product_flash_attention"] = 48
    assert attention_kind(counts, 12, 4) == "fused, one call per member (4 per layer)"
    assert attention_kind(StepCounts(), 12, 4) == "unfused"


def test_bench_ttt_profile_refuses_compile():
    import pytest

    from ttt.bench.ttt import bench_ttt

    # the dispatch mode's counts would be of eager operators, not of the compiled step
    with pytest.raises(ValueError, match="does not take --compile"):
        bench_ttt(preset="gpt2", device="cpu", layers=1, width=32, profile=True, compile=True)

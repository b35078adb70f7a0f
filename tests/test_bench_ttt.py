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

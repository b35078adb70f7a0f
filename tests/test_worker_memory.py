"""One eval worker's host memory, measured in a fresh process on a small model."""

from __future__ import annotations

import pytest
from tiny_run import save_tiny_lm

from ttt.bench.worker_memory import TARGET_BYTES_PER_PARAM, eval_worker_figures, worker_memory


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("lm"), n_positions=64))


def test_a_sequential_worker_is_measured_in_a_fresh_process(tiny_lm):
    got = worker_memory(tiny_lm, 32, "sequential")
    assert got["engine"] == "sequential" and got["train_steps"] == 2  # two neighbors, a step each
    assert got["parameters"] > 1_000_000 and 0 < got["bpb_after"] < 20
    # the fixed overhead is torch and transformers imported: hundreds of MB, not the model
    assert 0.1 < got["fixed_overhead_gb"] < got["peak_gb"]
    # weights, saved weights and Adam's moments at least: 16 bytes per parameter
    assert got["loaded_bytes_per_param"] >= 4 and got["peak_bytes_per_param"] >= 16
    assert got["peak_bytes_per_param"] >= got["built_bytes_per_param"]
    assert got["within_target"] == (got["peak_bytes_per_param"] <= TARGET_BYTES_PER_PARAM)


def test_the_profile_figures_name_both_engines_against_the_target(tiny_lm):
    figures = eval_worker_figures(tiny_lm, 32, neighbors=1, doc_tokens=16)
    assert set(figures) == {
        "fixed_overhead_gb",
        "sequential_peak_bytes_per_param",
        "engine_peak_bytes_per_param",
        "engine_recompute_peak_bytes_per_param",
        "target_bytes_per_param",
    }
    assert figures["target_bytes_per_param"] == 24
    assert (
        figures["engine_peak_bytes_per_param"] > 0
        and figures["sequential_peak_bytes_per_param"] > 0
    )
    # the tiny model has dropout: in float32 the ensemble's loop path, which cannot recompute
    assert figures["engine_recompute_peak_bytes_per_param"].startswith(
        "not run: spec.ttt.recompute"
    )


def test_a_failing_child_is_an_error_that_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="worker memory child failed"):
        worker_memory(str(tmp_path / "nothing"), 32)

"""The rule that picks an engine, and the precision each dtype means."""

from __future__ import annotations

import pytest
import torch

from ttt.engine.precision import resolve_precision, weight_dtype
from ttt.engine.select import (
    FASTEST,
    FASTEST_ON_PATH,
    EngineError,
    SequentialEngine,
    build_engine,
    choose_engine,
    explain_engine,
)
from ttt.spec import TTTSpec, parse_spec


def test_auto_takes_the_ensemble_only_where_it_is_equal_and_the_devices_fastest():
    gpu = "cuda"
    assert choose_engine(TTTSpec(), gpu) == "ensemble"  # the paper's ttt-nn with a fresh Adam
    assert choose_engine(TTTSpec(dtype="bfloat16"), gpu) == "ensemble"
    # the paper examples' carried optimizer: members are tasks, equal per document
    assert choose_engine(TTTSpec(reset_optimizer=False), gpu) == "ensemble"
    for unequal in ({"method": "dynamic-eval"}, {"method": "in-context"}, {"dtype": "float16"}):
        assert choose_engine(TTTSpec(**unequal), gpu) == "sequential", unequal
        with pytest.raises(EngineError, match="not equal to the sequential loop"):
            choose_engine(TTTSpec(engine="ensemble", **unequal), gpu)
    assert choose_engine(TTTSpec(engine="sequential"), gpu) == "sequential"


def test_on_a_cpu_auto_takes_the_faster_engine_for_the_path_and_says_why(tiny_gpt2):
    # one member, stacked (SmolLM2) or loop path (GPT-2's dropout): both timed faster
    for model in ("smollm2-135m", "gpt2"):
        cpu = explain_engine(TTTSpec(model=model), "cpu")
        assert (cpu.engine, cpu.device) == ("ensemble", "cpu")
        assert "715-718 ms per neighbor" in cpu.reason  # the measurement behind the rule
    assert FASTEST["cpu"][0] == "ensemble" and FASTEST["cuda"][0] == "ensemble"
    # several members of an architecture without a stacked forward: vmap, not timed here
    assert FASTEST_ON_PATH[("cpu", "vmap")][0] == "sequential"
    other = tiny_gpt2()
    other.config.model_type = "gptj"  # any architecture ttt.engine.stacked does not write out
    assert choose_engine(TTTSpec(ensemble_size=2), "cpu", other) == "sequential"
    assert choose_engine(TTTSpec(ensemble_size=2), "cpu", tiny_gpt2()) == "ensemble"
    # asked for by name it still runs where it is equal, on any device
    assert choose_engine(TTTSpec(engine="ensemble"), "cpu") == "ensemble"
    other = explain_engine(TTTSpec(), "meta")  # a device type nobody measured: the loop
    assert other.engine == "sequential" and "not measured" in other.reason
    assert "resetOptimizer" not in explain_engine(TTTSpec(method="in-context"), "cuda").reason
    assert "method in-context" in explain_engine(TTTSpec(method="in-context"), "cuda").reason
    # the spec's device decides when none is given; a bad one is named
    assert explain_engine(TTTSpec(device="cpu")).device == "cpu"
    with pytest.raises(EngineError, match="spec.ttt.device 'gpu0'"):
        explain_engine(TTTSpec(device="gpu0"))


def test_build_engine_follows_the_models_device_and_path(tiny_gpt2, gpt2_tokenizer):
    dropout = build_engine(tiny_gpt2(dropout=0.1), gpt2_tokenizer, TTTSpec())
    assert type(dropout).__name__ == "EnsembleTTT" and dropout.path == "loop"
    stacked = build_engine(tiny_gpt2(), gpt2_tokenizer, TTTSpec())
    assert type(stacked).__name__ == "EnsembleTTT" and stacked.path == "stacked"
    sequential = build_engine(tiny_gpt2(), gpt2_tokenizer, TTTSpec(engine="sequential"))
    assert isinstance(sequential, SequentialEngine)
    forced = build_engine(tiny_gpt2(), gpt2_tokenizer, TTTSpec(engine="ensemble"))
    assert type(forced).__name__ == "EnsembleTTT"


def test_the_engine_switch_is_a_spec_field_and_ensemble_size_stays_out_of_the_hash():
    def run(**ttt):
        raw = {"apiVersion": "ttt.dev/v1alpha1", "kind": "TTTRun", "metadata": {"name": "a"}}
        return parse_spec(raw | {"spec": {"ttt": ttt}}, environ={})

    assert run(engine="sequential").spec.ttt.engine == "sequential"
    assert run().stage_hash("eval") == run(ensembleSize=8).stage_hash("eval")
    assert run().stage_hash("eval") != run(engine="sequential").stage_hash("eval")
    with pytest.raises(ValueError, match="engine"):
        run(engine="fastest")


def test_a_model_not_in_float32_runs_the_sequential_loop(tiny_gpt2, gpt2_tokenizer):
    model = tiny_gpt2().to(torch.bfloat16)
    assert isinstance(build_engine(model, gpt2_tokenizer, TTTSpec()), SequentialEngine)
    with pytest.raises(EngineError, match="float32"):
        build_engine(model, gpt2_tokenizer, TTTSpec(engine="ensemble"))


def test_auto_never_means_bf16_weights():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).autocast is None  # CPUs train in float32
    assert resolve_precision("bfloat16", cpu).autocast is torch.bfloat16
    assert resolve_precision("float32", cpu).name == "float32"
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16", cpu)
    assert weight_dtype("auto", "ensemble") == weight_dtype("auto", "sequential") == "float32"
    assert weight_dtype("bfloat16", "ensemble") == "float32"  # masters, autocast computes
    assert weight_dtype("bfloat16", "sequential") == "bfloat16"  # as asked, the old loop


def test_auto_with_recompute_takes_the_ensemble_only_on_the_stacked_path(tiny_gpt2):
    # GPT-2 in float32 has dropout: the ensemble's loop path, which cannot recompute
    paper = explain_engine(TTTSpec(model="gpt2", dtype="float32", recompute=True), "cuda")
    assert paper.engine == "sequential" and "recompute" in paper.reason
    fast = TTTSpec(model="gpt2", dtype="auto", recompute=True)  # bf16 autocast: stacked
    assert choose_engine(fast, "cuda") == "ensemble"
    assert choose_engine(TTTSpec(model="smollm2-135m", recompute=True), "cpu") == "ensemble"
    loaded = tiny_gpt2(dropout=0.1)  # float32 with dropout: the loop path
    assert choose_engine(TTTSpec(recompute=True), "cpu", loaded) == "sequential"
    assert choose_engine(TTTSpec(recompute=True), "cpu", tiny_gpt2()) == "ensemble"

"""spec.ttt.compile: the compiled stacked step and Adam writing the bf16 copy equal the eager ones."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.metrics

from tests.test_engine_ensemble import ITEMS, assert_equal_outcomes, spec, tiny_llama
from ttt.engine.adam import StackedAdam
from ttt.engine.compiled import adam_member, compiled_adam, shadowed
from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.rule import EngineError, explain_engine

SHAPES = [torch.Size([48, 16]), torch.Size([16]), torch.Size([16, 48])]
OPTIONS = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def test_shadowed_are_the_weights_that_only_feed_matmuls(tiny_gpt2):
    gpt2 = tiny_gpt2()
    got = dict(zip([n for n, _ in gpt2.named_parameters()], shadowed(gpt2), strict=True))
    # GPT-2's Conv1D weights and biases; not the tied table, positions or norms
    assert {n for n, c in got.items() if c} == {
        f"transformer.h.{i}.{m}.{k}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for k in ("weight", "bias")
    }
    llama = tiny_llama()
    got = dict(zip([n for n, _ in llama.named_parameters()], shadowed(llama), strict=True))
    assert got["lm_head.weight"] and not got["model.embed_tokens.weight"]  # a head apart
    assert got["model.layers.0.mlp.down_proj.weight"]
    assert not got["model.layers.0.input_layernorm.weight"] and not got["model.norm.weight"]


def _state(seed: int, grad_dtype: torch.dtype):
    torch.manual_seed(seed)
    return (
        [torch.randn(s) for s in SHAPES],
        [torch.randn(s).to(grad_dtype) for s in SHAPES],
        [0.1 * torch.randn(s) for s in SHAPES],
        [0.01 * torch.rand(s) for s in SHAPES],
    )


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_adam_member_is_torchs_fused_adam_and_writes_the_bf16_copy(decoupled, compiled):
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    step = compiled_adam() if compiled else adam_member
    ws, gs, ms, vs = _state(0, torch.bfloat16)
    copies = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    copies[1] = None  # a parameter without a copy stays as it is
    want = _state(0, torch.bfloat16)
    count = torch.zeros(())
    for n in range(3):
        count += 1
        scale = torch.tensor(1.0 + n)
        step(ws, gs, ms, vs, copies, count, scale, **OPTIONS, weight_decay=0.1,
             decoupled=decoupled)  # fmt: skip
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(want[0], [g.float() for g in want[1]], want[2], want[3], [], [count.clone()] * 3,
               **OPTIONS,
               weight_decay=0.1, amsgrad=False, maximize=False, grad_scale=scale)  # fmt: skip
    for mine, theirs in zip([*ws, *ms, *vs], [*want[0], *want[2], *want[3]], strict=True):
        # a few float32 units in the last place of a unit-sized weight, the update's rounding
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for copy, w in zip(copies, ws, strict=True):
        if copy is not None:  # autocast's own cast of the updated weight, to the bit
            assert torch.equal(copy, w.to(torch.bfloat16))
    if compiled:  # one generated kernel per parameter: one pass, the copy written in it
        assert torch._inductor.metrics.generated_kernel_count == len(SHAPES)


def test_stacked_adam_keeps_each_members_copy():
    weights = torch.randn(2, sum(s.numel() for s in SHAPES))
    adam = StackedAdam(
        weights, lr=1e-2, shapes=SHAPES, copies=[True, False, True], fused=adam_member
    )
    assert adam.copy.shape == (2, SHAPES[0].numel() + SHAPES[2].numel())
    stacked = adam.stacked_copies()
    assert stacked[1] is None and stacked[0].shape == (2, *SHAPES[0])
    assert torch.equal(stacked[2][1], adam.pieces(1)[0][2].to(torch.bfloat16))
    grads = [[torch.randn(s).to(torch.bfloat16) for s in SHAPES], None]
    adam.step(grads, [True, False])
    assert adam.steps == [1, 0]
    assert torch.equal(adam.copies(0)[0], adam.pieces(0)[0][0].to(torch.bfloat16))
    assert torch.equal(
        adam.copies(1)[0], weights[1, : SHAPES[0].numel()].view(SHAPES[0]).bfloat16()
    )
    weights[0].zero_()  # set from outside (a member's next document): refreshed on request
    adam.refresh(0)
    assert not adam.copy[0].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_ensemble_equals_the_eager_one(dtype, tiny_gpt2, gpt2_tokenizer):
    want = dict(EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(dtype=dtype), members=2)
                .evaluate_stream(ITEMS))  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(dtype=dtype, compile=True), members=2)
    assert (ensemble.adam.copy is not None) == (dtype == "bfloat16")
    widths = []
    inputs = ensemble.inputs
    ensemble.inputs = lambda chunks: (
        widths.append(max(len(c) for c in chunks if c)) or inputs(chunks)
    )
    shapes = []
    train_step = ensemble.train_step
    ensemble.train_step = lambda given, slots: (
        shapes.append(given[0][0].shape) or train_step(given, slots)
    )
    got = dict(ensemble.evaluate_stream(ITEMS))
    # float32: the compiled kernels' own rounding; bf16: measured 4e-5 bits per byte apart
    assert_equal_outcomes(got, want, **({"rel": 1e-5} if dtype == "float32" else {"bpb": 1e-3}))
    assert min(widths) < 32 and set(shapes) == {(2, 32)}  # short chunks padded: one shape
    assert not torch._dynamo.utils.counters["graph_break"]  # the whole step one graph
    if dtype == "bfloat16":  # what the forward read last is the members' weights, rounded
        for copy, rows in zip(ensemble.adam.stacked_copies(), ensemble.stacked, strict=True):
            if copy is not None:
                assert torch.equal(copy, rows.to(torch.bfloat16))


def test_compile_is_refused_where_it_cannot_run(tiny_gpt2, gpt2_tokenizer):
    with pytest.raises(EngineError, match="stacked path only.*loop path"):
        # float32 with dropout: exact masks need the loop path
        EnsembleTTT(tiny_gpt2(dropout=0.1), gpt2_tokenizer, spec(compile=True), members=1)
    with pytest.raises(EngineError, match="compile and recompute"):
        EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(compile=True, recompute=True), members=1)
    with pytest.raises(EngineError, match="spec.ttt.compile: .*sequential loop"):
        explain_engine(spec(compile=True, engine="sequential"), "cpu", tiny_gpt2())
    choice = explain_engine(spec(compile=True), "cpu", tiny_gpt2())
    assert choice.engine == "ensemble" and "compiled" in choice.reason


def _ttt_run(spec_text: str, root, name: str):
    import subprocess
    import sys
    from pathlib import Path

    path = root / f"{name}.yaml"
    path.write_text(spec_text)
    env = {**__import__("os").environ, "TMPDIR": str(root), "PYTHONPATH": str(Path.cwd())}
    return subprocess.run(
        [sys.executable, "-m", "ttt", "run", str(path), "--workdir", str(root / f"work-{name}")],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_ttt_run_compiles_in_its_eval_worker_and_refuses_before_any_work(tmp_path):
    import json

    from tests.tiny_run import save_tiny_lm, tiny_spec
    from ttt.spec import loads_spec
    from ttt.store import open_store

    # without dropout: both runs train the same (masks drawn by compiled kernels would differ)
    save_tiny_lm(tmp_path / "lm", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    text = tiny_spec(tmp_path, "compiled", shards=1, in_process=True)
    text = text.replace("maxDocumentsPerTask: 2", "maxDocumentsPerTask: 1")
    # the paper's order of learning rate (the tiny run's 1e-3 makes bf16 roundings diverge)
    assert text.count("learningRate: 1.0e-3") == 1
    text = text.replace("learningRate: 1.0e-3", "learningRate: 1.0e-4")
    own = "evalAfter: [0, 2, 4]}"
    assert text.count(own) == 1
    asked = own[:-1] + ", compile: true, recompute: true}"
    refused = _ttt_run(text.replace(own, asked), tmp_path, "refused")
    assert refused.returncode == 1 and "compile and recompute" in refused.stderr
    assert not (tmp_path / "store").exists()  # refused before the corpus was published
    summaries = {}
    runs = {
        "eager": "",
        "compiled": ", compile: true",
        "eager-bf16": ", dtype: bfloat16",
        "compiled-bf16": ", dtype: bfloat16, compile: true",
    }
    for name, extra in runs.items():
        spec = text.replace(own, own[:-1] + f"{extra}}}")
        spec = spec.replace("name: compiled}", f"name: {name}}}")
        done = _ttt_run(spec, tmp_path, name)
        assert done.returncode == 0, done.stderr[-3000:]
        run = loads_spec(spec)
        store = open_store(run.spec.storage)
        summaries[name] = json.loads(store.get_bytes(f"{run.prefix}/report/summary.json"))
    # float32: the compiled kernels' rounding; bf16 (Adam's copy read by the forward, the
    # kernels computing between matmuls in float32): 3e-5 apart measured, well within 0.01
    for base, bound in (("eager", 1e-4), ("eager-bf16", 1e-3)):
        want, got = summaries[base], summaries[base.replace("eager", "compiled")]
        assert got["tasks"].keys() == want["tasks"].keys() and want["tasks"]
        for task, figures in want["tasks"].items():
            assert got["tasks"][task]["before"] == figures["before"], task  # nothing trained
            assert abs(got["tasks"][task]["after"] - figures["after"]) < bound, (base, task)
            assert got["tasks"][task]["after"] != figures["before"]  # it did train


def test_clip_scales_of_bf16_gradients_are_those_of_their_float32_values():
    from ttt.engine.adam import clip_scales

    torch.manual_seed(3)
    rows = [[torch.randn(s).to(torch.bfloat16) for s in SHAPES], [torch.randn(5)]]
    wide = [[g.float() for g in rows[0]], rows[1]]
    got, want = clip_scales(rows, 0.5), clip_scales(wide, 0.5)
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)

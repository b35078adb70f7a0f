"""The ensemble and mixed-precision engine gives the sequential fp32 loop's per-document bpb."""

from __future__ import annotations

import math

import pytest
import torch

from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.members import choose_members, choose_path
from ttt.spec import TTTSpec
from ttt.train import TTTNN

DOC = "The harbour master logged every ship that entered the bay before dawn. " * 2
NEIGHBORS = [
    "The harbour master logged every ship that entered the bay at night. " * 3,
    "Every ship that entered the harbour was logged by the master. " * 2,
    "Quantum chromodynamics describes how quarks and gluons interact. " * 2,
]
# three documents for two members: one refill, one idle member at the end; one document
# with a single neighbor (checkpoint 3 falls back to 1) and one with none at all
ITEMS = [
    ("a", DOC, NEIGHBORS, [0.3, 0.1, 0.2]),
    ("b", "Ships and harbours. " * 5, NEIGHBORS[:1], None),
    ("c", "Quarks and gluons bind into hadrons. " * 3, NEIGHBORS[::-1], [0.5, 0.2, 0.1]),
    ("d", "Nothing was retrieved for this one.", [], None),
]


def spec(**overrides) -> TTTSpec:
    fields = {
        "max_length": 32,
        "learning_rate": 1e-3,
        "eval_after": [0, 1, 3],
        "optimizer": "adamw",
        "weight_decay": 0.01,
    }
    return TTTSpec(**(fields | overrides))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def snapshot(model):
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def sequential(model, tokenizer, ttt_spec, items=ITEMS):
    loop = TTTNN(model, tokenizer, ttt_spec.model_copy(update={"dtype": "float32"}))
    return {key: loop.evaluate(text, nbrs, distances=d) for key, text, nbrs, d in items}


def assert_equal_outcomes(got, want, *, rel=None, bpb=None):
    assert got.keys() == want.keys()
    for key, ref in want.items():
        out = got[key]
        assert out.afters == ref.afters, key
        for mine, theirs in zip(out.checkpoints, ref.checkpoints, strict=True):
            # what was trained is exactly the same: neighbors, steps and tokens
            assert (mine.neighbors, mine.train_steps, mine.train_tokens, mine.bytes) == (
                theirs.neighbors,
                theirs.train_steps,
                theirs.train_tokens,
                theirs.bytes,
            ), key
            if rel is not None:
                assert mine.bits_per_byte == pytest.approx(theirs.bits_per_byte, rel=rel), key
            else:
                assert abs(mine.bits_per_byte - theirs.bits_per_byte) <= bpb, key
        assert out.neighbors_used == ref.neighbors_used and out.train_steps == ref.train_steps
        assert out.score_passes == ref.score_passes, key
        # the training loss per neighbor (the paper's falling curve) as the loop records it
        assert len(out.train_losses) == len(ref.train_losses), key
        for mine, theirs in zip(out.train_losses, ref.train_losses, strict=True):
            if math.isnan(theirs):
                assert math.isnan(mine), key
            else:
                assert mine == pytest.approx(theirs, rel=rel or 0.02), key


@pytest.mark.parametrize("path", ["stacked", "vmap"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_ensemble_equals_the_sequential_loop(arch, path, tiny_gpt2, gpt2_tokenizer):
    make = tiny_gpt2 if arch == "gpt2" else tiny_llama
    want = sequential(make(), gpt2_tokenizer, spec())
    model = make()
    saved = snapshot(model)
    chosen = EnsembleTTT(model, gpt2_tokenizer, spec(), members=2).path
    assert chosen == "stacked"  # no dropout: all members in one batched step, written out
    ensemble = EnsembleTTT(model, gpt2_tokenizer, spec(), members=2, path=path)
    got = dict(ensemble.evaluate_stream(ITEMS))
    assert_equal_outcomes(got, want, rel=1e-4)
    assert got["a"].at(3).bits_per_byte < got["a"].at(0).bits_per_byte  # it did learn
    # the model is bit-identical after, and so is every member's start (checkpoint 0)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(tensor, saved[name]), name
    assert got["a"].at(0).loglik == want["a"].at(0).loglik
    assert not model.training


def test_loop_path_reproduces_seeded_dropout_and_the_loop_options(tiny_gpt2, gpt2_tokenizer):
    options = spec(
        stride=16, steps_per_neighbor=2, order="farthest-first", split_text=True, grad_clip=0.5
    )
    items = [ITEMS[0], ITEMS[1]]
    want = sequential(tiny_gpt2(dropout=0.1), gpt2_tokenizer, options, items)
    model = tiny_gpt2(dropout=0.1)
    ensemble = EnsembleTTT(model, gpt2_tokenizer, options, members=2)
    assert ensemble.path == "loop"  # dropout: each member replays its document's RNG stream
    assert_equal_outcomes(dict(ensemble.evaluate_stream(items)), want, rel=1e-4)


def test_bf16_autocast_stays_within_a_hundredth_of_a_bit(tiny_gpt2, gpt2_tokenizer):
    want = sequential(tiny_gpt2(), gpt2_tokenizer, spec())
    model = tiny_gpt2()
    saved = snapshot(model)
    ensemble = EnsembleTTT(model, gpt2_tokenizer, spec(dtype="bfloat16"), members=2)
    assert ensemble.precision.autocast is torch.bfloat16
    got = dict(ensemble.evaluate_stream(ITEMS))
    assert_equal_outcomes(got, want, bpb=0.01)
    assert got["a"].at(3).loglik != want["a"].at(3).loglik  # bf16 did compute the training
    # and the scoring: the untrained start scored with bf16 matmuls, float32 log-softmax
    assert ensemble.precision.scoring_name == "bfloat16-autocast"
    assert got["a"].at(0).loglik != want["a"].at(0).loglik
    assert abs(got["a"].at(0).bits_per_byte - want["a"].at(0).bits_per_byte) <= 0.01
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # masters stay fp32
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor, saved[name]), name


def test_one_document_and_an_error_restore_the_weights(tiny_gpt2, gpt2_tokenizer):
    model = tiny_gpt2()
    saved = snapshot(model)
    ensemble = EnsembleTTT(model, gpt2_tokenizer, spec(), members=1)
    assert ensemble.path == "stacked"  # one member without dropout: no functorch copies
    # one member: the model's parameters are its weights, not a copy of their own
    first = next(model.parameters())
    assert first.untyped_storage().data_ptr() == ensemble.weights.untyped_storage().data_ptr()
    one = ensemble.evaluate(DOC, NEIGHBORS[:2])
    want = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec()).evaluate(DOC, NEIGHBORS[:2])
    assert one.at(3).bits_per_byte == pytest.approx(want.at(3).bits_per_byte, rel=1e-4)
    with pytest.raises(ValueError, match="2 neighbors but 1 distances"):
        list(ensemble.evaluate_stream([ITEMS[0], ("bad", DOC, NEIGHBORS[:2], [0.1])]))
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor, saved[name]), name


def test_members_paths_and_refusals(tiny_gpt2, gpt2_tokenizer):
    assert choose_path(tiny_gpt2()) == "stacked" and choose_path(tiny_gpt2(dropout=0.1)) == "loop"
    # one member: stacked too (no functorch copies), but exact dropout masks need the loop
    assert choose_path(tiny_gpt2(), members=1) == "stacked"
    assert choose_path(tiny_gpt2(dropout=0.1), members=1) == "loop"
    # under autocast a dropout model batches too, with independent masks per member
    assert choose_path(tiny_gpt2(dropout=0.1), 2, torch.bfloat16) == "stacked"
    other = tiny_gpt2()
    other.config.model_type = "mistral"  # no stacked forward written: vmap
    assert choose_path(other) == "vmap" and choose_path(other, 2, torch.bfloat16) == "vmap"
    assert choose_path(other, members=1) == "loop"  # nothing to batch, no stacked forward
    with pytest.raises(ValueError, match="no stacked forward"):
        EnsembleTTT(other, gpt2_tokenizer, spec(), members=2, path="stacked")
    assert choose_members(tiny_gpt2(), spec(), torch.device("cpu")) == 1
    assert choose_members(tiny_gpt2(), spec(ensemble_size=6), torch.device("cpu")) == 6
    with pytest.raises(ValueError, match="ttt-nn only"):
        EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(method="dynamic-eval"))
    with pytest.raises(ValueError, match="float32"):
        EnsembleTTT(tiny_gpt2().to(torch.bfloat16), gpt2_tokenizer, spec())


def test_vmap_path_finds_a_kernel_without_a_batching_rule_and_turns_to_eager(
    tiny_gpt2, gpt2_tokenizer
):
    items = ITEMS[1:2]
    want = sequential(tiny_gpt2(), gpt2_tokenizer, spec(), items)
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=2, path="vmap")
    assert ensemble.eager_attention is True  # known on CPU: SDPA's backward has no rule
    ensemble.eager_attention = None  # as on a GPU: not known until the first step
    got = dict(ensemble.evaluate_stream(items))
    assert ensemble.eager_attention is True  # the first step met the fallback and said so
    assert ensemble.model.config._attn_implementation == "sdpa"  # swapped only inside vmap
    assert_equal_outcomes(got, want, rel=1e-4)


@pytest.mark.parametrize("path", ["stacked", "vmap"])
def test_out_of_memory_halves_the_wave_and_retries_the_step(path, monkeypatch, gpt2_tokenizer):
    want = sequential(tiny_llama(), gpt2_tokenizer, spec())
    ensemble = EnsembleTTT(tiny_llama(), gpt2_tokenizer, spec(), members=4, path=path)
    inner = getattr(ensemble, f"_grads_{path}")
    calls = []

    def tight(weights, ids, *rest):
        calls.append(ids.shape[0])
        if ids.shape[0] > 1:  # a device that holds one member's activations only
            raise torch.OutOfMemoryError("out of memory (injected)")
        return inner(weights, ids, *rest)

    monkeypatch.setattr(ensemble, f"_grads_{path}", tight)
    got = dict(ensemble.evaluate_stream(ITEMS))
    assert calls[:3] == [4, 2, 1] and ensemble.wave == 1  # halved twice, then one at a time
    assert set(calls[3:]) == {1}
    assert_equal_outcomes(got, want, rel=1e-4)  # the retried steps changed nothing
    # one member per call and still out of memory: the error is the caller's
    monkeypatch.setattr(ensemble, f"_grads_{path}", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("out of memory (injected)")))  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError):
        list(ensemble.evaluate_stream(ITEMS[:1]))


def test_a_members_bytes_count_logits_and_unfused_attention_scores(tiny_gpt2):
    from ttt.engine.members import member_bytes

    model = tiny_gpt2()
    params = sum(p.numel() for p in model.parameters())
    short, long = member_bytes(model, 64), member_bytes(model, 128)
    assert short > 24 * params + 64 * 50257 * 16  # weights, moments and the logits' copies
    assert long - short == short - 24 * params  # fused attention: linear in the tokens
    model.config.model_type = "mistral"  # no stacked forward: vmap may run eager attention
    scores = 2 * 2 * 12  # layers x heads x 12 bytes, per token pair
    assert member_bytes(model, 128) - long == scores * 128 * 128


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_the_same_documents_in_the_loop_and_on_the_stacked_path(
    dropout, tiny_gpt2, gpt2_tokenizer
):
    """spec.ttt.recompute: the sequential loop (transformers' checkpointing) and the stacked
    path run each layer again in the backward, with the same per-document results."""
    want = sequential(tiny_gpt2(dropout=dropout), gpt2_tokenizer, spec())
    again = sequential(tiny_gpt2(dropout=dropout), gpt2_tokenizer, spec(recompute=True))
    assert_equal_outcomes(again, want, rel=1e-6)
    if dropout:  # the float32 ensemble replays each member's masks: the loop path, refused
        from ttt.engine.rule import EngineError

        with pytest.raises(EngineError, match="stacked path only"):
            EnsembleTTT(tiny_gpt2(dropout=0.1), gpt2_tokenizer, spec(recompute=True), members=2)
        return
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(recompute=True), members=2)
    assert ensemble.path == "stacked" and ensemble.recompute
    assert_equal_outcomes(dict(ensemble.evaluate_stream(ITEMS)), want, rel=1e-4)


def test_recompute_leaves_the_shared_model_as_it_was(tiny_gpt2, gpt2_tokenizer):
    """The sequential loop turns transformers' checkpointing on around its own steps only:
    the model it was given (which the ensemble shares) is left as it was, before and after."""
    model = tiny_gpt2()
    EnsembleTTT(model, gpt2_tokenizer, spec(recompute=True), members=1)
    assert not model.is_gradient_checkpointing
    loop = TTTNN(model, gpt2_tokenizer, spec(recompute=True))
    assert not model.is_gradient_checkpointing
    during = []
    hook = model.register_forward_pre_hook(
        lambda module, args: during.append((module.training, module.is_gradient_checkpointing))
    )
    loop.evaluate(*ITEMS[0][1:3])
    hook.remove()
    assert (True, True) in during  # its training forwards recompute
    assert all(checkpointing == training for training, checkpointing in during)  # scoring not
    assert not model.is_gradient_checkpointing

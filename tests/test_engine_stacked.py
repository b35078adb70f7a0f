"""The stacked forward is the model's own per member: losses and gradients, GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tests.test_engine_ensemble import tiny_llama
from ttt.engine.stacked import stacked_losses, unsupported


def _members(model, members: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """E different copies of the model's weights, stacked: (E, *shape) per parameter."""
    torch.manual_seed(seed)
    return {
        name: torch.stack([p.detach() + 0.02 * torch.randn_like(p) for _ in range(members)])
        for name, p in model.named_parameters()
    }


def _own_loss(model, weights, ids, mask):
    """One member through the model's own forward (transformers' modules), the engine's loss."""
    out = functional_call(model, weights, (), {"input_ids": ids[None], "use_cache": False})
    logp = out.logits[0, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, ids[1:, None]).squeeze(-1)
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


def _batch(lengths: list[int], vocab: int = 1000):
    torch.manual_seed(2)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width - 1)
    for e, n in enumerate(lengths):  # right padding, as the engine pads its chunks
        ids[e, :n] = torch.randint(0, vocab, (n,))
        mask[e, : n - 1] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-tied"])
def test_losses_and_gradients_equal_the_models_own_forward_per_member(arch, tiny_gpt2):
    if arch == "gpt2":
        model = tiny_gpt2()
    else:
        model = tiny_llama()
        if arch == "llama-tied":  # SmolLM2's layout: the head is the embedding
            from transformers import LlamaForCausalLM

            config = model.config
            config.tie_word_embeddings = True
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
    assert unsupported(model) is None
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) == (arch == "llama")  # tied heads come once
    stacked = _members(model, 3)
    leaves = {n: t.clone().requires_grad_() for n, t in stacked.items()}
    ids, mask = _batch([20, 13, 17])
    got = stacked_losses(model, leaves, ids, mask, training=False)
    got_grads = torch.autograd.grad(got.sum(), list(leaves.values()))
    for e in range(3):
        mine = {n: t[e].clone().requires_grad_() for n, t in stacked.items()}
        want = _own_loss(model, mine, ids[e], mask[e])
        want_grads = torch.autograd.grad(want, list(mine.values()))
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-6)
        for name, g, w in zip(names, got_grads, want_grads, strict=True):
            torch.testing.assert_close(g[e], w, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_draws_independent_masks_per_member(tiny_gpt2):
    model = tiny_gpt2(dropout=0.1)
    weights = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
    ids, mask = _batch([16, 16])
    ids[1] = ids[0]  # the same weights, the same chunk
    same = stacked_losses(model, weights, ids, mask, training=False)
    assert same[0] == same[1]
    torch.manual_seed(0)
    dropped = stacked_losses(model, weights, ids, mask, training=True)
    assert dropped[0] != dropped[1]  # each member its own masks
    assert (dropped - same).abs().max() > 0


def test_other_architectures_say_why_they_keep_the_vmap_path(tiny_gpt2):
    from transformers import GPT2Config

    model = tiny_gpt2()
    model.config = GPT2Config(**{**model.config.to_dict(), "activation_function": "relu"})
    assert "activation" in unsupported(model)
    model.config.model_type = "mistral"
    assert "mistral" in unsupported(model)


@pytest.mark.parametrize("arch", ["gpt2-dropout", "llama"])
def test_recompute_gives_the_same_losses_and_gradients_and_keeps_less(arch, tiny_gpt2):
    """Each layer run again in the backward: bit-equal losses and gradients (dropout's masks
    replayed from the saved RNG state), and fewer bytes saved for the backward."""
    model = tiny_gpt2(dropout=0.1) if arch == "gpt2-dropout" else tiny_llama()
    stacked = _members(model, 2)
    ids, mask = _batch([24, 19])

    def run(recompute: bool):
        leaves = {n: t.clone().requires_grad_() for n, t in stacked.items()}
        weights = {t.untyped_storage().data_ptr() for t in leaves.values()}
        saved = {}

        def pack(t):  # the layers' activations: weights and the loss's logits left out
            key = t.untyped_storage().data_ptr()
            if key not in weights and t.shape[-1:] != (model.config.vocab_size,):
                saved[key] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = stacked_losses(
                model, leaves, ids, mask, training=arch == "gpt2-dropout", recompute=recompute
            )
            before = sum(saved.values())  # by the forward; recomputed layers save later
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return losses, grads, before

    plain, plain_grads, plain_bytes = run(False)
    again, again_grads, again_bytes = run(True)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    for g, w in zip(again_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert again_bytes < plain_bytes / 4, (again_bytes, plain_bytes)


def test_the_swiglu_keeps_two_tensors_and_gives_autograds_gradients():
    from ttt.engine.stacked import _SwiGLU

    torch.manual_seed(3)
    gate, up = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7, requires_grad=True)
    grad = torch.randn(2, 5, 7)

    def kept(fn):
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t), lambda t: t
        ):
            out = fn(gate, up)
        return out, torch.autograd.grad(out, (gate, up), grad), len(saved)

    want, want_grads, eager = kept(lambda g, u: torch.nn.functional.silu(g) * u)
    got, got_grads, fused = kept(_SwiGLU.apply)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert (fused, eager) == (2, 3)  # gate and up; autograd's own keeps silu(gate) too


def _head_reference(h, weight, targets, mask):
    """The head as _Linear and cross-entropy over the whole logits (what _HeadLoss replaces)."""
    from ttt.engine.stacked import _linear

    logits = _linear(h, weight, None)[:, : targets.shape[1]]
    lost = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets, reduction="none"
    )
    return (lost * mask).sum(1) / mask.sum(1).clamp(min=1)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_heads_loss_equals_linear_and_cross_entropy_and_keeps_one_logits_tensor(
    precision, monkeypatch
):
    """Chunked head + loss (three chunks of tokens here, padding and all): the same losses and
    gradients as the head's matmul followed by cross-entropy, under autocast too; of
    logits-sized tensors it keeps one, in the head's dtype, and a tied table's lookup finds
    the head's gradient where _Linear leaves it."""
    from ttt.engine import stacked

    members, width, hidden, vocab = 3, 12, 16, 50
    monkeypatch.setattr(stacked, "_CHUNK_ELEMENTS", members * vocab * 4)  # 4 tokens a chunk
    assert len(stacked._chunks(width - 1, members * vocab)) == 3
    torch.manual_seed(4)
    h0, w0 = torch.randn(members, width, hidden), torch.randn(members, vocab, hidden) / 4
    targets = torch.randint(0, vocab, (members, width - 1))
    mask = torch.ones(members, width - 1)
    mask[1, 7:], mask[2, 2:] = 0, 0  # right padding

    def run(fused: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        tied, saved = stacked._Tied(), []

        def pack(t):
            if t.numel() == members * (width - 1) * vocab:
                saved.append(t.dtype)  # a logits-sized tensor kept for the backward
            return t

        bf16 = precision == "bfloat16"
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            if fused:
                losses = stacked._HeadLoss.apply(h, w, tied, targets, mask)
            else:
                losses = _head_reference(h, w, targets, mask)
        outer = torch.tensor([1.0, 2.0, 0.5])  # each member's loss weighted apart
        gh, gw = torch.autograd.grad((losses * outer).sum(), (h, w))
        return losses, gh, gw, saved, tied.grad

    want, want_h, want_w, eager, _ = run(False)
    got, got_h, got_w, kept, handed = run(True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "float32" else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_h, want_h, **tol)
    torch.testing.assert_close(got_w, want_w, **tol)
    assert handed is got_w  # the tied lookup adds its rows into this very tensor
    head_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert kept == [head_dtype]
    assert len(eager) >= 2 and torch.float32 in eager


def test_the_heads_loss_refuses_a_second_backward():
    """Its saved gradient is scaled in place: a retained graph's second backward would be
    wrong, so it raises instead."""
    from ttt.engine.stacked import _HeadLoss

    h = torch.randn(1, 5, 8, requires_grad=True)
    w = torch.randn(1, 11, 8, requires_grad=True)
    losses = _HeadLoss.apply(h, w, None, torch.randint(0, 11, (1, 4)), torch.ones(1, 4))
    torch.autograd.grad(losses.sum(), (h, w), retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        torch.autograd.grad(losses.sum(), (h, w))

"""GPT-2 and Llama as one batched forward over E members' stacked weights: every operator once.

vmap(grad(functional_call)) dispatches the model's operators once per step but wraps each in
batching rules, falls back to eager attention where SDPA's backward has no batching rule, and
with dropout needs the loop path. Written out with the members as a batch dimension, every
matmul is one bmm/baddbmm over the members, attention is one fused SDPA call for all members
(their heads in its batch), dropout draws independent masks per member, and GPT-2's
`gelu_new` is the same tanh formula as one `gelu(approximate="tanh")`. Equal to the model's
own forward per member (tests/test_engine_stacked.py); only the listed architectures and
options are written out, anything else keeps the vmap path (`unsupported` says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, up to rounding


def unsupported(model: torch.nn.Module) -> str | None:
    """None when `model` has a stacked forward here, else why not (the vmap path runs)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind == "gpt2":
        if config.activation_function not in (*_GELU_TANH, "gelu"):
            return f"GPT-2 activation {config.activation_function!r}"
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, flag, False):
                return f"GPT-2 option {flag}"
        if not getattr(config, "scale_attn_weights", True):
            return "GPT-2 without scaled attention weights"
        return None
    if kind == "llama":
        if config.hidden_act != "silu":
            return f"Llama activation {config.hidden_act!r}"
        if getattr(config, "pretraining_tp", 1) != 1:
            return "Llama pretraining_tp > 1"
        return None
    return f"model type {kind!r} (stacked forwards: gpt2, llama)"


def stacked_losses(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    training: bool,
    recompute: bool = False,
    handoff: bool = True,
) -> torch.Tensor:
    """Each member's mean next-token loss, shape (E,): `weights` maps the model's parameter
    names to (E, *shape) tensors, `ids` is (E, T), `mask` (E, T-1) marks real targets (right
    padding: causal attention keeps every real token exact). `training` turns the model's
    dropout on, with masks drawn independently per member. `recompute`: each layer keeps
    only its input for the backward and runs again there (torch.utils.checkpoint, the RNG
    state replayed: the same dropout masks), one more forward per step for the memory of
    every layer's activations but one. `handoff` False: a tied table's lookup returns a
    gradient of its own that autograd adds to the head's (torch.compile traces that; the
    handoff through a Python object breaks its graph)."""
    h, head, tied = stacked_hidden(model, weights, ids[:, None], training, recompute, handoff)
    return _HeadLoss.apply(h, head, tied, ids[:, 1:], mask)


def stacked_hidden(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    ids: torch.Tensor,
    training: bool,
    recompute: bool,
    handoff: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, _Tied | None]:
    """The last hidden states (E, B * T, H) of `ids` (E, B, T: B windows of T tokens per
    member, each attending within itself), the head's (E, vocabulary, H) weight, and the
    tied table's handoff (None for a head apart, or without `handoff`)."""
    forward: Callable[..., Any] = (
        _gpt2 if model.config.model_type == "gpt2" else _llama  # type: ignore[union-attr]
    )
    # a table is tied when no head apart is given: its gradient waits for the lookup's rows
    tied = _Tied() if handoff and "lm_head.weight" not in weights else None
    h, head = forward(model, weights, ids, training, recompute, tied)
    return h, head, tied


# elements of one chunk of logits (E x tokens x vocabulary) the head's loss holds at a time
_CHUNK_ELEMENTS = 1 << 22
_MAX_CHUNKS = 8  # each chunk costs launches: larger chunks rather than more of them


def _chunks(width: int, row: int, most: int = _MAX_CHUNKS) -> list[tuple[int, int]]:
    """Token ranges covering 0..width, each at most _CHUNK_ELEMENTS / row tokens (row: the
    elements of one token's logits over all members), at most `most` of them."""
    size = max(1, _CHUNK_ELEMENTS // row, math.ceil(width / most))
    return [(a, min(a + size, width)) for a in range(0, width, size)]


class _HeadLoss(torch.autograd.Function):
    """The head (x @ weight.T per member) and each member's mean next-token loss, without
    keeping the logits: chunk by chunk of tokens, the forward computes the logits in the
    head's dtype, each target's loss from them in float32, and the loss's gradient with
    respect to them (softmax - one-hot, times each target's weight in the mean) in the
    head's dtype, then frees them. What the backward needs is that gradient alone; the
    head's own `_Linear` plus cross-entropy kept the logits, their log-softmax and, in the
    backward, two gradients of that size (at 512 tokens and SmolLM2's 49,152-token
    vocabulary, 100 MB each in float32). The backward is _Linear's: two matmuls, the
    weight's gradient laid out as the weight, handed to a tied table's lookup."""

    @staticmethod
    def forward(ctx: Any, h: Any, weight: Any, tied: Any, targets: Any, mask: Any) -> Any:
        dtype = _compute_dtype(h)  # autocast's choice for the head, as _Linear makes it
        members, width = targets.shape
        vocab = weight.shape[1]
        xc, wc = h[:, :width].to(dtype), weight.to(dtype)
        # each target's weight in its member's mean: the gradient of the loss per logit row
        share = mask / mask.sum(1, keepdim=True).clamp(min=1)
        grad = torch.empty((members, width, vocab), dtype=dtype, device=h.device)
        lost = torch.empty((members, width), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for a, b in _chunks(width, members * vocab):
                logits = torch.bmm(xc[:, a:b], wc.transpose(1, 2)).float()
                picked = targets[:, a:b].unsqueeze(-1)
                logp = logits.log_softmax(-1)
                lost[:, a:b] = -logp.gather(-1, picked).squeeze(-1)
                # d(-log p_target)/d logits = softmax - one-hot, weighted per target
                probs = logp.exp_().mul_(share[:, a:b, None])
                probs.scatter_add_(-1, picked, -share[:, a:b, None])
                grad[:, a:b] = probs
        ctx.save_for_backward(xc, wc, grad)
        ctx.tied, ctx.full, ctx.spent = tied, h.shape, False
        ctx.dtypes = (h.dtype, weight.dtype)
        return (lost * mask).sum(1) / mask.sum(1).clamp(min=1)

    @staticmethod
    def backward(ctx: Any, outer: torch.Tensor) -> tuple[Any, Any, None, None, None]:
        if ctx.spent:  # its saved gradient is scaled in place below: once only
            raise RuntimeError("the stacked head's loss backpropagates once (no retain_graph)")
        ctx.spent = True
        xc, wc, grad = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # scaled in place (a second logits-sized tensor is what this function saves)
        grad = grad.mul_(outer.to(grad.dtype)[:, None, None])
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros(ctx.full, dtype=h_dtype, device=grad.device)
            gx[:, : grad.shape[1]] = torch.bmm(grad, wc)  # the last position predicts nothing
        gw = torch.bmm(grad.transpose(1, 2), xc).to(w_dtype)  # (E, vocab, H), contiguous
        if ctx.tied is not None:  # the lookup adds its rows into it (see _Lookup)
            ctx.tied.grad = gw
        return gx, gw, None, None, None


class _Tied:
    """Where the head's gradient of a tied table waits for the lookup's rows: they are added
    into it in place (the table's whole gradient, with no table-sized zeros or sum)."""

    grad: torch.Tensor | None = None


def _embed(table: torch.Tensor, ids: torch.Tensor, tied: _Tied | None = None) -> torch.Tensor:
    """Member e's rows of its own (E, V, H) table: (E, T, H)."""
    return _Lookup.apply(table, ids, tied)


class _Lookup(torch.autograd.Function):
    """table[e, ids[e]] per member. Its backward adds the rows' gradients into the tied
    head's gradient in place when there is one (the head's backward runs first: the lookup
    feeds everything after it), else into a zero table; autograd's own would write a zero
    table and then sum it with the head's, 16 more bytes per table parameter."""

    @staticmethod
    def forward(ctx: Any, table: Any, ids: Any, tied: Any) -> torch.Tensor:
        members = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        ctx.save_for_backward(members, ids)
        ctx.tied, ctx.shape, ctx.dtype = tied, table.shape, table.dtype
        return table[members, ids]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        members, ids = ctx.saved_tensors
        tied = ctx.tied
        if tied is not None and tied.grad is not None:
            into, tied.grad = tied.grad, None  # already the table's gradient in autograd
            into.index_put_((members, ids), grad.to(into.dtype), accumulate=True)
            return None, None, None
        table = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        return table.index_put_((members, ids), grad.to(ctx.dtype), accumulate=True), None, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch.nn.Linear per member: weight (E, out, in)."""
    return _Linear.apply(x, weight, bias)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in here (x's own outside autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _Linear(torch.autograd.Function):
    """x @ weight.T (+ bias) per member, its weight gradient computed as grad.T @ x: laid
    out as the weight is. Autograd's own bmm backward gives it transposed, which Adam's fused
    kernel (it walks memory linearly) would have to copy first: 8 bytes per parameter."""

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> torch.Tensor:
        dtype = _compute_dtype(x)  # autocast's choice, made here as it would for a Linear
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if bias is None:
                return torch.bmm(xc, wc.transpose(1, 2))
            return torch.baddbmm(bias.to(dtype)[:, None, :], xc, wc.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any, Any]:
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(xc.dtype)
        gx = torch.bmm(grad, wc).to(x_dtype) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(grad.transpose(1, 2), xc).to(w_dtype)  # (E, out, in), contiguous
        gb = grad.sum(1).to(b_dtype) if b_dtype is not None else None
        return gx, gw, gb


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward: autograd's own keeps
    silu(gate) as well (a third tensor of the MLP's width: at 512 tokens about 1.4 bytes
    per parameter of SmolLM2); sigmoid(gate) is computed again in the backward instead."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid)), as autograd's silu_backward
        return grad * up * (sig * (1 + gate * (1 - sig))), grad * silu


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D per member: weight (E, in, out)."""
    return torch.baddbmm(bias[:, None, :], x, weight)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Any:
    out = F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(bias[:, None, :], out, weight[:, None, :])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: in float32, then back to the input's dtype, times the weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None, :] * x.to(dtype)


def _heads(x: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """(E, B * T, heads * d) -> (E * B, heads, T, d): each of a member's B windows of T
    tokens attends within itself (B is 1 in training)."""
    return x.view(-1, width, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge(x: torch.Tensor, members: int) -> torch.Tensor:
    """(E * B, heads, T, d) -> (E, B * T, heads * d)."""
    rows, heads, width, d = x.shape
    return x.transpose(1, 2).reshape(members, rows // members * width, heads * d)


def _layers(
    layer: Callable[[torch.Tensor, int], torch.Tensor], h: Any, n: int, recompute: bool
) -> Any:
    """h through layers 0..n-1, each checkpointed when `recompute` (see stacked_losses)."""
    for i in range(n):
        if recompute:
            h = checkpoint(layer, h, i, use_reentrant=False, preserve_rng_state=True)
        else:
            h = layer(h, i)
    return h


def _gpt2(
    model: Any,
    w: dict[str, torch.Tensor],
    ids: torch.Tensor,
    training: bool,
    recompute: bool,
    tied: _Tied | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    p = "transformer."
    heads, eps = config.n_head, config.layer_norm_epsilon
    members, windows, width = ids.shape
    drop = config.resid_pdrop if training else 0.0
    h = _embed(w[p + "wte.weight"], ids.view(members, -1), tied)
    h = (h.view(members, windows, width, -1) + w[p + "wpe.weight"][:, None, :width]).flatten(1, 2)
    h = F.dropout(h, config.embd_pdrop, training=training)
    approximate = "none" if config.activation_function == "gelu" else "tanh"

    def layer(h: torch.Tensor, i: int) -> torch.Tensor:
        b = f"{p}h.{i}."
        x = _layer_norm(h, w[b + "ln_1.weight"], w[b + "ln_1.bias"], eps)
        q, k, v = _conv1d(x, w[b + "attn.c_attn.weight"], w[b + "attn.c_attn.bias"]).split(
            config.n_embd, dim=2
        )
        a = F.scaled_dot_product_attention(
            _heads(q, heads, width),
            _heads(k, heads, width),
            _heads(v, heads, width),
            dropout_p=config.attn_pdrop if training else 0.0,
            is_causal=True,
        )
        a = _conv1d(_merge(a, members), w[b + "attn.c_proj.weight"], w[b + "attn.c_proj.bias"])
        h = h + F.dropout(a, drop, training=training)
        x = _layer_norm(h, w[b + "ln_2.weight"], w[b + "ln_2.bias"], eps)
        x = _conv1d(x, w[b + "mlp.c_fc.weight"], w[b + "mlp.c_fc.bias"])
        x = F.gelu(x, approximate=approximate)
        x = _conv1d(x, w[b + "mlp.c_proj.weight"], w[b + "mlp.c_proj.bias"])
        return h + F.dropout(x, drop, training=training)

    h = _layers(layer, h, config.n_layer, recompute)
    h = _layer_norm(h, w[p + "ln_f.weight"], w[p + "ln_f.bias"], eps)
    head = w.get("lm_head.weight", w[p + "wte.weight"])  # tied unless given apart
    return h, head


def _llama(
    model: Any,
    w: dict[str, torch.Tensor],
    ids: torch.Tensor,
    training: bool,
    recompute: bool,
    tied: _Tied | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    eps = config.rms_norm_eps
    p = "model."
    members, _, width = ids.shape
    h = _embed(w[p + "embed_tokens.weight"], ids.view(members, -1), tied)
    positions = torch.arange(width, device=ids.device)[None]
    cos, sin = model.model.rotary_emb(h, positions)  # the model's own (scaling included)
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scale = 1.0 / math.sqrt(dim)
    dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0) if training else 0.0

    def layer(h: torch.Tensor, i: int) -> torch.Tensor:
        b = f"{p}layers.{i}."
        x = _rms_norm(h, w[b + "input_layernorm.weight"], eps)
        q, k, v = (
            _heads(_linear(x, w[f"{b}self_attn.{n}_proj.weight"], w.get(f"{b}self_attn.{n}_proj.bias")), n_heads, width)
            for n, n_heads in (("q", heads), ("k", kv), ("v", kv))
        )  # fmt: skip
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        a = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=kv != heads
        )
        h = h + _linear(
            _merge(a, members), w[b + "self_attn.o_proj.weight"], w.get(b + "self_attn.o_proj.bias")
        )
        x = _rms_norm(h, w[b + "post_attention_layernorm.weight"], eps)
        gate = _linear(x, w[b + "mlp.gate_proj.weight"], w.get(b + "mlp.gate_proj.bias"))
        up = _linear(x, w[b + "mlp.up_proj.weight"], w.get(b + "mlp.up_proj.bias"))
        return h + _linear(
            _SwiGLU.apply(gate, up), w[b + "mlp.down_proj.weight"], w.get(b + "mlp.down_proj.bias")
        )

    h = _layers(layer, h, config.num_hidden_layers, recompute)
    h = _rms_norm(h, w[p + "norm.weight"], eps)
    head = w.get("lm_head.weight", w[p + "embed_tokens.weight"])  # tied unless given apart
    return h, head

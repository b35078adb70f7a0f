"""One training step of every active member: batched (stacked, vmap) or member after member."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ttt.engine.adam import clip_scales
from ttt.engine.attention import training_attention
from ttt.engine.kernels import fused_activations
from ttt.engine.members import rng_state, set_rng_state
from ttt.engine.stacked import stacked_losses

log = logging.getLogger(__name__)


class MemberSteps:
    """EnsembleTTT's step: needs its model, names, shapes, sizes, members, path, precision,
    device, dropout, eager_attention, wave, stacked and train_views, adam, spec, compile
    and losses (stacked_losses, or its compiled form)."""

    model: Any
    names: list[str]
    members: int
    path: str
    precision: Any
    device: torch.device
    dropout: bool
    eager_attention: bool | None
    wave: int
    stacked: list[torch.Tensor]
    train_views: list[torch.Tensor]
    compile: bool = False
    losses: Any = staticmethod(stacked_losses)
    adam: Any
    spec: Any

    def _loss(
        self, tensors: Any, ids: torch.Tensor, mask: torch.Tensor, causal: Any = None
    ) -> torch.Tensor:
        """Mean next-token loss of one member on one chunk, its weights one tensor per
        parameter; `mask` marks the real targets, `causal` is eager attention's additive
        causal mask (else none is built)."""
        params = dict(zip(self.names, tensors, strict=True))
        with self.precision.context():
            # no cache (training_attention builds no mask either): no host values per forward
            kwargs = {"input_ids": ids[None], "use_cache": False}
            if causal is not None:  # 4-D: transformers takes it as it is
                kwargs["attention_mask"] = causal
            out = functional_call(self.model, params, (), kwargs)
        # one fused log-softmax and pick (no float32 log-probabilities of its own)
        lost = F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="none")
        return (lost * mask).sum() / mask.sum().clamp(min=1)

    def inputs(self, chunks: list[list[int] | None]) -> list[Any]:
        """A step's token ids and target masks on the device, one (ids, mask) per member
        (None where idle; on the vmap path one stacked pair for all), built from the host's
        token lists before the step, as pinned copies that queue without a sync."""
        if self.path in ("vmap", "stacked"):
            width = max(len(c) for c in chunks if c is not None)
            if self.compile:  # one shape: the compiled step is specialized to it
                width = max(width, int(self.spec.max_length))
            ids = torch.zeros((self.members, width), dtype=torch.long)
            mask = torch.zeros((self.members, width - 1))
            for e, chunk in enumerate(chunks):
                if chunk is not None:  # right padding: causal attention keeps real tokens exact
                    ids[e, : len(chunk)] = torch.tensor(chunk)
                    mask[e, : len(chunk) - 1] = 1
            causal = None
            if self.eager_attention and self.path == "vmap":  # built here, not in the forward
                causal = self._causal(width)
            return [(self._to_device(ids), self._to_device(mask), causal)]
        return [
            None
            if chunk is None
            else (
                self._to_device(torch.tensor(chunk)),
                torch.ones(len(chunk) - 1, device=self.device),
            )
            for chunk in chunks
        ]

    def train_step(self, inputs: list[Any], slots: list[Any]) -> torch.Tensor:
        """One step of every active member on `inputs`: gradients, each row clipped, Adam(W).
        Nothing in it reads a value back to the host or builds a tensor from host values
        (ttt.engine.profile counts it); returns the members' losses, on the device."""
        active = [m is not None for m in slots]
        self.model.train()  # as the sequential loop: dropout on while training, if configured
        try:
            if self.path in ("stacked", "vmap"):
                grads, losses = self._grads_batched(*inputs[0], active)
            else:
                grads, losses = self._grads_loop(inputs, slots)
        finally:
            self.model.eval()
        rows = [grads[e] for e, on in enumerate(active) if on]
        # clipping as a divisor inside Adam's kernel: one norm pass, no scaled copy
        self.adam.step(grads, active, clip_scales(rows, self.spec.grad_clip))
        return losses

    def _grads_batched(
        self, ids: Any, mask: Any, causal: Any, active: list[bool]
    ) -> tuple[list[Any], list[Any]]:
        """Every active member's gradient and loss, `self.wave` members per batched call (a
        wave of idle members is skipped). Out of memory: the wave is halved and the step
        retried from its start (nothing is updated before every gradient is in), down to
        one member per call; E, the members' weights and their optimizers stay as they are."""
        while True:
            try:
                return self._waves(ids, mask, causal, active)
            except torch.OutOfMemoryError:
                if self.wave == 1:
                    raise
                tried, self.wave = self.wave, max(1, self.wave // 2)
                log.warning(
                    "out of memory with %d members per batched call: retrying the step with %d",
                    tried,
                    self.wave,
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _waves(
        self, ids: Any, mask: Any, causal: Any, active: list[bool]
    ) -> tuple[list[Any], list[Any]]:
        grads: list[Any] = [None] * self.members
        losses: list[Any] = [None] * self.members
        for a in range(0, self.members, self.wave):
            b = min(a + self.wave, self.members)
            if not any(active[a:b]):
                continue
            weights = [w[a:b] for w in self.train_views]
            if self.path == "stacked":
                got, lost = self._grads_stacked(weights, ids[a:b], mask[a:b])
            else:
                got, lost = self._grads_vmap(weights, ids[a:b], mask[a:b], causal)
            # member e's gradient: its slice of each parameter's (wave, *shape) gradient
            for i in range(b - a):
                grads[a + i], losses[a + i] = [g[i] for g in got], lost[i]
        return grads, losses

    def _grads_stacked(self, weights: list[Any], ids: Any, mask: Any) -> tuple[Any, Any]:
        """Members in one batched forward and backward (ttt.engine.stacked): each operator
        once for all, attention one fused call, dropout masks drawn per member."""
        leaves = [w.detach().requires_grad_() for w in weights]
        with self.precision.context():
            losses = self.losses(
                self.model,
                dict(zip(self.names, leaves, strict=True)),
                ids,
                mask,
                training=self.dropout,
                recompute=self.recompute,
                handoff=not self.compile,  # compiled: one graph, autograd sums a tied table's
            )
        # members are independent: the sum's gradient is each member's own
        return torch.autograd.grad(losses.sum(), leaves), losses.detach()

    def _causal(self, width: int) -> torch.Tensor:
        """Eager attention's additive causal mask, built from no host value."""
        low = torch.finfo(torch.float32).min
        return torch.full((width, width), low, device=self.device).triu(1)[None, None]

    def _grads_vmap(self, weights: list[Any], ids: Any, mask: Any, causal: Any) -> Any:
        randomness = "different" if self.dropout else "error"
        step = vmap(grad_and_value(self._loss), (0, 0, 0, None), randomness=randomness)
        if self.eager_attention and causal is None:  # turned eager by this step's first wave
            causal = self._causal(ids.shape[1])
        if self.eager_attention is not None:
            with (
                training_attention(self.model, eager=self.eager_attention),
                fused_activations(self.model),
            ):
                return step(weights, ids, mask, causal)
        # first step with the model's own attention: if PyTorch falls back to a per-member
        # loop for a kernel without a batching rule (it warns), later steps run eager
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with training_attention(self.model, eager=False):
                found = step(weights, ids, mask, None)
        slow = [w for w in caught if "batching rule" in str(w.message)]
        self.eager_attention = bool(slow)
        if slow:
            log.info("vmap path: %s; eager attention from now on", str(slow[0].message)[:120])
        return found

    def _grads_loop(self, inputs: list[Any], slots: list[Any]) -> tuple[Any, Any]:
        """Member after member, each row's gradient as grad returns it (no stacked copy)."""
        grads: list[torch.Tensor | None] = [None] * self.members
        losses: list[torch.Tensor | None] = [None] * self.members
        with training_attention(self.model, eager=False), fused_activations(self.model):
            for e, given in enumerate(inputs):
                member = slots[e]
                if given is None or member is None:
                    continue
                if member.rng:
                    set_rng_state(member.rng, self.device)
                pieces = self.adam.pieces(e)[0]  # member e's weights, per parameter
                grads[e], losses[e] = grad_and_value(self._loss)(pieces, *given)
                if member.rng:
                    member.rng = rng_state(self.device)
        return grads, losses

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a host sync: from pageable memory a CUDA copy
        waits for the stream, from pinned memory it is queued like a kernel."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

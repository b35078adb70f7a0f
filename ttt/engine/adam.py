"""One elementwise Adam(W) over stacked member weights: exactly E independent optimizers."""

from __future__ import annotations

import torch


class StackedAdam:
    """Adam or AdamW over an (E, P) float32 weight matrix, one row per ensemble member.

    Adam is elementwise, so one update over the stacked rows is E independent optimizers as
    long as each row keeps its own step count (bias correction) and an idle row is left
    alone: `step(grads, active)` updates only the rows where `active` is true. The update is
    torch.optim.Adam's single-tensor algorithm, written over rows; the host knows every step
    count, so no value ever travels back from the device.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        if weights.dim() != 2 or weights.dtype != torch.float32:
            raise ValueError("StackedAdam needs (members, parameters) float32 master weights")
        self.weights = weights
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.exp_avg = torch.zeros_like(weights)
        self.exp_avg_sq = torch.zeros_like(weights)
        self.steps = [0] * weights.shape[0]

    def reset(self, member: int) -> None:
        """A fresh optimizer for one member (its next document)."""
        self.exp_avg[member].zero_()
        self.exp_avg_sq[member].zero_()
        self.steps[member] = 0

    def _column(self, values: list[float]) -> torch.Tensor:
        # one small host-to-device copy per step; never a device-to-host one
        return torch.tensor(values, dtype=torch.float32).to(self.weights.device, non_blocking=True)[
            :, None
        ]

    @torch.no_grad()
    def step(self, grads: torch.Tensor, active: list[bool]) -> None:
        """One Adam(W) step for every active row; `grads` is (E, P), idle rows are ignored."""
        beta1, beta2 = self.betas
        for e, on in enumerate(active):
            self.steps[e] += int(on)
        on = self._column([float(a) for a in active])
        w = self.weights
        if self.weight_decay and self.decoupled:  # AdamW: shrink the weights first
            w.mul_(1 - on * (self.lr * self.weight_decay))
        elif self.weight_decay:  # Adam's L2 term joins the gradient
            grads = grads.add(w, alpha=self.weight_decay)
        grads = grads * on  # idle rows: a zero gradient, and their moments are kept below
        self.exp_avg.lerp_(grads, on * (1 - beta1))
        self.exp_avg_sq.mul_(1 - on * (1 - beta2)).addcmul_(grads, grads, value=1 - beta2)
        step_size, bias2_sqrt = [], []
        for e, a in enumerate(active):
            s = max(self.steps[e], 1)
            step_size.append(self.lr / (1 - beta1**s) if a else 0.0)
            bias2_sqrt.append((1 - beta2**s) ** 0.5)
        denom = (self.exp_avg_sq.sqrt() / self._column(bias2_sqrt)).add_(self.eps)
        w.sub_(self.exp_avg / denom * self._column(step_size))


def clip_rows(grads: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Per-member gradient clipping: each row scaled as clip_grad_norm_ scales one model's."""
    if max_norm is None:
        return grads
    norms = torch.linalg.vector_norm(grads, dim=1, keepdim=True)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s epsilon and clamp
    return grads * coef

"""One elementwise Adam(W) over stacked member weights: exactly E independent optimizers."""

from __future__ import annotations

import torch


class StackedAdam:
    """Adam or AdamW over an (E, P) float32 weight matrix, one row per ensemble member.

    Adam is elementwise, so one update over the stacked rows is E independent optimizers as
    long as each row keeps its own step count (bias correction) and an idle row is left
    alone: `step(grads, active)` updates only the rows where `active` is true. Nothing
    travels back from the device.
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
        self.steps = [0] * weights.shape[0]  # on the host, for the record
        # the kernel's own step counters (float32 scalars on the device, as torch keeps them)
        self._steps = [torch.zeros((), device=weights.device) for _ in range(weights.shape[0])]

    def reset(self, member: int) -> None:
        """A fresh optimizer for one member (its next document)."""
        self.exp_avg[member].zero_()
        self.exp_avg_sq[member].zero_()
        self.steps[member] = 0
        self._steps[member].zero_()

    @torch.no_grad()
    def step(self, grads: torch.Tensor, active: list[bool]) -> None:
        """One Adam(W) step for every active row; `grads` is (E, P), idle rows are ignored.

        torch's fused Adam kernel (one pass over the weights, several rows per launch) over
        the active rows, each row its own "parameter" with its own step counter: exactly
        what torch.optim.Adam(fused=True) does for E separate models.
        """
        rows = [e for e, on in enumerate(active) if on]
        if not rows:
            return
        steps = [self._steps[e] for e in rows]
        torch._foreach_add_(steps, 1)
        for e in rows:
            self.steps[e] += 1
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        kernel(
            [self.weights[e] for e in rows],
            [grads[e] for e in rows],
            [self.exp_avg[e] for e in rows],
            [self.exp_avg_sq[e] for e in rows],
            [],
            steps,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )


def clip_rows(grads: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Per-member gradient clipping: each row scaled as clip_grad_norm_ scales one model's."""
    if max_norm is None:
        return grads
    norms = torch.linalg.vector_norm(grads, dim=1, keepdim=True)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s epsilon and clamp
    return grads * coef

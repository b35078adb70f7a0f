"""One elementwise Adam(W) over stacked member weights: exactly E independent optimizers."""

from __future__ import annotations

from typing import Any

import torch


class StackedAdam:
    """Adam or AdamW over an (E, P) float32 weight matrix, one row per ensemble member.

    Adam is elementwise, so one update over the stacked rows is E independent optimizers as
    long as each row keeps its own step count (bias correction) and an idle row is left
    alone: `step(grads, active)` updates only the rows where `active` is true. Nothing
    travels back from the device.

    `copies` (one flag per parameter, with `shapes`) keeps a bf16 copy of those parameters
    that the forward reads instead of casting the weights; `fused` (ttt.engine.compiled's
    compiled adam_member) then runs the step and writes the copy in the same pass.
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
        shapes: list[torch.Size] | None = None,
        copies: list[bool] | None = None,
        fused: Any = None,
    ) -> None:
        if weights.dim() != 2 or weights.dtype != torch.float32:
            raise ValueError("StackedAdam needs (members, parameters) float32 master weights")
        self.weights = weights
        # the model's parameter shapes, when gradients come per parameter (no flat row to cat)
        self.shapes = list(shapes) if shapes is not None else None
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.exp_avg = torch.zeros_like(weights)
        self.exp_avg_sq = torch.zeros_like(weights)
        self.steps = [0] * weights.shape[0]  # on the host, for the record
        # the kernel's own step counters (float32 scalars on the device, as torch keeps them)
        self._steps = [torch.zeros((), device=weights.device) for _ in range(weights.shape[0])]
        self._pieces: dict[int, tuple[list, list, list]] = {}
        self.fused = fused
        self.copied = list(copies) if copies is not None and any(copies) else None
        self.copy: torch.Tensor | None = None
        self._copies: dict[int, list[torch.Tensor | None]] = {}
        if self.copied is not None:
            assert self.shapes is not None and fused is not None
            self._copy_sizes = [
                s.numel() for s, c in zip(self.shapes, self.copied, strict=True) if c
            ]
            self.copy = torch.empty(
                (weights.shape[0], sum(self._copy_sizes)),
                dtype=torch.bfloat16,
                device=weights.device,
            )
            for member in range(weights.shape[0]):
                self.refresh(member)

    def pieces(self, member: int) -> tuple[list, list, list]:
        """Member `member`'s weights and moments as per-parameter views (made once)."""
        if member not in self._pieces:
            assert self.shapes is not None
            sizes = [s.numel() for s in self.shapes]
            self._pieces[member] = tuple(  # type: ignore[assignment]
                [v.view(s) for v, s in zip(t[member].split(sizes), self.shapes, strict=True)]
                for t in (self.weights, self.exp_avg, self.exp_avg_sq)
            )
        return self._pieces[member]

    def copies(self, member: int) -> list[torch.Tensor | None]:
        """Member `member`'s bf16 copy per parameter (None where a parameter has none)."""
        if member not in self._copies:
            assert self.copy is not None
            views = iter(self.copy[member].split(self._copy_sizes))
            self._copies[member] = [
                next(views).view(s) if c else None
                for s, c in zip(self.shapes or [], self.copied or [], strict=True)
            ]
        return self._copies[member]

    def stacked_copies(self) -> list[torch.Tensor | None]:
        """The copies per parameter as (E, *shape) views (None where a parameter has none)."""
        assert self.copy is not None
        views = iter(self.copy.split(self._copy_sizes, dim=1))
        return [
            next(views).view(self.copy.shape[0], *s) if c else None
            for s, c in zip(self.shapes or [], self.copied or [], strict=True)
        ]

    @torch.no_grad()
    def refresh(self, member: int) -> None:
        """Member `member`'s bf16 copy from its weights (after they were set from outside)."""
        if self.copy is None:
            return
        for w, copy in zip(self.pieces(member)[0], self.copies(member), strict=True):
            if copy is not None:
                copy.copy_(w)

    def reset(self, member: int) -> None:
        """A fresh optimizer for one member (its next document)."""
        self.exp_avg[member].zero_()
        self.exp_avg_sq[member].zero_()
        self.steps[member] = 0
        self._steps[member].zero_()

    @torch.no_grad()
    def step(
        self, grads: Any, active: list[bool], grad_scales: list[torch.Tensor] | None = None
    ) -> None:
        """One Adam(W) step for every active row; `grads[e]` is member e's gradient: a row (of
        an (E, P) tensor or a list) or, with `shapes`, a list of per-parameter gradients (as
        autograd returns them: no flat copy). Idle rows are ignored; `grad_scales` (one per
        active row, clip_scales') divide each row's gradient inside the kernel.

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
        if self.fused is not None:  # the compiled step: one pass, the bf16 copy written in it
            scales = grad_scales if grad_scales is not None else [None] * len(rows)
            for e, count, scale in zip(rows, steps, scales, strict=True):
                w, m, v = self.pieces(e)
                self.fused(
                    w, list(grads[e]), m, v, self.copies(e) if self.copy is not None
                    else [None] * len(w), count, scale,
                    lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                    weight_decay=self.weight_decay, decoupled=self.decoupled,
                )  # fmt: skip
            return
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        options = {
            "lr": self.lr,
            "beta1": self.betas[0],
            "beta2": self.betas[1],
            "weight_decay": self.weight_decay,
            "eps": self.eps,
            "amsgrad": False,
            "maximize": False,
        }

        def update(of: list[int], **scale: Any) -> None:
            weights, moments, squares, given, counts = [], [], [], [], []
            for e in of:
                if isinstance(grads[e], torch.Tensor):  # one flat row
                    pieces = ([self.weights[e]], [self.exp_avg[e]], [self.exp_avg_sq[e]])
                    gs = [grads[e]]
                else:
                    pieces = self.pieces(e)
                    # the fused kernel walks memory linearly, whatever the strides: a member's
                    # slice of a batched gradient whose member dimension is not outermost
                    # (vmap's for a position embedding) is made contiguous first
                    gs = [g if g.is_contiguous() else g.contiguous() for g in grads[e]]
                weights += pieces[0]
                moments += pieces[1]
                squares += pieces[2]
                given += gs
                counts += [steps[rows.index(e)]] * len(gs)  # the row's one step counter
            kernel(weights, given, moments, squares, [], counts, **options, **scale)

        if grad_scales is None:
            update(rows)
        else:  # each row divided by its own scale inside the kernel: no pass of its own
            for e, scale in zip(rows, grad_scales, strict=True):
                update([e], grad_scale=scale)


def clip_rows(rows: Any, max_norm: float | None) -> Any:
    """Per-member gradient clipping, in place: each row (of an (E, P) tensor, or a list of
    rows) scaled as clip_grad_norm_ scales one model's gradient. One norm pass, one scale;
    nothing read back to the host."""
    if max_norm is None:
        return rows
    listed = list(rows)
    if not listed:
        return rows
    norms = torch._foreach_norm(listed)
    for row, norm in zip(listed, norms, strict=True):
        row.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))  # clip_grad_norm_'s epsilon, clamp
    return rows


def clip_scales(rows: list[Any], max_norm: float | None) -> list[torch.Tensor] | None:
    """clip_grad_norm_ as a divisor per row, for StackedAdam.step's grad_scales: the row's
    norm over max_norm (with its epsilon), at least 1. A row is one tensor or a list of
    per-parameter gradients (clip_grad_norm_'s own way: the norm of the pieces' norms).
    One norm pass; nothing is written."""
    if max_norm is None or not rows:
        return None
    # in float32 whatever the gradients' dtype (a bf16 gradient's norm rounded to bf16 would
    # move the clip factor by up to 0.4 %: autocast's float32 gradients do not)
    if isinstance(rows[0], torch.Tensor):
        norms = torch._foreach_norm(rows, 2, dtype=torch.float32)
    else:
        norms = [
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(r, 2, dtype=torch.float32)))
            for r in rows
        ]
    scales = torch._foreach_add(norms, 1e-6)
    torch._foreach_div_(scales, max_norm)
    torch._foreach_clamp_min_(scales, 1.0)
    return scales


def row_state_dict(
    adam: StackedAdam, member: int, shapes: list[torch.Size], param_groups: list[dict]
) -> dict:
    """One member's optimizer as torch.optim.Adam(W).state_dict() gives it for one model
    (per parameter: step, exp_avg, exp_avg_sq, on the CPU), so that a state saved by the
    ensemble resumes in the sequential loop and the other way round."""
    steps = adam.steps[member]
    if steps == 0:
        return {"state": {}, "param_groups": param_groups}
    sizes = [s.numel() for s in shapes]
    moments = zip(
        adam.exp_avg[member].split(sizes), adam.exp_avg_sq[member].split(sizes), strict=True
    )
    state = {
        i: {
            "step": torch.tensor(float(steps)),
            "exp_avg": m.view(shape).cpu().clone(),
            "exp_avg_sq": v.view(shape).cpu().clone(),
        }
        for i, ((m, v), shape) in enumerate(zip(moments, shapes, strict=True))
    }
    return {"state": state, "param_groups": param_groups}


def load_row_state_dict(adam: StackedAdam, member: int, state_dict: dict, sizes: list[int]) -> None:
    """Set one member's optimizer row from a torch Adam(W) state_dict (row_state_dict's, or
    the sequential loop's); an empty state is a fresh optimizer."""
    adam.reset(member)
    state = state_dict.get("state", {})
    if not state:
        return
    if sorted(state) != list(range(len(sizes))):
        raise ValueError(
            f"optimizer state has {len(state)} parameters, the model {len(sizes)} trainable ones"
        )
    steps = {float(s["step"]) for s in state.values()}
    if len(steps) != 1:
        raise ValueError(f"optimizer state: parameters at different steps {sorted(steps)}")
    with torch.no_grad():
        for name, target in (("exp_avg", adam.exp_avg), ("exp_avg_sq", adam.exp_avg_sq)):
            flat = torch.cat([state[i][name].reshape(-1) for i in range(len(sizes))])
            if flat.numel() != sum(sizes):
                raise ValueError(f"optimizer state: {name} has {flat.numel()} values, "
                                 f"the model {sum(sizes)} parameters")  # fmt: skip
            target[member].copy_(flat.to(target.device, target.dtype))
    step = int(steps.pop())
    adam.steps[member] = step
    adam._steps[member].fill_(step)

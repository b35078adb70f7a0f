"""StackedAdam over (E, P) rows is E independent torch optimizers; clip_rows is clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch

from ttt.engine.adam import StackedAdam, clip_rows, clip_scales


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_one_stacked_adam_is_independent_optimizers_with_their_own_start_and_idle_steps(kind):
    torch.manual_seed(0)
    members, size = 3, 50
    start = torch.randn(members, size)
    weights = start.clone()
    stacked = StackedAdam(weights, lr=1e-2, eps=1e-8, weight_decay=0.05, decoupled=kind == "adamw")
    optimizer = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    params = [torch.nn.Parameter(start[e].clone()) for e in range(members)]
    torch_opts = [optimizer([p], lr=1e-2, eps=1e-8, weight_decay=0.05) for p in params]
    # member 1 idles at steps 2 and 3, member 2 is refilled (fresh optimizer) at step 4
    schedule = [[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]]
    for i, active in enumerate(schedule):
        if i == 4:
            stacked.reset(2)
            torch_opts[2] = optimizer([params[2]], lr=1e-2, eps=1e-8, weight_decay=0.05)
        grads = torch.randn(members, size)
        stacked.step(grads, [bool(a) for a in active])
        for e, on in enumerate(active):
            if on:
                params[e].grad = grads[e].clone()
                torch_opts[e].step()
    for e in range(members):
        torch.testing.assert_close(weights[e], params[e].detach(), rtol=1e-6, atol=1e-7)
    assert stacked.steps == [6, 4, 2]


def test_clip_rows_scales_each_member_as_clip_grad_norm():
    torch.manual_seed(1)
    grads = torch.randn(4, 30) * torch.tensor([[0.01], [1.0], [5.0], [100.0]])
    clipped = clip_rows(grads.clone(), 1.0)
    rows = [g.clone() for g in grads]
    assert clip_rows(rows, 1.0) is rows  # a list of rows too, each scaled in place
    torch.testing.assert_close(torch.stack(rows), clipped, rtol=0, atol=0)
    for e in range(4):
        p = torch.nn.Parameter(torch.zeros(30))
        p.grad = grads[e].clone()
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        torch.testing.assert_close(clipped[e], p.grad, rtol=1e-6, atol=0)
    assert torch.equal(clip_rows(grads, None), grads)


def test_clip_scales_inside_adams_kernel_equal_clipping_first():
    torch.manual_seed(2)
    grads = torch.randn(3, 40) * torch.tensor([[0.01], [1.0], [50.0]])
    weights = torch.randn(3, 40)
    clipped, scaled = StackedAdam(weights.clone(), lr=1e-2), StackedAdam(weights.clone(), lr=1e-2)
    active = [True, False, True]
    for _ in range(3):
        clipped.step(clip_rows(grads.clone(), 1.0), active)
        rows = [grads[e].clone() for e in (0, 2)]
        scaled.step({0: rows[0], 2: rows[1]}, active, clip_scales(rows, 1.0))
    torch.testing.assert_close(scaled.weights, clipped.weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(scaled.weights[1], weights[1])  # the idle row untouched
    assert scaled.steps == [3, 0, 3]
    assert clip_scales([], 1.0) is None and clip_scales(list(grads), None) is None


def test_per_parameter_gradients_clipped_in_the_kernel_equal_torchs_adamw_per_model():
    """Gradients handed per parameter, as autograd returns them (no flat row), one of them
    a member's slice of a batched gradient whose member dimension is not outermost (vmap's
    for GPT-2's position embedding): each member is still torch's AdamW after
    clip_grad_norm_ on its own model."""
    torch.manual_seed(3)
    shapes = [torch.Size([4, 3]), torch.Size([5]), torch.Size([2, 6])]
    sizes = [s.numel() for s in shapes]
    members = 2
    start = torch.randn(members, sum(sizes))
    stacked = StackedAdam(start.clone(), lr=1e-2, weight_decay=0.1, decoupled=True, shapes=shapes)
    models = [
        [torch.nn.Parameter(p.view(s).clone()) for p, s in zip(start[e].split(sizes), shapes)]
        for e in range(members)
    ]
    opts = [torch.optim.AdamW(m, lr=1e-2, weight_decay=0.1) for m in models]
    for step in range(3):
        # (members, *shape) gradients; the last one laid out member-innermost
        batched = [torch.randn(members, *s) * (10.0 if step == 1 else 0.1) for s in shapes]
        batched[-1] = torch.randn(*shapes[-1], members).movedim(-1, 0)
        assert not batched[-1][0].is_contiguous()
        given = [g.clone() for g in batched]  # the kernel writes the clipped gradient back
        rows = [[g[e] for g in given] for e in range(members)]
        stacked.step(rows, [True, True], clip_scales(rows, 1.0))
        for e in range(members):
            for p, g in zip(models[e], batched, strict=True):
                p.grad = g[e].clone()
            torch.nn.utils.clip_grad_norm_(models[e], 1.0)
            opts[e].step()
    for e in range(members):
        want = torch.cat([p.detach().reshape(-1) for p in models[e]])
        torch.testing.assert_close(stacked.weights[e], want, rtol=1e-6, atol=1e-7)

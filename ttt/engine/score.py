"""Several members' documents scored at once through the stacked forward, as ttt.bpb scores one.

The sequential loop's scoring runs the model's own forward on one document's rolling windows
(ttt.bpb.score_document); members due for scoring at the same time would each wait for the
others' passes. Here their windows go through one stacked forward with each member's own
weights: the same windows (ttt.bpb.document_windows), log-softmax in float32, sums in float64
on the device and one read-back for all; equal to score_document per member up to the
rounding of other kernels (tests/test_engine_score.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ttt.engine.stacked import _chunks, _linear, stacked_hidden

Windows = list[tuple[list[int], list[int]]]
_MOST_CHUNKS = 64  # of the head's logits per call: larger chunks rather than more launches


def stacked_logliks(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    windows: list[Windows],
    batch_tokens: int,
) -> list[float]:
    """Each member's sum of log p(target | context) over its `windows`; `weights` maps the
    model's parameter names to (E, *shape) tensors, `windows[e]` are member e's. Per call, b
    windows of every member, right-padded to the longest input (causal attention keeps real
    tokens exact), E * b * T <= batch_tokens (at least one window each)."""
    first = next(iter(weights.values()))
    device, members = first.device, first.shape[0]
    if len(windows) != members:
        raise ValueError(f"{len(windows)} members' windows for {members} members' weights")
    total = torch.zeros(members, dtype=torch.float64, device=device)
    inputs = [[(c + t)[:-1] for c, t in given] for given in windows]
    width = max((len(i) for given in inputs for i in given), default=0)
    most = max(len(given) for given in inputs)
    per_call = max(1, batch_tokens // max(1, members * width))
    with torch.no_grad():
        for a in range(0, most, per_call):
            b = min(a + per_call, most)
            ids, at, targets, real = _batch(inputs, windows, a, b, width)
            h, head, _ = stacked_hidden(model, weights, ids.to(device), False, False)
            picked = h.gather(1, at.to(device)[..., None].expand(-1, -1, h.shape[-1]))
            total += _logprob_sums(picked, head, targets.to(device), real.to(device))
    return total.tolist()  # the one read-back


def _batch(
    inputs: list[list[list[int]]], windows: list[Windows], a: int, b: int, width: int
) -> tuple[torch.Tensor, ...]:
    """Windows a..b-1 of every member as (E, b - a, width) ids, and per member the flat
    positions whose logits predict a target, those targets, and which of them are real."""
    members = len(inputs)
    ids = torch.zeros((members, b - a, width), dtype=torch.long)
    at: list[list[int]] = [[] for _ in range(members)]
    targets: list[list[int]] = [[] for _ in range(members)]
    for e in range(members):
        for j, (given, (_, target)) in enumerate(zip(inputs[e][a:b], windows[e][a:b])):
            ids[e, j, : len(given)] = torch.tensor(given)
            start = j * width + len(given) - len(target)  # the last len(target) positions
            at[e].extend(range(start, start + len(target)))
            targets[e].extend(target)
    most = max(1, max(len(t) for t in targets))
    real = torch.zeros((members, most))
    for e in range(members):
        real[e, : len(targets[e])] = 1
        at[e] += [0] * (most - len(at[e]))  # padding: any position, not counted
        targets[e] += [0] * (most - len(targets[e]))
    return ids, torch.tensor(at), torch.tensor(targets), real


def _logprob_sums(h: Any, head: Any, targets: Any, real: Any) -> torch.Tensor:
    """Per member, the sum over real targets of log p(target): the head chunk by chunk (its
    logits are the largest tensor), log-softmax in float32, sums in float64."""
    members, count, _ = h.shape
    sums = torch.zeros(members, dtype=torch.float64, device=h.device)
    for a, b in _chunks(count, members * head.shape[1], most=_MOST_CHUNKS):
        logp = _linear(h[:, a:b], head, None).float().log_softmax(-1)
        picked = logp.gather(-1, targets[:, a:b, None]).squeeze(-1)
        sums += (picked.double() * real[:, a:b]).sum(1)
    return sums

"""The paper's baselines that condition on neighbors without training: in-context, interpolation.

Both score the text at every evalAfter entry n from the first n neighbors (nearest first),
with the weights untouched. Dynamic evaluation, the third baseline, trains, so it lives in
TTTNN's loop (ttt.train).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ttt.bpb import (
    DocScore,
    count_bytes,
    count_words,
    score_document,
    score_in_one_window,
    token_logprobs,
)
from ttt.outcome import DocOutcome, checkpoint


class Scorer(Protocol):
    """What a baseline needs of the model it scores with (TTTNN provides it all)."""

    model: Any
    tokenizer: Any
    spec: Any  # the run spec's `spec.ttt`
    max_length: int
    context_budget: int
    eot: int
    batch_tokens: int


# The reference's mixing weights: np.arange(0, 0.2, 0.01), the best one per task reported.
MIX_WEIGHTS: list[float] = [round(0.01 * i, 2) for i in range(20)]


def _encode(ttt: Scorer, texts: list[str]) -> list[list[int]]:
    return [ttt.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _timed(fn: Callable[[], DocScore], outcome: DocOutcome) -> tuple[DocScore, float]:
    start = time.perf_counter()
    score = fn()
    seconds = time.perf_counter() - start
    outcome.seconds_scoring += seconds
    outcome.score_passes += 1
    return score, seconds


def in_context(
    ttt: Scorer, scored: str, neighbors: list[str], distances: list[float] | None
) -> DocOutcome:
    """The reference's in-context baseline: neighbors' text right before the scored text.

    Neighbors at Euclidean distance < inContextThreshold (2.3), concatenated nearest first
    without separator; the one window is filled with the tail of that concatenation. Only a
    text that fits one window gets context (`fits_window`); a longer one is scored without
    any, as the reference does, and every checkpoint then says 0 neighbors.
    """
    threshold = ttt.spec.in_context_threshold
    if distances is not None and threshold is not None:
        neighbors = [n for n, d in zip(neighbors, distances, strict=True) if d < threshold]
    outcome = DocOutcome(method="in-context")
    fits = len(_encode(ttt, [scored])[0]) <= ttt.max_length
    outcome.fits_window = fits
    wanted = min(max(ttt.spec.eval_after, default=0), len(neighbors)) if fits else 0
    encoded = _encode(ttt, neighbors[:wanted])
    base: tuple[DocScore, float] | None = None
    for after in ttt.spec.eval_after:
        n = min(after, wanted)
        if n == 0:
            if base is None:
                base = _timed(lambda: _plain(ttt, scored), outcome)
            score, seconds = base
        else:
            context = [t for ids in encoded[:n] for t in ids]  # nearest first, no separator
            score, seconds = _timed(
                lambda context=context: score_in_one_window(
                    ttt.model,
                    ttt.tokenizer,
                    scored,
                    ttt.max_length,
                    context,
                    eot_id=ttt.eot,
                    batch_tokens=ttt.batch_tokens,
                ),
                outcome,
            )
        outcome.neighbors_used = max(outcome.neighbors_used, n)
        outcome.checkpoints.append(checkpoint(after, n, score, outcome, seconds))
    return outcome


def _plain(ttt: Scorer, scored: str, prefix: list[int] | None = None) -> DocScore:
    return score_document(
        ttt.model,
        ttt.tokenizer,
        scored,
        ttt.max_length,
        eot_id=ttt.eot,
        context_prefix_ids=prefix,
        batch_tokens=ttt.batch_tokens,
    )


def in_context_prefix(
    ttt: Scorer, scored: str, neighbors: list[str], distances: list[float] | None
) -> DocOutcome:
    """Our in-context variant: every window conditions on the first n neighbors' text.

    Nearest last (right before the text), separated by the end-of-text token, cut to the
    context budget (half the window by default); works for texts of any length.
    """
    outcome = DocOutcome(method="in-context-prefix")
    encoded: list[list[int]] = []
    for after in ttt.spec.eval_after:
        n = min(after, len(neighbors))
        while len(encoded) < n:
            encoded += _encode(ttt, [neighbors[len(encoded)]])
        prefix: list[int] = []
        for ids in reversed(encoded[:n]):  # nearest last, right before the document
            prefix = prefix + [ttt.eot] + ids if prefix else list(ids)
        prefix = prefix[-ttt.context_budget :] if ttt.context_budget > 0 else []
        score, seconds = _timed(lambda prefix=prefix: _plain(ttt, scored, prefix or None), outcome)
        outcome.neighbors_used = max(outcome.neighbors_used, n)
        outcome.checkpoints.append(checkpoint(after, n, score, outcome, seconds))
    return outcome


def knn_probabilities(
    targets: list[int], neighbor_ids: list[list[int]], distances: list[float] | None
) -> np.ndarray:
    """p_knn of each target token: neighbors' unigram frequencies weighted by softmax(-distance).

    As the reference's create_histogram (counts / length) and softmax(-distances), evaluated
    at the scored tokens only (that is all the mixture needs).
    """
    if not neighbor_ids:
        return np.zeros(len(targets))
    d = np.zeros(len(neighbor_ids)) if distances is None else -np.asarray(distances, float)
    w = np.exp(d - d.max())
    w /= w.sum()
    p = np.zeros(len(targets))
    for weight, ids in zip(w, neighbor_ids, strict=True):
        if ids:
            counts = Counter(ids)
            p += weight * np.array([counts[t] for t in targets], float) / len(ids)
    return p


def mixture_logliks(logp_lm: np.ndarray, p_knn: np.ndarray) -> list[float]:
    """sum log(a p_knn + (1 - a) p_LM) over the tokens, for every a of MIX_WEIGHTS."""
    p_lm = np.exp(logp_lm)
    out = []
    for a in MIX_WEIGHTS:
        if a == 0:
            out.append(float(logp_lm.sum()))
        else:
            out.append(float(np.log(a * p_knn + (1 - a) * p_lm).sum()))
    return out


def interpolation(
    ttt: Scorer, scored: str, neighbors: list[str], distances: list[float] | None
) -> DocOutcome:
    """The reference's interpolation (kNN-LM style) baseline, at every mixing weight.

    One scoring pass gives log p_LM of every token; checkpoint n mixes in the unigram
    distribution of the first n neighbors. The checkpoint's own loglik is a = 0 (the base
    model); `mixtures` holds every a, and the report picks the best a per task.
    """
    outcome = DocOutcome(method="interpolation")
    start = time.perf_counter()
    ids, logps = token_logprobs(
        ttt.model,
        ttt.tokenizer,
        scored,
        ttt.max_length,
        eot_id=ttt.eot,
        batch_tokens=ttt.batch_tokens,
    )
    seconds = time.perf_counter() - start
    outcome.seconds_scoring, outcome.score_passes = seconds, 1
    logp = np.asarray(logps, float)
    wanted = min(max(ttt.spec.eval_after, default=0), len(neighbors))
    encoded = _encode(ttt, neighbors[:wanted])
    base = DocScore(float(logp.sum()), len(ids), count_bytes(scored), count_words(scored))
    for after in ttt.spec.eval_after:
        n = min(after, wanted)
        if n == 0:
            mix = [base.loglik] * len(MIX_WEIGHTS)
        else:
            d = None if distances is None else distances[:n]
            mix = mixture_logliks(logp, knn_probabilities(ids, encoded[:n], d))
        outcome.mixtures[str(after)] = mix
        outcome.neighbors_used = max(outcome.neighbors_used, n)
        outcome.checkpoints.append(checkpoint(after, n, base, outcome, seconds))
    return outcome


BASELINES: dict[str, Callable[[Scorer, str, list[str], list[float] | None], Any]] = {
    "in-context": in_context,
    "in-context-prefix": in_context_prefix,
    "interpolation": interpolation,
}

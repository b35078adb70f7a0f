"""Bits per byte, byte and word perplexity exactly as lm-evaluation-harness scores the Pile."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The Pile's 22 components (`meta.pile_set_name`) and their weights in percent (Gao et al.
# 2020, Table 1: effective size, raw size times epochs, as a share of 1254.20 GiB), rounded
# to two decimals as the reference code (tttlm utils.PILE_WEIGHTS) uses them for the paper's
# Pile-wide figures (they sum to 100.00). The weights are relative: only their ratios matter.
PILE_WEIGHTS: dict[str, float] = {
    "Pile-CC": 18.11,
    "PubMed Central": 14.40,
    "Books3": 12.07,
    "OpenWebText2": 10.01,
    "ArXiv": 8.96,
    "Github": 7.59,
    "FreeLaw": 6.12,
    "StackExchange": 5.13,
    "USPTO Backgrounds": 3.65,
    "PubMed Abstracts": 3.07,
    "Gutenberg (PG-19)": 2.17,
    "OpenSubtitles": 1.55,
    "Wikipedia (en)": 1.53,
    "DM Mathematics": 1.24,
    "Ubuntu IRC": 0.88,
    "BookCorpus2": 0.75,
    "EuroParl": 0.73,
    "HackerNews": 0.62,
    "YoutubeSubtitles": 0.60,
    "PhilPapers": 0.38,
    "NIH ExPorter": 0.30,
    "Enron Emails": 0.14,
}

# How many scoring windows of max_length tokens go through the model at once.
DEFAULT_BATCH_TOKENS = 8192

# Causal LMs whose logits are exactly output_embeddings(base_model(...).last_hidden_state):
# their batch runs the body at once and the vocabulary head one window at a time (see
# _batch_logits); any other model runs whole.
HEAD_APART = (
    "GPT2LMHeadModel",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)


def count_words(text: str) -> int:
    """Words as the harness counts them for word_perplexity (note: "" counts as one)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes, the denominator of bits per byte."""
    return len(text.encode("utf-8"))


def rolling_windows(
    token_ids: list[int], max_length: int, prefix_token: int
) -> list[tuple[list[int], list[int]]]:
    """The harness's get_rolling_token_windows(context_len=1) followed by make_disjoint_window.

    Returns (context_ids, target_ids) pairs: the first window predicts up to max_length tokens
    conditioned on `prefix_token` (the end-of-text token); every later window predicts the next
    max_length tokens conditioned on the token before them, and the last (partial) window is
    conditioned on as many preceding tokens as fill it up to max_length. Every token is a
    target exactly once, and len(context + target) - 1 <= max_length for every window.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    windows: list[tuple[list[int], list[int]]] = []
    if not token_ids:
        return windows
    n = len(token_ids)
    first = min(max_length, n)
    windows.append(([prefix_token], token_ids[:first]))  # disjoint form of [prefix]+t[:first-1]
    predicted = first
    while predicted < n:
        length = min(n - predicted, max_length)
        end = predicted + length
        context = token_ids[end - max_length - 1 : end - 1]
        # make_disjoint_window: drop the part of the context that the targets repeat
        windows.append((context[: len(context) - (length - 1)], token_ids[end - length : end]))
        predicted += length
    return windows


def document_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, prefix_token: int
) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """`text`'s token ids and its rolling windows (rolling_windows) of max_length tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids, rolling_windows(ids, max_length, prefix_token)


@dataclass(frozen=True)
class DocScore:
    """One document's score: natural-log likelihood of its tokens, and its size."""

    loglik: float
    tokens: int
    bytes: int
    words: int

    @classmethod
    def of(cls, text: str, ids: list[int], loglik: float) -> DocScore:
        """The score of `text`, tokenized as `ids`, whose tokens sum to `loglik`."""
        return cls(loglik=loglik, tokens=len(ids), bytes=count_bytes(text), words=count_words(text))

    @property
    def bits_per_byte(self) -> float:
        return -self.loglik / self.bytes / math.log(2) if self.bytes else float("nan")


def _window_logliks(
    model: PreTrainedModel, windows: list[tuple[list[int], list[int]]], batch_tokens: int
) -> float:
    """Sum of log p(target | context) over windows; windows of equal input length share a batch."""
    device = next(model.parameters()).device
    # The harness feeds (context + target)[-(max_length + 1):][:-1] and reads the last
    # len(target) positions; with disjoint windows that is simply context + target[:-1].
    by_length: dict[int, list[tuple[list[int], list[int]]]] = {}
    for context, target in windows:
        by_length.setdefault(len(context) + len(target) - 1, []).append((context, target))
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device
    with torch.no_grad():
        for length, group in by_length.items():
            per_batch = max(1, batch_tokens // length)
            for start in range(0, len(group), per_batch):
                batch = group[start : start + per_batch]
                inputs = torch.tensor([(c + t)[:-1] for c, t in batch], device=device)
                logits = _batch_logits(model, inputs)
                for row, (_context, target) in enumerate(batch):
                    scores = logits(row, len(target))
                    if scores.dtype in (torch.float16, torch.bfloat16):
                        scores = scores.float()  # bf16 log-softmax would cost the metric digits
                    idx = torch.tensor(target, device=device).unsqueeze(-1)
                    logp = scores.log_softmax(dim=-1).gather(-1, idx)
                    total += logp.double().sum()
    return float(total)  # the one read back per document


def _batch_logits(model: PreTrainedModel, inputs: torch.Tensor) -> Any:
    """A function (row, n) -> the logits of the last n positions of that row of the batch.

    The whole batch's logits would take batch_tokens x vocabulary floats at once (1.6 GB for
    SmolLM2 at 8192 tokens, 12 bytes per parameter: item 10 of issue 21), so where the head is
    a plain projection of the last hidden state (HEAD_APART), the body runs on the batch and
    the head on one row's targets when asked; the same rows of the same matmul, so the same
    bits (tests/test_bpb.py checks this on a real model).
    """
    head = model.get_output_embeddings() if type(model).__name__ in HEAD_APART else None
    if not isinstance(head, torch.nn.Linear):
        logits = model(input_ids=inputs).logits
        return lambda row, n: logits[row, -n:]
    hidden = model.base_model(input_ids=inputs).last_hidden_state
    return lambda row, n: head(hidden[row, -n:])


def score_document(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int,
    *,
    context_prefix_ids: list[int] | None = None,
    eot_id: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> DocScore:
    """loglikelihood_rolling of `text`: the sum of log p over its tokens, in rolling windows.

    `context_prefix_ids` (the in-context baseline) are prepended to every window's context;
    the document is then rolled in windows of max_length - len(prefix) tokens so that prefix
    and window together fit the model's max_length. Without a prefix this is the harness.
    """
    from ttt.lm import eot_token_id  # lm.py imports nothing from here; keep the edge one-way

    prefix = list(context_prefix_ids or [])
    if len(prefix) >= max_length:
        raise ValueError(f"context prefix of {len(prefix)} tokens leaves no room in {max_length}")
    eot = eot_token_id(tokenizer) if eot_id is None else eot_id
    ids, windows = document_windows(tokenizer, text, max_length - len(prefix), eot)
    if prefix:
        windows = [(prefix + context, target) for context, target in windows]
    was_training = model.training
    model.eval()
    try:
        loglik = _window_logliks(model, windows, batch_tokens) if windows else 0.0
    finally:
        model.train(was_training)
    return DocScore.of(text, ids, loglik)


def _window_token_logprobs(
    model: PreTrainedModel, windows: list[tuple[list[int], list[int]]], batch_tokens: int
) -> list[float]:
    """log p of every target token, in token order (the interpolation baseline mixes them)."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in windows]
    by_length: dict[int, list[int]] = {}
    for i, (context, target) in enumerate(windows):
        by_length.setdefault(len(context) + len(target) - 1, []).append(i)
    with torch.no_grad():
        for length, group in by_length.items():
            per_batch = max(1, batch_tokens // length)
            for start in range(0, len(group), per_batch):
                batch = group[start : start + per_batch]
                inputs = torch.tensor(
                    [(windows[i][0] + windows[i][1])[:-1] for i in batch], device=device
                )
                logits = _batch_logits(model, inputs)
                for row, i in enumerate(batch):
                    target = windows[i][1]
                    scores = logits(row, len(target)).float()
                    idx = torch.tensor(target, device=device).unsqueeze(-1)
                    out[i] = scores.log_softmax(dim=-1).gather(-1, idx).squeeze(-1).tolist()
    return [lp for window in out for lp in window]


def token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int,
    *,
    eot_id: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> tuple[list[int], list[float]]:
    """(token ids, natural-log probability of each) under the harness's rolling windows."""
    ids, windows = document_windows(tokenizer, text, max_length, eot_id)
    was_training = model.training
    model.eval()
    try:
        logps = _window_token_logprobs(model, windows, batch_tokens) if windows else []
    finally:
        model.train(was_training)
    return ids, logps


def score_in_one_window(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int,
    context_ids: list[int],
    *,
    eot_id: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> DocScore | None:
    """The reference's in-context scoring: `text` in one window after the tail of context_ids.

    As tttlm's loglikelihood_rolling(texts=...): the window is filled with the end of the
    context (no separator) right before the text; a text longer than one window gets None
    (the reference then scores it without context). No context: the plain harness score.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > max_length:
        return None
    room = max_length + 1 - len(ids)
    context = list(context_ids[-room:]) if context_ids else [eot_id]
    was_training = model.training
    model.eval()
    try:
        loglik = _window_logliks(model, [(context, ids)], batch_tokens) if ids else 0.0
    finally:
        model.train(was_training)
    return DocScore(
        loglik=loglik, tokens=len(ids), bytes=count_bytes(text), words=count_words(text)
    )


@dataclass
class TaskTotals:
    """Sums over a task's documents, from which the harness's three perplexity metrics come."""

    loglik: float = 0.0
    bytes: int = 0
    words: int = 0
    tokens: int = 0
    documents: int = 0

    def add(self, score: DocScore) -> None:
        self.loglik += score.loglik
        self.bytes += score.bytes
        self.words += score.words
        self.tokens += score.tokens
        self.documents += 1

    @property
    def bits_per_byte(self) -> float:
        return -self.loglik / self.bytes / math.log(2) if self.bytes else float("nan")

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglik / self.bytes) if self.bytes else float("nan")

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglik / self.words) if self.words else float("nan")


def task_weights(tasks: list[str], test_bytes: dict[str, int] | None = None) -> dict[str, float]:
    """Each task's share of the Pile-wide mean (shares sum to 1).

    Only Pile names: the Pile's weights. Only other names: their test bytes. Both kinds: the
    Pile tasks together count as much as their test bytes, shared among them by the Pile's
    weights, and every other task counts its test bytes.
    """
    if not tasks:
        raise ValueError("no tasks to average")
    pile = [t for t in tasks if t in PILE_WEIGHTS]
    other = [t for t in tasks if t not in PILE_WEIGHTS]
    if other:
        missing = [t for t in tasks if test_bytes is None or t not in test_bytes]
        if missing:
            raise ValueError(f"test bytes needed for task(s) {missing} (not Pile set names)")
    if not other:
        raw = {t: PILE_WEIGHTS[t] for t in pile}
    else:
        assert test_bytes is not None
        pile_bytes = sum(test_bytes[t] for t in pile)
        pile_sum = sum(PILE_WEIGHTS[t] for t in pile)
        raw = {t: pile_bytes * PILE_WEIGHTS[t] / pile_sum for t in pile}
        raw.update({t: float(test_bytes[t]) for t in other})
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("task weights sum to zero (no test bytes)")
    return {t: w / total for t, w in raw.items()}


def pile_weighted_mean(
    per_task: dict[str, float], test_bytes: dict[str, int] | None = None
) -> float:
    """The Pile-wide figure: the mean of a per-task metric weighted as task_weights says."""
    weights = task_weights(list(per_task), test_bytes)
    return sum(weights[t] * value for t, value in per_task.items())

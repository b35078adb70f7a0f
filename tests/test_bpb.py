"""Bits per byte pinned against hand-computed values, and the harness's rolling windows."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from ttt.bpb import (
    PILE_WEIGHTS,
    DocScore,
    TaskTotals,
    count_words,
    pile_weighted_mean,
    rolling_windows,
    score_document,
    score_in_one_window,
    task_weights,
    token_logprobs,
)

EOT = 256  # the byte tokenizer's end-of-text id


class ByteTokenizer:
    """One token per UTF-8 byte, plus an end-of-text token: log-probs we can work out by hand."""

    eos_token_id = EOT

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def get_vocab(self) -> dict[str, int]:
        return {"<eot>": EOT}


class BigramModel(torch.nn.Module):
    """Logits of the next token depend only on the current one: log p(b | a) = table[a, b]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.log_softmax(-1))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_with(probs: dict[tuple[int, int], float]) -> BigramModel:
    """A bigram model with the given p(b | a); the rest of each row shares what is left."""
    table = torch.full((257, 257), 1.0, dtype=torch.float64)
    for a in {a for a, _ in probs}:
        row = {b: p for (a2, b), p in probs.items() if a2 == a}
        rest = (1 - sum(row.values())) / (257 - len(row))
        table[a] = rest
        for b, p in row.items():
            table[a, b] = p
    return BigramModel(table.log())


# --- the windows ---------------------------------------------------------------------------


def test_windows_match_the_harness_by_hand():
    # get_rolling_token_windows(t, prefix=-1, max_seq_len=4, context_len=1), made disjoint
    assert rolling_windows(list(range(10)), 4, -1) == [
        ([-1], [0, 1, 2, 3]),
        ([3], [4, 5, 6, 7]),
        ([5, 6, 7], [8, 9]),  # the last window is topped up with context to 4 inputs
    ]
    assert rolling_windows([7, 8], 4, -1) == [([-1], [7, 8])]
    assert rolling_windows([], 4, -1) == []
    assert rolling_windows(list(range(8)), 4, -1)[-1] == ([3], [4, 5, 6, 7])


@pytest.mark.parametrize("n,max_length", [(1, 1), (5, 1), (10, 3), (17, 4), (64, 16), (65, 16)])
def test_every_token_is_scored_once_and_windows_fit(n, max_length):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, max_length, -1)
    assert [t for _, target in windows for t in target] == tokens
    assert windows[0][0] == [-1]  # the first window is conditioned on the end-of-text token
    assert len(windows) == math.ceil(n / max_length)
    sequence = [-1, *tokens]
    for context, target in windows:
        assert 1 <= len(target) <= max_length
        assert len(context) + len(target) - 1 <= max_length
        # the context is exactly what precedes the targets in the document
        start = sequence.index(target[0])
        assert sequence[start - len(context) : start] == context


# --- scoring -------------------------------------------------------------------------------


def test_bits_per_byte_by_hand():
    # p('a' | eot) = 1/2 and p('b' | 'a') = 1/4: log2 p = -3 bits over 2 bytes
    model = bigram_with({(EOT, ord("a")): 0.5, (ord("a"), ord("b")): 0.25})
    score = score_document(model, ByteTokenizer(), "ab", max_length=8)
    assert score == DocScore(loglik=pytest.approx(math.log(1 / 8)), tokens=2, bytes=2, words=1)
    assert score.bits_per_byte == pytest.approx(1.5)


def test_uniform_model_gives_log2_vocab_bits_per_token():
    model = BigramModel(torch.zeros(257, 257))
    text = "héllo wörld"  # 13 bytes, 2 words
    score = score_document(model, ByteTokenizer(), text, max_length=4)
    assert (score.tokens, score.bytes, score.words) == (13, 13, 2)
    assert score.loglik == pytest.approx(-13 * math.log(257), rel=1e-6)
    assert score.bits_per_byte == pytest.approx(math.log2(257), rel=1e-6)


@pytest.mark.parametrize("max_length", [1, 2, 3, 7, 100])
def test_window_size_does_not_change_a_bigram_score(max_length):
    # a bigram model needs only the previous token, so any correct windowing gives the same
    torch.manual_seed(0)
    model = BigramModel(torch.randn(257, 257, dtype=torch.float64))
    text = "the cat sat on the mat, the end"
    ids = [EOT, *text.encode()]
    expected = sum(model.table[a, b].item() for a, b in itertools.pairwise(ids))
    score = score_document(model, ByteTokenizer(), text, max_length=max_length, batch_tokens=5)
    assert score.loglik == pytest.approx(expected, rel=1e-9)


class FirstTokenModel(BigramModel):
    """Every position predicts from the window's first input token: shows what leads a window."""

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, :1]].expand(*input_ids.shape, -1))


def test_context_prefix_leads_every_window_and_is_not_scored():
    probs = {(EOT, ord("x")): 0.01, (ord("p"), ord("x")): 0.9}
    model = FirstTokenModel(bigram_with(probs).table.detach())
    plain = score_document(model, ByteTokenizer(), "xxxxx", max_length=3)
    # windows [eot x x] and [x x x]: the first is led by eot (p = 0.01), the second by 'x'
    # (a uniform row: p = 1/257)
    assert plain.loglik == pytest.approx(3 * math.log(0.01) + 2 * math.log(1 / 257))
    # windows of 3 - 1 = 2 tokens, each led by the prefix: every token sees 'p' first
    prefixed = score_document(model, ByteTokenizer(), "xxxxx", 3, context_prefix_ids=[ord("p")])
    assert (prefixed.tokens, prefixed.bytes) == (5, 5)
    assert prefixed.loglik == pytest.approx(5 * math.log(0.9))
    with pytest.raises(ValueError, match="no room"):
        score_document(model, ByteTokenizer(), "xx", 4, context_prefix_ids=[1, 2, 3, 4])


@pytest.mark.parametrize("max_length", [2, 7, 100])
def test_token_logprobs_are_each_tokens_and_sum_to_the_score(max_length):
    torch.manual_seed(0)
    model = BigramModel(torch.randn(257, 257, dtype=torch.float64))
    text = "the cat sat on the mat"
    ids, logps = token_logprobs(model, ByteTokenizer(), text, max_length, eot_id=EOT)
    assert ids == list(text.encode())
    pairs = list(itertools.pairwise([EOT, *ids]))
    assert logps == pytest.approx([model.table[a, b].item() for a, b in pairs], rel=1e-6)
    whole = score_document(model, ByteTokenizer(), text, max_length)
    assert sum(logps) == pytest.approx(whole.loglik, rel=1e-6)


def test_one_window_scoring_puts_the_contexts_tail_right_before_the_text():
    probs = {(EOT, ord("x")): 0.01, (ord("p"), ord("x")): 0.9, (ord("q"), ord("x")): 0.5}
    model = FirstTokenModel(bigram_with(probs).table.detach())
    tok = ByteTokenizer()
    # window 4: 'xx' leaves room for 4 + 1 - 2 = 3 context tokens: the tail 'p p p' of 'qppp'
    tail = score_in_one_window(model, tok, "xx", 4, [ord(c) for c in "qppp"], eot_id=EOT)
    assert tail.loglik == pytest.approx(2 * math.log(0.9))
    # a short context leads the window whole; none at all is the plain harness score
    lead = score_in_one_window(model, tok, "xx", 4, [ord("q")], eot_id=EOT)
    assert lead.loglik == pytest.approx(2 * math.log(0.5))
    bare = score_in_one_window(model, tok, "xx", 4, [], eot_id=EOT)
    assert bare.loglik == pytest.approx(score_document(model, tok, "xx", 4).loglik)
    assert score_in_one_window(model, tok, "xxxxx", 4, [1], eot_id=EOT) is None  # two windows


def test_empty_document_scores_zero():
    score = score_document(BigramModel(torch.zeros(257, 257)), ByteTokenizer(), "", 4)
    assert (score.loglik, score.tokens, score.bytes, score.words) == (0.0, 0, 0, 1)


# --- totals and the Pile-wide mean ---------------------------------------------------------


def test_task_totals_are_sums_over_documents():
    totals = TaskTotals()
    totals.add(DocScore(loglik=-math.log(2) * 10, tokens=5, bytes=10, words=2))
    totals.add(DocScore(loglik=-math.log(2) * 20, tokens=9, bytes=10, words=3))
    assert (totals.documents, totals.bytes, totals.words, totals.tokens) == (2, 20, 5, 14)
    assert totals.bits_per_byte == pytest.approx(1.5)  # 30 bits over 20 bytes
    assert totals.byte_perplexity == pytest.approx(2**1.5)
    assert totals.word_perplexity == pytest.approx(2**6)  # 30 bits over 5 words
    assert math.isnan(TaskTotals().bits_per_byte)


def test_word_count_is_the_harness_split():
    assert count_words("a b\n\tc") == 3
    assert count_words(" a ") == 3  # re.split keeps the empty ends, as the harness does


def test_pile_weights_are_the_papers():
    assert len(PILE_WEIGHTS) == 22
    # the reference's (tttlm utils.PILE_WEIGHTS): Table 1's percentages, summing to 100
    assert sum(PILE_WEIGHTS.values()) == pytest.approx(100.0, abs=1e-9)
    assert PILE_WEIGHTS["Github"] == 7.59 and PILE_WEIGHTS["Enron Emails"] == 0.14
    assert max(PILE_WEIGHTS, key=PILE_WEIGHTS.get) == "Pile-CC"


def test_pile_weighted_mean_uses_pile_weights_for_pile_tasks():
    per_task = {"Github": 1.0, "Enron Emails": 2.0}
    w = PILE_WEIGHTS["Github"], PILE_WEIGHTS["Enron Emails"]
    expected = (w[0] * 1.0 + w[1] * 2.0) / sum(w)
    # test bytes play no part when every task is a Pile set
    assert pile_weighted_mean(per_task) == pytest.approx(expected)
    assert pile_weighted_mean(per_task, {"Github": 1, "Enron Emails": 10**9}) == pytest.approx(
        expected
    )


def test_other_tasks_are_weighted_by_test_bytes():
    assert pile_weighted_mean({"mine": 1.0, "yours": 4.0}, {"mine": 300, "yours": 100}) == (
        pytest.approx(1.75)
    )
    with pytest.raises(ValueError, match="test bytes needed"):
        pile_weighted_mean({"mine": 1.0})


def test_mixed_tasks_pile_share_equals_its_test_bytes():
    weights = task_weights(
        ["Github", "Enron Emails", "mine"], {"Github": 50, "Enron Emails": 50, "mine": 100}
    )
    assert weights["mine"] == pytest.approx(0.5)
    assert weights["Github"] + weights["Enron Emails"] == pytest.approx(0.5)
    assert weights["Github"] / weights["Enron Emails"] == pytest.approx(7.59 / 0.14)


class Whole(torch.nn.Module):
    """A model's full forward under a class name the scorer does not split (HEAD_APART)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(input_ids=input_ids).logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_head_runs_per_window_with_the_whole_forwards_bits(kind, tiny_gpt2, gpt2_tokenizer):
    from tests.test_engine_ensemble import tiny_llama

    torch.manual_seed(0)
    model = tiny_gpt2(n_positions=64) if kind == "gpt2" else tiny_llama()
    rows: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: rows.append(tuple(args[0].shape)))
    text = " ".join(f"word{i} and more text" for i in range(60))  # several windows, one partial
    split = score_document(model, gpt2_tokenizer, text, max_length=32, eot_id=50256)
    whole = score_document(Whole(model), gpt2_tokenizer, text, max_length=32, eot_id=50256)
    assert split.tokens > 3 * 32 and split.loglik == whole.loglik  # the same bits
    # item 10 of issue 21: never a batch's logits at once, one window's targets at a time
    split_rows = rows[: len(rows) // 2]
    assert len(split_rows) > 3 and all(len(shape) == 2 and shape[0] <= 32 for shape in split_rows)
    ids, logps = token_logprobs(model, gpt2_tokenizer, text, 32, eot_id=50256)
    assert (ids, logps) == token_logprobs(Whole(model), gpt2_tokenizer, text, 32, eot_id=50256)

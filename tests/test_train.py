"""The TTT-NN loop on a tiny GPT-2: it learns from neighbors, restores weights, and its options."""

from __future__ import annotations

import math

import pytest
import torch

from ttt import telemetry
from ttt.outcome import DocOutcome
from ttt.spec import TTTSpec
from ttt.train import (
    TTTNN,
    chunk_tokens,
    select_neighbors,
    split_tokens,
)

DOC = "The harbour master logged every ship that entered the bay before dawn. " * 2
RELATED = [
    "The harbour master logged every ship that entered the bay at night. " * 3,
    "Every ship that entered the harbour was logged by the master. " * 3,
]
UNRELATED = ["Quantum chromodynamics describes how quarks and gluons interact. " * 3] * 2


def spec(**overrides) -> TTTSpec:
    # a random tiny model needs a far larger step than the paper's 2e-5 to move in one step
    fields = {"max_length": 32, "learning_rate": 1e-3, "eval_after": [0, 2]} | overrides
    return TTTSpec(**fields)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_identical(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = dict([*model.named_parameters(), *model.named_buffers()])
    assert current.keys() == saved.keys()
    for name, tensor in current.items():
        assert torch.equal(tensor, saved[name]), f"{name} changed"


# --- pure parts ----------------------------------------------------------------------------


def test_chunks_cover_the_tokens_as_the_reference_code_cuts_them():
    ids = list(range(10))
    assert chunk_tokens(ids, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # stride < maxLength: a chunk starts every stride tokens, up to the end
    assert [c[0] for c in chunk_tokens(ids, 4, 2)] == [0, 2, 4, 6, 8]
    # a one-token chunk predicts nothing and is left out
    assert chunk_tokens(list(range(9)), 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_tokens([], 4, 4) == []


def test_split_tokens_is_the_references_cut():
    # the query is min(1024, n // 2) tokens, as tttlm's _split_text
    assert split_tokens(list(range(10))) == 5
    assert split_tokens(list(range(11))) == 5
    assert split_tokens(list(range(2048))) == 1024
    assert split_tokens(list(range(5000))) == 1024
    assert split_tokens([]) == 0


def test_select_neighbors_applies_the_threshold_and_the_leakage_guard():
    texts = ["far", DOC + "\n", "near", "copy"]
    chosen = select_neighbors(DOC, texts, [5.0, 0.5, 0.2, 0.0], distance_threshold=4.0)
    assert chosen.texts == ["near"]  # sorted by distance; the document and its copy excluded
    assert chosen.distances == [0.2]
    assert (chosen.excluded_identical, chosen.dropped_distance) == (2, 1)
    unguarded = select_neighbors(DOC, texts, [5.0, 0.5, 0.2, 0.0], exclude_identical=False)
    assert unguarded.texts == ["copy", "near", DOC + "\n", "far"]
    assert select_neighbors(DOC, ["a", DOC]).texts == ["a"]  # without distances: by text
    with pytest.raises(ValueError, match="2 neighbors but 1 distances"):
        select_neighbors(DOC, ["a", "b"], [1.0])


def test_outcome_round_trips_through_a_dict():
    outcome = DocOutcome(method="ttt-nn", neighbors_used=1, train_steps=3)
    assert DocOutcome.from_dict(outcome.to_dict()) == outcome


# --- the loop ------------------------------------------------------------------------------


def test_training_on_related_neighbors_lowers_bits_per_byte(tiny_gpt2, gpt2_tokenizer):
    ttt = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec())
    related = ttt.evaluate(DOC, RELATED)
    unrelated = ttt.evaluate(DOC, UNRELATED)
    before = related.at(0).bits_per_byte
    assert unrelated.at(0).bits_per_byte == before  # the weights were restored in between
    assert related.at(2).bits_per_byte < before - 0.03
    assert related.at(2).bits_per_byte < unrelated.at(2).bits_per_byte
    assert related.neighbors_used == 2 and related.at(2).neighbors == 2
    assert related.seconds_training > 0 and related.seconds_scoring > 0


def test_weights_are_bit_identical_after_every_document(tiny_gpt2, gpt2_tokenizer):
    model = tiny_gpt2(dropout=0.1)  # dropout on while training, as the reference code
    saved = snapshot(model)
    ttt = TTTNN(model, gpt2_tokenizer, spec(optimizer="adamw", weight_decay=0.01))
    first = ttt.evaluate(DOC, RELATED)
    assert first.at(2).loglik != first.at(0).loglik  # training did change the model
    assert_identical(model, saved)
    assert not model.training
    ttt.evaluate(DOC, UNRELATED)
    assert_identical(model, saved)
    # the same document gives the same numbers again: dropout is seeded per document
    assert _same_scores(ttt.evaluate(DOC, RELATED), first)


def _same_scores(a: DocOutcome, b: DocOutcome) -> bool:
    return [(c.after, c.loglik) for c in a.checkpoints] == [
        (c.after, c.loglik) for c in b.checkpoints
    ]


def test_optimizer_state_is_reset_by_default_and_carried_over_for_parity(tiny_gpt2, gpt2_tokenizer):
    fresh = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec()).evaluate(DOC, UNRELATED)

    reset = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec())
    reset.evaluate(DOC, RELATED)
    assert not reset.optimizer.state
    assert _same_scores(reset.evaluate(DOC, UNRELATED), fresh)

    parity = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec(reset_optimizer=False))
    parity.evaluate(DOC, RELATED)
    state = next(iter(parity.optimizer.state.values()))
    assert state["exp_avg"].abs().sum() > 0  # Adam's moments survive the document
    second = parity.evaluate(DOC, UNRELATED)
    assert second.at(0).loglik == fresh.at(0).loglik  # the weights were still restored
    assert second.at(2).loglik != fresh.at(2).loglik  # but the carried moments steer training


def test_checkpoints_steps_and_tokens_are_counted(tiny_gpt2, gpt2_tokenizer):
    tok = gpt2_tokenizer
    ttt = TTTNN(tiny_gpt2(), tok, spec(eval_after=[0, 1, 5, 9], stride=16, steps_per_neighbor=2))
    outcome = ttt.evaluate(DOC, RELATED)
    chunks = [chunk_tokens(tok.encode(n), 32, 16) for n in RELATED]
    steps = [2 * len(c) for c in chunks]
    tokens = [2 * sum(map(len, c)) for c in chunks]
    assert outcome.afters == [0, 1, 5, 9]
    # with two neighbors, checkpoints 5 and 9 are scored once, after the last, and say so
    assert [c.neighbors for c in outcome.checkpoints] == [0, 1, 2, 2]
    assert outcome.at(5).loglik == outcome.at(9).loglik
    assert [c.train_steps for c in outcome.checkpoints] == [0, steps[0], sum(steps), sum(steps)]
    assert outcome.train_tokens == sum(tokens) and outcome.train_steps == sum(steps)


def test_order_follows_distances_nearest_or_farthest_first(tiny_gpt2, gpt2_tokenizer):
    short, long = "short neighbor text", "a much longer neighbor text " * 4
    distances = [2.0, 1.0]  # the long one is nearer
    for order, first in (("nearest-first", long), ("farthest-first", short)):
        ttt = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec(eval_after=[1], order=order))
        outcome = ttt.evaluate(DOC, [short, long], distances=distances)
        assert outcome.train_tokens == len(gpt2_tokenizer.encode(first)), order


def test_split_text_queries_with_the_first_tokens_and_scores_the_rest(tiny_gpt2, gpt2_tokenizer):
    ttt = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec(split_text=True))
    query, scored = ttt.query_text(DOC), ttt.scored_text(DOC)
    ids = gpt2_tokenizer.encode(DOC)
    half = len(ids) // 2
    # a token split, not a byte split: the scored part is exactly the tokens after the query
    assert gpt2_tokenizer.encode(query) == ids[:half]
    assert scored == gpt2_tokenizer.decode(ids[half:]) and query + scored == DOC
    outcome = ttt.evaluate(DOC, RELATED)
    assert outcome.at(0).bytes == len(scored.encode()) < len(DOC.encode())
    whole = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec()).evaluate(DOC, [])
    assert whole.at(0).bytes == len(DOC.encode()) and whole.checkpoints[-1].neighbors == 0


def test_dynamic_evaluation_trains_on_the_query_and_scores_the_rest(tiny_gpt2, gpt2_tokenizer):
    with pytest.raises(ValueError, match="dynamic-eval needs splitText"):
        TTTNN(tiny_gpt2(), gpt2_tokenizer, spec(method="dynamic-eval")).evaluate(DOC, [])
    s = spec(method="dynamic-eval", split_text=True, eval_after=[0, 1, 3])
    ttt = TTTNN(tiny_gpt2(), gpt2_tokenizer, s)
    outcome = ttt.evaluate(DOC, UNRELATED)  # neighbors play no part
    query, scored = ttt.split(DOC)
    assert outcome.train_tokens == 3 * len(gpt2_tokenizer.encode(query))  # one step per pass
    assert outcome.train_steps == 3 and len(outcome.train_losses) == 3
    assert outcome.at(0).bytes == len(scored.encode())  # the query is never scored
    bpb = [outcome.at(n).bits_per_byte for n in (0, 1, 3)]
    assert bpb[2] < bpb[0]


def test_training_loss_is_recorded_per_neighbor(tiny_gpt2, gpt2_tokenizer):
    outcome = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec()).evaluate(DOC, RELATED)
    assert len(outcome.train_losses) == 2 and all(v > 0 for v in outcome.train_losses)
    assert outcome.score_passes == 2  # checkpoints 0 and 2


def test_in_context_prefix_conditions_on_neighbors_without_training(tiny_gpt2, gpt2_tokenizer):
    model = tiny_gpt2()
    saved = snapshot(model)
    base = TTTNN(model, gpt2_tokenizer, spec()).evaluate(DOC, [])
    ttt = TTTNN(model, gpt2_tokenizer, spec(method="in-context-prefix", eval_after=[0, 1, 2]))
    outcome = ttt.evaluate(DOC, RELATED)
    assert_identical(model, saved)
    assert outcome.train_steps == 0 and outcome.method == "in-context-prefix"
    assert outcome.at(0).loglik == base.at(0).loglik  # no context: the base model
    assert outcome.at(1).loglik != outcome.at(0).loglik
    assert outcome.at(1).tokens == outcome.at(0).tokens  # context tokens are never scored
    # a context far longer than the window is cut to the budget (nearest text kept)
    long = TTTNN(model, gpt2_tokenizer, spec(method="in-context-prefix", eval_after=[2]))
    assert long.evaluate(DOC, ["word " * 500, "more " * 500]).at(2).neighbors == 2


def test_in_context_is_the_references(tiny_gpt2, gpt2_tokenizer):
    """Neighbors < 2.3 concatenated nearest first, the window's tail of it before the text."""
    from ttt.bpb import _window_logliks

    model = tiny_gpt2()
    tok = gpt2_tokenizer
    short = "The harbour master logged every ship."  # fits the 32-token window
    s = spec(method="in-context", eval_after=[0, 1, 2])
    ttt = TTTNN(model, tok, s)
    near, far = RELATED
    # distances out of order: sorted nearest first; one beyond 2.3 is never used
    outcome = ttt.evaluate(short, [far, near, "ignored"], distances=[2.0, 1.0, 2.5])
    assert outcome.fits_window is True and outcome.train_steps == 0
    ids = tok.encode(short)
    tail = (tok.encode(near) + tok.encode(far))[-(32 + 1 - len(ids)) :]
    assert outcome.at(2).loglik == pytest.approx(_window_logliks(model, [(tail, ids)], 8192))
    assert outcome.at(2).neighbors == 2 and outcome.at(0).neighbors == 0
    base = TTTNN(model, tok, spec()).evaluate(short, [])
    assert outcome.at(0).loglik == base.at(0).loglik
    # a text longer than one window gets no context at all, as the reference
    long = TTTNN(model, tok, s).evaluate(DOC * 3, RELATED, distances=[1.0, 1.1])
    assert long.fits_window is False and {c.neighbors for c in long.checkpoints} == {0}
    assert len({c.loglik for c in long.checkpoints}) == 1


def test_interpolation_mixes_the_neighbors_unigrams(tiny_gpt2, gpt2_tokenizer):
    import numpy as np

    from ttt.baselines import MIX_WEIGHTS, knn_probabilities

    model = tiny_gpt2()
    tok = gpt2_tokenizer
    ttt = TTTNN(model, tok, spec(method="interpolation", eval_after=[0, 2]))
    outcome = ttt.evaluate(DOC, RELATED, distances=[1.0, 2.0])
    base = TTTNN(model, tok, spec()).evaluate(DOC, [])
    assert MIX_WEIGHTS[0] == 0 and MIX_WEIGHTS[-1] == 0.19 and len(MIX_WEIGHTS) == 20
    assert outcome.at(2).loglik == pytest.approx(base.at(0).loglik)  # a = 0 is the base model
    mix = outcome.mixtures["2"]
    assert mix[0] == pytest.approx(base.at(0).loglik)
    assert max(mix) > mix[0]  # related neighbors' unigrams help at some a > 0
    assert outcome.mixtures["0"] == [mix[0]] * 20  # no neighbors, nothing to mix
    # p_knn: unigram frequencies weighted by softmax(-distance)
    p = knn_probabilities([1, 2], [[1, 1, 2, 3], [2]], [0.0, math.log(3)])
    w = np.array([3, 1]) / 4
    assert p == pytest.approx([w[0] * 2 / 4, w[0] * 1 / 4 + w[1] * 1.0])


def test_training_updates_the_metrics(tiny_gpt2, gpt2_tokenizer):
    def value(metric) -> float:
        return metric.labels("7")._value.get()

    steps, tokens = value(telemetry.TRAIN_STEPS), value(telemetry.TRAIN_TOKENS)
    outcome = TTTNN(tiny_gpt2(), gpt2_tokenizer, spec(), rank="7").evaluate(DOC, RELATED)
    assert value(telemetry.TRAIN_STEPS) - steps == outcome.train_steps > 0
    assert value(telemetry.TRAIN_TOKENS) - tokens == outcome.train_tokens


def test_baseline_outcomes_reach_the_result_record(tiny_gpt2, gpt2_tokenizer):
    from types import SimpleNamespace

    from ttt.eval.records import result_record

    doc = SimpleNamespace(id="d", domain="Github")
    model = tiny_gpt2()
    mix = TTTNN(model, gpt2_tokenizer, spec(method="interpolation")).evaluate(DOC, RELATED)
    record = result_record(doc, mix)
    assert record["mix_loglik"]["2"] == mix.mixtures["2"] and len(record["mix_loglik"]["2"]) == 20
    assert record["score_passes"] == 1 and record["train_losses"] == []
    ctx = TTTNN(model, gpt2_tokenizer, spec(method="in-context"))
    assert result_record(doc, ctx.evaluate(DOC, RELATED))["fits_window"] is True
    assert result_record(doc, ctx.evaluate(DOC * 2, RELATED))["fits_window"] is False
    trained = TTTNN(model, gpt2_tokenizer, spec()).evaluate(DOC, RELATED)
    assert result_record(doc, trained)["train_losses"] == trained.train_losses
    assert "mix_loglik" not in result_record(doc, trained)

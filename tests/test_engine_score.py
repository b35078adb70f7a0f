"""Several members scored at once through the stacked forward: score_document's figures."""

from __future__ import annotations

import pytest
import torch

from tests.test_engine_ensemble import ITEMS, assert_equal_outcomes, sequential, spec, tiny_llama
from tests.test_engine_stacked import _members
from ttt.bpb import rolling_windows, score_document
from ttt.engine import ensemble as ensemble_module
from ttt.engine.ensemble import EnsembleTTT, _runs
from ttt.engine.score import stacked_logliks
from ttt.lm import eot_token_id

TEXTS = [
    "The harbour master logged every ship that entered the bay before dawn. " * 4,
    "Quarks and gluons.",  # shorter than one window
    "",  # no windows: a log-likelihood of 0
    "Every ship that entered the harbour was logged by the master, at night. " * 2,
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_members_logliks_equal_score_document_with_each_members_weights(
    arch, tiny_gpt2, gpt2_tokenizer
):
    """Members with 4, 1, 0 and 2 windows, two windows per member per call: each member's
    sum equals score_document on the model holding that member's weights."""
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    stacked = _members(model, len(TEXTS))
    eot = eot_token_id(gpt2_tokenizer)
    ids = [gpt2_tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    windows = [rolling_windows(i, 16, eot) for i in ids]
    assert [len(w) for w in windows] == [4, 1, 0, 2]
    got = stacked_logliks(model, stacked, windows, batch_tokens=len(TEXTS) * 2 * 16)
    for e, text in enumerate(TEXTS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(stacked[name][e])
        want = score_document(model, gpt2_tokenizer, text, 16, eot_id=eot)
        assert got[e] == pytest.approx(want.loglik, rel=1e-5, abs=1e-5), e
    assert got[2] == 0.0


def test_members_due_together_are_scored_in_one_pass_with_the_loops_figures(
    tiny_gpt2, gpt2_tokenizer, monkeypatch
):
    """Three members on the stacked path: every scoring goes through stacked_logliks, most
    passes with several members, and each document's checkpoints are the sequential loop's."""
    passes: list[int] = []

    def counted(model, weights, windows, batch_tokens):
        passes.append(len(windows))
        return stacked_logliks(model, weights, windows, batch_tokens)

    monkeypatch.setattr(ensemble_module, "stacked_logliks", counted)
    want = sequential(tiny_gpt2(), gpt2_tokenizer, spec())
    model = tiny_gpt2()
    ensemble = EnsembleTTT(model, gpt2_tokenizer, spec(), members=3, path="stacked")
    assert ensemble.batch_scoring
    got = dict(ensemble.evaluate_stream(ITEMS))
    assert_equal_outcomes(got, want, rel=1e-4)
    assert max(passes) == 3  # the three starting documents' checkpoint 0 in one pass
    assert sum(o.score_passes for o in got.values()) >= len(passes)


def test_one_member_and_other_paths_score_as_the_loop_does(tiny_gpt2, gpt2_tokenizer):
    assert not EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=1).batch_scoring
    model = tiny_gpt2()
    assert not EnsembleTTT(model, gpt2_tokenizer, spec(), members=2, path="vmap").batch_scoring


def test_runs_of_neighbouring_members():
    assert _runs([0, 1, 3, 5, 6, 7]) == [(0, 2), (3, 4), (5, 8)]
    assert _runs([]) == []


def test_out_of_memory_scores_the_members_one_by_one_with_the_same_figures(
    tiny_gpt2, gpt2_tokenizer, monkeypatch
):
    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for every member's windows")

    monkeypatch.setattr(ensemble_module, "stacked_logliks", no_room)
    want = sequential(tiny_gpt2(), gpt2_tokenizer, spec())
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=3, path="stacked")
    got = dict(ensemble.evaluate_stream(ITEMS))
    assert_equal_outcomes(got, want, rel=1e-4)

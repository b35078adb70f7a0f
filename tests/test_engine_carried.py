"""A carried optimizer in the ensemble: members are tasks, each document equal to the loop's."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.test_engine_ensemble import ITEMS, NEIGHBORS, assert_equal_outcomes, spec
from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.feed import KEEP, RESET, RESUME, TaskFeed
from ttt.engine.select import SequentialEngine
from ttt.train import TTTNN

# three tasks of unequal size: the middle one is the largest (balanced by bytes first)
TASKS = {
    "small": [ITEMS[1]],
    "large": [ITEMS[0], ITEMS[2], ITEMS[3]],
    "medium": [
        ("e", "Harbour pilots guide ships past the bay's sandbanks. " * 2, NEIGHBORS[:2], None),
        ("f", "Gluons carry the strong force between quarks. " * 2, NEIGHBORS[1:], None),
    ],
}


def carried(**overrides):
    return spec(reset_optimizer=False, **overrides)


def loop_by_task(model, tokenizer, ttt_spec, tasks=TASKS):
    """The reference: the sequential loop, task after task, a fresh optimizer per task."""
    loop = TTTNN(model, tokenizer, ttt_spec.model_copy(update={"dtype": "float32"}))
    out = {}
    for docs in tasks.values():
        loop.new_task()
        for key, text, nbrs, d in docs:
            out[key] = loop.evaluate(text, nbrs, distances=d)
    return out


def task_pairs(tasks=TASKS):
    return [(sum(len(t) for _, t, _, _ in docs), docs) for docs in tasks.values()]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_members_as_tasks_equal_the_loop_per_document(dropout, tiny_gpt2, gpt2_tokenizer):
    want = loop_by_task(tiny_gpt2(dropout=dropout), gpt2_tokenizer, carried())
    ensemble = EnsembleTTT(tiny_gpt2(dropout=dropout), gpt2_tokenizer, carried(), members=2)
    assert ensemble.path == ("loop" if dropout else "stacked")
    got = dict(ensemble.evaluate_tasks(task_pairs()))
    assert_equal_outcomes(got, want, rel=1e-4)
    # the carried moments matter: a fresh optimizer per document gives other numbers
    fresh = dict(EnsembleTTT(tiny_gpt2(dropout=dropout), gpt2_tokenizer, spec(), members=2)
                 .evaluate_stream(ITEMS))  # fmt: skip
    assert fresh["c"].at(3).loglik != pytest.approx(got["c"].at(3).loglik, rel=1e-6)


def test_the_carried_state_is_the_loops_and_a_resumed_task_continues_it(tiny_gpt2, gpt2_tokenizer):
    large = TASKS["large"]
    loop = TTTNN(tiny_gpt2(), gpt2_tokenizer, carried())
    for key, text, nbrs, d in large[:2]:
        loop.evaluate(text, nbrs, distances=d)
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, carried(), members=2)
    saved = None
    for key, _ in ensemble.evaluate_tasks(task_pairs()):
        if key == large[1][0]:  # the state handed out with this document: just after it
            saved = ensemble.optimizer_state()
    theirs = loop.optimizer.state_dict()
    mine = torch.load(io.BytesIO(saved), weights_only=True)
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        assert float(mine["state"][i]["step"]) == float(state["step"]) > 0
        for name in ("exp_avg", "exp_avg_sq"):
            # relative to the tensor's scale: single entries near zero differ by rounding
            scale = float(state[name].abs().max())
            torch.testing.assert_close(
                mine["state"][i][name], state[name], rtol=1e-4, atol=1e-4 * scale
            )
    # a resumed rank: the ensemble's saved state continues the task, in the ensemble...
    want = loop.evaluate(*large[2][1:3], distances=large[2][3])
    again = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, carried(), members=2)
    again.load_optimizer_state(saved)
    got = dict(again.evaluate_tasks([(1, large[2:]), (1, TASKS["small"])], resume_first=True))
    assert_equal_outcomes({"d": got["d"]}, {"d": want}, rel=1e-4)
    # ... and in the sequential loop, which reads the same format
    engine = SequentialEngine(TTTNN(tiny_gpt2(), gpt2_tokenizer, carried()))
    engine.load_optimizer_state(saved)
    assert_equal_outcomes(dict(engine.evaluate_stream(large[2:])), {"d": want}, rel=1e-4)


def test_tasks_go_largest_first_to_the_member_that_frees_first():
    tasks = [(10, ["a1", "a2"]), (30, ["b1"]), (20, []), (25, ["d1"])]
    with ThreadPoolExecutor(1) as pool:
        feed = TaskFeed(tasks, lambda item: item, 2, pool, resume_first=True)
        assert feed.next(0) == ("b1", RESET)  # the largest
        assert feed.next(1) == ("d1", RESET)
        assert feed.next(1) == ("a1", RESUME)  # member 1 frees first; task 0 continues
        assert feed.next(1) == ("a2", KEEP)  # the same task: the optimizer carries
        assert feed.next(0) is None  # the empty task is skipped, nothing is left
        assert feed.next(1) is None


def test_the_sequential_engine_reads_ahead_and_starts_a_task_at_the_right_document(
    tiny_gpt2, gpt2_tokenizer
):
    want = loop_by_task(tiny_gpt2(), gpt2_tokenizer, carried())
    engine = SequentialEngine(TTTNN(tiny_gpt2(), gpt2_tokenizer, carried()))
    read = []

    def items():
        for docs in TASKS.values():
            engine.new_task()  # called while the previous task's last document waits
            for item in docs:
                read.append(item[0])
                yield item

    got = {}
    for key, outcome in engine.evaluate_stream(items()):
        got[key] = outcome
        assert len(read) == min(len(got) + 1, 6)  # one document read ahead
    assert_equal_outcomes(got, want, rel=1e-6)


def test_evaluate_tasks_needs_a_carried_optimizer(tiny_gpt2, gpt2_tokenizer):
    with pytest.raises(ValueError, match="resetOptimizer false"):
        EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=1).evaluate_tasks([])

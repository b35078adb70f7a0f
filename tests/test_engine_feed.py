"""The ensemble's feeds pull documents (retrieval, in the eval stage) on their pool's thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from tests.test_engine_carried import carried, loop_by_task
from tests.test_engine_ensemble import ITEMS, assert_equal_outcomes, spec
from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.feed import KEEP, RESET, SharedFeed, TaskFeed

WAIT_S = 20.0  # a deadline for events that must come at once: a failure, not a hang


class Recorded:
    """A source that records each document it gives and the thread it was pulled on."""

    def __init__(self, items, fail_at: int | None = None, error: Exception | None = None):
        self.items, self.fail_at, self.error = list(items), fail_at, error
        self.pulls: list[tuple[object, threading.Thread]] = []

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.fail_at:
                raise self.error
            self.pulls.append((item[0] if isinstance(item, tuple) else item, current()))
            yield item

    def keys(self):
        return [key for key, _ in self.pulls]

    def threads(self):
        return {thread for _, thread in self.pulls}


def current() -> threading.Thread:
    return threading.current_thread()


def test_a_shared_stream_is_pulled_and_planned_on_the_pool_thread_in_order():
    source = Recorded(range(7))
    planned = []

    def plan(item):
        planned.append(current())
        return item * 10

    with ThreadPoolExecutor(1) as pool:
        feed = SharedFeed(source, plan, 3, pool)
        (pool_thread,) = {pool.submit(current).result()}
        got = []
        while (taken := feed.next(0)) is not None:
            got.append(taken)
            feed.refill()
        assert feed.next(0) is None  # and stays done
    assert got == [(i * 10, RESET) for i in range(7)]
    assert source.keys() == list(range(7))
    assert source.threads() == set(planned) == {pool_thread}
    assert pool_thread is not threading.main_thread()


def test_a_shared_feed_reads_members_documents_ahead_not_more():
    source = Recorded(range(10))
    with ThreadPoolExecutor(1) as pool:
        feed = SharedFeed(source, lambda item: item, 3, pool)
        wait(feed.ahead, timeout=WAIT_S)
        assert source.keys() == [0, 1, 2]  # read before any member asked
        assert feed.next(0) == (0, RESET)
        wait(feed.ahead, timeout=WAIT_S)
        assert source.keys() == [0, 1, 2]  # refill() reads the next one, not next()
        feed.refill()
        wait(feed.ahead, timeout=WAIT_S)
        assert source.keys() == [0, 1, 2, 3]


def test_an_error_in_the_stream_is_raised_in_the_caller_as_it_was():
    error = ConnectionError("shard 3 did not answer")
    source = Recorded(range(5), fail_at=2, error=error)
    with ThreadPoolExecutor(1) as pool:
        feed = SharedFeed(source, lambda item: item, 2, pool)
        assert feed.next(0) == (0, RESET)
        feed.refill()
        assert feed.next(1) == (1, RESET)
        feed.refill()
        with pytest.raises(ConnectionError) as raised:
            feed.next(0)
    assert raised.value is error
    tasks = Recorded(["a1", "a2"], fail_at=1, error=error)
    with ThreadPoolExecutor(1) as pool:
        feed = TaskFeed([(1, tasks)], lambda item: item, 1, pool)
        assert feed.next(0) == ("a1", RESET)
        with pytest.raises(ConnectionError) as raised:
            feed.next(0)
    assert raised.value is error


def test_a_task_feed_reads_one_document_ahead_per_member_on_the_pool_thread():
    a, b = Recorded(["a1", "a2", "a3"]), Recorded(["b1", "b2"])
    with ThreadPoolExecutor(1) as pool:
        (pool_thread,) = {pool.submit(current).result()}
        feed = TaskFeed([(10, a), (20, b)], lambda item: item, 2, pool)
        assert a.pulls == b.pulls == []  # nothing before a member asks
        assert feed.next(0) == ("b1", RESET)  # the larger task first
        wait([f for f in feed.ahead if f], timeout=WAIT_S)
        assert (a.keys(), b.keys()) == ([], ["b1", "b2"])  # b2 read while b1 trains
        assert feed.next(1) == ("a1", RESET)
        wait([f for f in feed.ahead if f], timeout=WAIT_S)
        assert a.keys() == ["a1", "a2"]  # one ahead, not the whole task
        assert feed.next(1) == ("a2", KEEP)
        assert feed.next(0) == ("b2", KEEP)
        assert feed.next(0) is None  # b is done, nothing pending: a stays member 1's
        assert feed.next(1) == ("a3", KEEP)
        assert feed.next(1) is None
    assert a.threads() == b.threads() == {pool_thread}


def test_the_ensemble_pulls_off_the_main_thread_with_the_same_results(tiny_gpt2, gpt2_tokenizer):
    want = dict(EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=2).evaluate_stream(ITEMS))
    source = Recorded(ITEMS)
    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=2)
    got = dict(ensemble.evaluate_stream(source))
    assert_equal_outcomes(got, want, rel=0)
    assert source.keys() == [key for key, *_ in ITEMS]
    (thread,) = source.threads()
    assert thread is not threading.main_thread()
    # a carried optimizer: tasks pulled off the main thread too, each document the loop's
    tasks = {"one": ITEMS[:2], "two": ITEMS[2:]}
    recorded = [Recorded(docs) for docs in tasks.values()]
    pairs = [(len(docs), r) for docs, r in zip(tasks.values(), recorded, strict=True)]
    got = dict(EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, carried(), members=2).evaluate_tasks(pairs))
    assert_equal_outcomes(
        got, loop_by_task(tiny_gpt2(), gpt2_tokenizer, carried(), tasks), rel=1e-4
    )
    assert all(threading.main_thread() not in r.threads() for r in recorded)


def test_the_next_documents_retrieval_runs_while_a_training_step_runs(tiny_gpt2, gpt2_tokenizer):
    """The second document's retrieval waits for a step to be under way, and the step
    waits for that retrieval: both finish only if they overlap (retrieval on the main
    thread, before the step, would wait out its deadline and fail)."""
    stepping, retrieved = threading.Event(), threading.Event()

    def source():
        yield ITEMS[0]
        if not stepping.wait(WAIT_S):  # held until a step runs
            raise AssertionError("the next document was retrieved before any step ran")
        retrieved.set()
        yield ITEMS[2]

    ensemble = EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=1)
    step = ensemble._step
    overlapped = []

    def step_awaiting_retrieval(slots):
        stepping.set()
        overlapped.append(retrieved.wait(WAIT_S))  # the retrieval ends within this step
        return step(slots)

    ensemble._step = step_awaiting_retrieval
    got = dict(ensemble.evaluate_stream(source()))
    assert list(got) == ["a", "c"]
    assert overlapped and overlapped[0] is True
    want = dict(
        EnsembleTTT(tiny_gpt2(), gpt2_tokenizer, spec(), members=1).evaluate_stream(
            [ITEMS[0], ITEMS[2]]
        )
    )
    assert_equal_outcomes(got, want, rel=0)

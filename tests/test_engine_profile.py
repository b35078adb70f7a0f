"""A training step reads nothing back to the host: counted by a dispatch mode, on a CPU."""

from __future__ import annotations

import torch

from tests.test_engine_ensemble import ITEMS, spec, tiny_llama
from ttt.engine.attention import training_attention
from ttt.engine.ensemble import EnsembleTTT
from ttt.engine.profile import CountingMode, count_steps
from ttt.train import TTTNN


def test_the_mode_counts_operators_bytes_syncs_and_host_values():
    x = torch.ones(10)
    with CountingMode(shapes=[(10,)]) as mode:
        y = x * 2  # one operator, 40 new bytes, 80 bytes of a "parameter" read and written
        y.sum().item()  # a value read back: a sync
        torch.tensor([1.0, 2.0])  # a tensor from host values: a copy from the host on a GPU
        y.view(2, 5)  # a view: no bytes
    c = mode.counts
    assert (c.syncs, c.host_values, c.host_syncs) == (1, 1, 2)
    assert c.by_operator["mul"] == 1 and c.by_operator["_local_scalar_dense"] == 1
    assert c.bytes_allocated == 40 + 4  # y, and the sum's scalar
    assert c.param_traffic == 40 + 40 + 40  # mul reads x, writes y; sum reads y


def test_engine_steps_have_no_host_sync_on_any_path(tiny_gpt2, gpt2_tokenizer):
    for make, members, path in (
        (tiny_llama, 2, "stacked"),
        (tiny_llama, 2, "vmap"),
        (lambda: tiny_gpt2(dropout=0.1), 2, "loop"),
    ):
        engine = EnsembleTTT(make(), gpt2_tokenizer, spec(), members=members, path=path)
        steps = count_steps(engine, sites=True)
        list(engine.evaluate_stream(ITEMS[:3]))
        assert len(steps) > 3
        assert [s.host_syncs for s in steps] == [0] * len(steps), steps[0].sync_sites
        assert all(s.operators > 100 for s in steps)
    # the counter does find them where they are: the sequential loop's step (the input
    # built from a list, Adam's step counts read back per parameter)
    loop = TTTNN(tiny_llama(), gpt2_tokenizer, spec())
    steps = count_steps(loop, sites=True)
    loop.evaluate(*ITEMS[0][1:3])
    assert steps[0].host_values >= 1 and steps[0].syncs >= 1
    assert any("train.py" in site for site in steps[0].sync_sites)


def test_training_attention_is_the_models_causal_sdpa_without_a_mask():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 24))
    want = model(input_ids=ids).logits
    with training_attention(model, eager=False), CountingMode() as mode:
        got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)  # the very same kernel: is_causal
    assert mode.counts.host_syncs == 0 and mode.counts.by_operator["cumsum"] == 0  # no mask
    assert model.config._attn_implementation == "sdpa"  # its own again afterwards
    with training_attention(model, eager=True):
        assert model.config._attn_implementation == "eager"


def test_a_row_update_counts_the_rows_it_moves_not_the_whole_table():
    table = torch.zeros(100, 8)
    rows = torch.tensor([3, 7])
    with CountingMode(shapes=[(100, 8)]) as mode:
        table.index_put_((rows,), torch.ones(2, 8), accumulate=True)
        table.add_(1.0)  # a whole-table update reads and writes it all
    moved = mode.counts.traffic_by_operator
    assert moved["index_put_"] == 3 * 2 * 8 * 4  # the values read, two rows read and written
    assert moved["add_"] == 2 * 100 * 8 * 4

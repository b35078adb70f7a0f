"""The one-kernel GELU is GPT-2's gelu_new, swapped in only while the engine trains."""

from __future__ import annotations

import torch

from ttt.engine.kernels import fused_activations
from ttt.engine.profile import CountingMode


def test_the_fused_gelu_is_gelu_new_in_one_kernel_and_the_model_gets_its_own_back(tiny_gpt2):
    from transformers.activations import NewGELUActivation

    model = tiny_gpt2()
    ids = torch.randint(0, 1000, (1, 24))
    want = model(input_ids=ids).logits
    x = torch.randn(4, 64) * 3
    with fused_activations(model) as swapped:
        assert swapped == 2  # one per block
        got = model(input_ids=ids).logits
        act = model.transformer.h[0].mlp.act
        with CountingMode() as mode:
            act(x)
        assert mode.counts.kernels == 1 and mode.counts.by_operator["gelu"] == 1
        torch.testing.assert_close(act(x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(type(b.mlp.act) is NewGELUActivation for b in model.transformer.h)
    with CountingMode() as mode:
        NewGELUActivation()(x)
    assert mode.counts.kernels >= 5  # what it replaces: a kernel per elementwise step

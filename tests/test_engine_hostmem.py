"""A CPU eval worker's allocator: freed activations go back to the system, where it pays."""

from __future__ import annotations

import json
import subprocess
import sys

from ttt.engine.hostmem import ENV, WORKER_MMAP_THRESHOLD, worker_allocator

# a step's pattern: a freed 1.6 MB block (glibc raises its threshold past it), then 100 such
# activations, each with a small tensor kept after it (as a step keeps some of what it
# makes), and the activations freed: what stays resident
_CHILD = """
import json, sys
import torch
from ttt.bench.worker_memory import vm_bytes
from ttt.engine.hostmem import worker_allocator
threshold = worker_allocator(sys.argv[1], "cpu")
x = torch.ones(400_000); del x
base = vm_bytes("VmRSS")
blocks, kept = [], []
for _ in range(100):
    blocks.append(torch.ones(400_000))
    kept.append(torch.ones(16_000))
del blocks
print(json.dumps({"threshold": threshold, "kept_mb": (vm_bytes("VmRSS") - base) / 1e6}))
"""


def _child(engine: str) -> dict:
    env_free = {k: v for k, v in __import__("os").environ.items() if k != ENV}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, engine],
        capture_output=True, text=True, check=True, env=env_free, timeout=120,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_ensemble_worker_hands_freed_activations_back_and_a_sequential_one_is_left_alone():
    ensemble, sequential = _child("ensemble"), _child("sequential")
    assert ensemble["threshold"] == WORKER_MMAP_THRESHOLD
    assert ensemble["kept_mb"] < 20, ensemble  # 160 MB freed: back to the system
    assert sequential["threshold"] is None
    assert sequential["kept_mb"] > 100, sequential  # glibc's default keeps them on its heap


def test_nothing_is_set_off_a_cpu_or_over_a_users_own_setting(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert worker_allocator("ensemble", "cuda:0") is None
    assert worker_allocator("sequential", "cpu") is None
    monkeypatch.setenv(ENV, "65536")  # glibc read the user's at start: it stays
    assert worker_allocator("ensemble", "cpu") is None

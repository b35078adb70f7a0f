"""A CPU eval worker's allocator: activations freed in a step go back to the system.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
a step's activations (about 1-3 MB each at 512 tokens) come from its heap, where freed ones
stay resident and fragmented: the worker's peak then counts a step's activations more than
once. A fixed threshold of 1 MiB (mallopt, which also ends the raising) maps each of them
on its own and unmaps it when freed. Measured on SmolLM2-135M at 512 tokens with the
ensemble (ttt.bench.worker_memory): peak 25.9 -> 23.2 bytes per parameter, 2-4 % slower per
neighbor; the sequential loop, whose transformers modules allocate more often, is about
25 % slower with it, so it is set for the ensemble only (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
WORKER_MMAP_THRESHOLD = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"  # a user's own setting, read by glibc at start: it wins


def worker_allocator(engine: str, device: Any) -> int | None:
    """Set a fixed mmap threshold for an `engine` worker on `device` where that is measured to
    pay (the ensemble on a CPU, under glibc); the threshold set, else None. Process-wide and
    for good (glibc keeps a fixed threshold): call it in a worker process, before loading."""
    if engine != "ensemble" or str(device).split(":")[0] != "cpu" or ENV in os.environ:
        return None
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl and others have none
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: the worker keeps glibc's default")
        return None
    return WORKER_MMAP_THRESHOLD

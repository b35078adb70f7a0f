"""A device's peak matmul rate: the datasheet's dense bf16 figure on known GPUs, else measured."""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s.
GPU_BF16_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100": 989.4,  # SXM; the PCIe card's is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def device_peak(device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from) for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
            if key in name and not (key == "H100" and "PCIe" in name):
                return tflops, f"{name} datasheet dense bf16"
        return measured_matmul_tflops(device, torch.bfloat16), f"{name} measured bf16 matmul"
    return measured_matmul_tflops(device, torch.float32), "measured fp32 matmul (CPU)"


def measured_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5
) -> float:
    """The best rate of size^3 matmuls over about `seconds`: a practical peak."""
    if device.type == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 / elapsed / 1e12)
    return best

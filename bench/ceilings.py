"""The device's measured ceilings, taken in the same run as the benchmark that reports against them:
dense bf16 matmul rate (TFLOP/s) and device-memory copy bandwidth (GB/s)."""
from __future__ import annotations

import torch

from common import time_ms


def measure_ceilings(device: torch.device) -> dict:
    """{'matmul_tflops': ..., 'copy_gbps': ...}; small sizes on CPU so a smoke run stays quick."""
    on_gpu = device.type == "cuda"
    n = 8192 if on_gpu else 512
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=5, calls_per_repeat=5)
    numel = (1 << 28) if on_gpu else (1 << 22)
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=5, calls_per_repeat=5)
    return {"matmul_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbps": 2 * numel / copy_ms / 1e6}

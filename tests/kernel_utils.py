"""Helpers for the kernel tests: point-set makers and NaN-poisoned output allocation."""
import torch

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INT_POISON = -987654
# (N, C, L, k, dtype) of the composed dpc_knn tests (v1 in test_dpc_knn_ops.py, v2 in test_gram.py): odd sizes, a
# single channel, L = N, every input dtype.
DPC_KNN_CASES = [(7, 33, 3, 3, torch.float32), (63, 1408, 16, 8, torch.bfloat16), (257, 33, 16, 8, torch.float32),
                 (16, 1408, 6, 3, torch.float16), (2, 1, 2, 5, torch.float32)]


def make_points(B, N, C, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g).to(dtype).to(device)


def ragged_lengths(B, N, seed, minimum=1, device="cpu"):
    """Per-set valid lengths in [minimum, N], the first set full."""
    g = torch.Generator().manual_seed(seed + 7)
    lens = torch.randint(minimum, N + 1, (B,), generator=g)
    lens[0] = N
    return lens.to(device)


def poison_empty(monkeypatch):
    """Make torch.empty return NaN (floats) or INT_POISON (integers), so any output element a kernel fails to
    write shows up in the comparison."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(INT_POISON)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)

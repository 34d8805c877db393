"""Centre choice: the num_clusters points of largest score (rho * delta), descending, ties by lower index.

One program per set makes num_clusters passes; pass l takes the largest (score, -index) strictly below the pick of
pass l - 1, so no picked-set bookkeeping is needed and the order is the deterministic sort order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .distance import lengths_i32, require_kernel_device


@triton.jit
def _select_centers_kernel(p_score, p_len, p_centers, N, L, BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    n_valid = tl.load(p_len + pid_b)
    prev_s = tl.full((), float("inf"), tl.float32)
    prev_i = tl.full((), -1, tl.int32)
    for rank in range(0, L):
        best_s = tl.full((), -float("inf"), tl.float32)
        best_i = tl.full((), N, tl.int32)
        for n0 in range(0, n_valid, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            m_valid = offs < n_valid
            b_s = tl.load(p_score + pid_b * N + offs, mask=m_valid, other=-float("inf"))
            m_left = (b_s < prev_s) | ((b_s == prev_s) & (offs > prev_i))
            b_s = tl.where(m_valid & m_left, b_s, -float("inf"))
            chunk_s = tl.max(b_s, axis=0)
            chunk_i = tl.min(tl.where((b_s == chunk_s) & m_valid & m_left, offs, N), axis=0)
            better = (chunk_s > best_s) | ((chunk_s == best_s) & (chunk_i < best_i))
            best_s = tl.where(better, chunk_s, best_s)
            best_i = tl.where(better, chunk_i, best_i)
        tl.store(p_centers + pid_b * L + rank, best_i.to(tl.int64))
        prev_s = best_s
        prev_i = best_i


def launch_select_centers(score: torch.Tensor, lengths: torch.Tensor, num_clusters: int) -> torch.Tensor:
    B, N = score.shape
    centers = torch.empty(B, num_clusters, dtype=torch.int64, device=score.device)
    block = min(1024, max(16, triton.next_power_of_2(N)))
    _select_centers_kernel[(B,)](score, lengths, centers, N, num_clusters, BLOCK=block)
    return centers


def select_centers(score: torch.Tensor, num_clusters: int, *, valid_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Centre ids [B, L] int64 in descending score order. score: [B, N] fp32, finite, num_clusters <= valid points."""
    if score.dim() != 2:
        raise ValueError(f"score must be [B, N], got shape {tuple(score.shape)}")
    require_kernel_device(score, valid_len)
    B, N = score.shape
    from .library import select_centers_op

    return select_centers_op(score.float().contiguous(), lengths_i32(score, valid_len), num_clusters)

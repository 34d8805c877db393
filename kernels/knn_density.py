"""kNN density rho_i = exp(-mean of d(i, j)^2 over the k nearest j, i included) (paper Sec. 3.2, DESIGN 4).

One program per (set, block of rows) streams column tiles and keeps a running k-smallest list per row in
registers: the N x N matrix never reaches global memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TIE_EPS, check_points
from .distance import _sq_dist_tile, block_sizes, lengths_i32, require_kernel_device, sq_norms


@triton.jit
def _knn_density_kernel(p_x, p_sq, p_len, p_rho, N, C, stride_b, stride_n, stride_c, inv_C,
                        K: tl.constexpr, K_PAD: tl.constexpr, TIE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        UPCAST: tl.constexpr):
    pid_b = tl.program_id(0)
    n_valid = tl.load(p_len + pid_b)
    p_x_set = p_x + pid_b * stride_b
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
    cols_k = tl.arange(0, K_PAD)
    # Running k smallest per row; padding columns hold -inf so they are never the current worst.
    b_best = tl.where(cols_k[None, :] < K, float("inf"), -float("inf")) + tl.zeros([BLOCK_M, K_PAD], tl.float32)
    cols_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, n_valid, BLOCK_N):
        offs_n = n0 + cols_n
        mask_n = offs_n < n_valid
        sq_n = tl.load(p_sq + pid_b * N + offs_n, mask=mask_n, other=0.0)
        b_d2 = _sq_dist_tile(p_x_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n, C, inv_C,
                             BLOCK_M, BLOCK_N, BLOCK_C, TIE, UPCAST)
        b_d2 = tl.where(mask_n[None, :], b_d2, float("inf"))
        for _ in tl.static_range(K):
            b_cand = tl.min(b_d2, axis=1)
            b_d2 = tl.where(cols_n[None, :] == tl.argmin(b_d2, axis=1)[:, None], float("inf"), b_d2)
            b_worst = tl.max(b_best, axis=1)
            m_replace = (cols_k[None, :] == tl.argmax(b_best, axis=1)[:, None]) & (b_cand < b_worst)[:, None]
            b_best = tl.where(m_replace, b_cand[:, None], b_best)
    m_real = (cols_k[None, :] < K) & (b_best < float("inf"))
    b_sum = tl.sum(tl.where(m_real, b_best, 0.0), axis=1)
    b_count = tl.sum(m_real.to(tl.float32), axis=1)
    b_rho = tl.exp(-b_sum / tl.maximum(b_count, 1.0))
    tl.store(p_rho + pid_b * N + offs_m, tl.where(mask_m, b_rho, 0.0), mask=offs_m < N)


def knn_density(x: torch.Tensor, k: int, *, valid_len: Optional[torch.Tensor] = None, check: bool = True,
                sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rho [B, N] fp32 of the point sets x [B, N, C]; 0 past valid_len. `sq` may pass precomputed ||x_i||^2."""
    if check:
        check_points(x, valid_len, k=k)
    require_kernel_device(x, valid_len)
    B, N, C = x.shape
    sq = sq_norms(x) if sq is None else sq
    rho = torch.empty(B, N, dtype=torch.float32, device=x.device)
    blocks = block_sizes(N, C)
    grid = (B, triton.cdiv(N, blocks["BLOCK_M"]))
    _knn_density_kernel[grid](x, sq, lengths_i32(x, valid_len), rho, N, C, *x.stride(), 1.0 / C,
                              K=k, K_PAD=max(2, triton.next_power_of_2(k)), TIE=TIE_EPS, **blocks)
    return rho

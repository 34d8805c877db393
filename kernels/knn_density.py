"""kNN density rho_i = exp(-mean of d(i, j)^2 over the k nearest j, i included) (paper Sec. 3.2, DESIGN 4).

One program per (set, block of rows, column split) streams its column tiles and keeps a running k-smallest list
per row in registers: the N x N matrix never reaches global memory. Each split writes its k smallest per row
([B, S, N, k], tiny); a torch merge takes the k smallest of those. Splitting the columns keeps the GPU busy when
there are few row blocks (one 3,600-frame video has 57 of them, an H100 has 132 SMs).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TIE_EPS, check_points, valid_mask
from .distance import (PreparedPoints, _tile, column_splits, launch_config, lengths_i32, prepare_points,
                       require_kernel_device)


@triton.jit
def _knn_density_kernel(p_x, p_sq, p_len, p_best, p_d, p_ids, p_far, N, C, stride_b, stride_n, stride_c, inv_C,
                        cols_per_split,
                        K: tl.constexpr, K_PAD: tl.constexpr, TIE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        UPCAST: tl.constexpr, FROM_D: tl.constexpr, WITH_IDS: tl.constexpr):
    """WITH_IDS also writes each kept distance's column (p_ids, int32) and each row's farthest valid column in the
    split (p_far): the kNN lists that let delta skip its pass for most points (kernels/temporal.py)."""
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    pid_s = tl.program_id(2)
    n_valid = tl.load(p_len + pid_b)
    p_x_set = p_x + pid_b * stride_b
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
    cols_k = tl.arange(0, K_PAD)
    # Running k smallest per row; padding columns hold -inf so they are never the current worst.
    b_best = tl.where(cols_k[None, :] < K, float("inf"), -float("inf")) + tl.zeros([BLOCK_M, K_PAD], tl.float32)
    b_ids = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    b_far = tl.zeros([BLOCK_M], tl.float32)
    cols_n = tl.arange(0, BLOCK_N)
    n_end = tl.minimum((pid_s + 1) * cols_per_split, n_valid)
    n_end = tl.where(tl.program_id(1) * BLOCK_M < n_valid, n_end, 0)  # a block past the set's length: no columns
    for n0 in range(pid_s * cols_per_split, n_end, BLOCK_N):
        offs_n = n0 + cols_n
        mask_n = offs_n < n_end
        sq_n = tl.load(p_sq + pid_b * N + offs_n, mask=mask_n, other=0.0)
        b_d2 = _tile(p_x_set, p_d + pid_b * N * N, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n,
                     N, C, inv_C, BLOCK_M, BLOCK_N, BLOCK_C, TIE, UPCAST, FROM_D)
        if WITH_IDS:
            b_far = tl.maximum(b_far, tl.max(tl.where(mask_n[None, :], b_d2, 0.0), axis=1))
        b_d2 = tl.where(mask_n[None, :], b_d2, float("inf"))
        for _ in tl.static_range(K):
            b_cand = tl.min(b_d2, axis=1)
            b_at = tl.argmin(b_d2, axis=1)
            b_d2 = tl.where(cols_n[None, :] == b_at[:, None], float("inf"), b_d2)
            b_worst = tl.max(b_best, axis=1)
            m_replace = (cols_k[None, :] == tl.argmax(b_best, axis=1)[:, None]) & (b_cand < b_worst)[:, None]
            b_best = tl.where(m_replace, b_cand[:, None], b_best)
            if WITH_IDS:
                b_ids = tl.where(m_replace, (n0 + b_at).to(tl.int32)[:, None], b_ids)  # n0 is int64 for int64 lengths
    p_out = ((pid_b * tl.num_programs(2) + pid_s) * N + offs_m[:, None]) * K + cols_k[None, :]
    m_out = (offs_m[:, None] < N) & (cols_k[None, :] < K)
    tl.store(p_best + p_out, b_best, mask=m_out)
    if WITH_IDS:
        tl.store(p_ids + p_out, b_ids, mask=m_out)
        tl.store(p_far + (pid_b * tl.num_programs(2) + pid_s) * N + offs_m, b_far, mask=offs_m < N)


def knn_config(N: int, C: int, dtype: torch.dtype, with_ids: bool) -> dict:
    """distance.launch_config; with the ids and farthest distances, fp32 points take 4 warps (at 8 they spill 8 bytes
    on sm_80 and sm_90; at 4, 254 registers and no spill: bench/kernel_resources.py)."""
    blocks = launch_config(N, C, dtype)
    if with_ids and dtype == torch.float32:
        blocks["num_warps"] = 4
    return blocks


def _launch_knn(points, sq, lengths, k, splits, cols_per_split, distances, with_ids: bool):
    B, N, C = points.shape
    blocks = knn_config(N, C, points.dtype, with_ids)
    best = torch.empty(B, splits, N, k, dtype=torch.float32, device=points.device)
    ids = torch.empty(B, splits, N, k, dtype=torch.int32, device=points.device) if with_ids else best
    far = torch.empty(B, splits, N, dtype=torch.float32, device=points.device) if with_ids else best
    grid = (B, triton.cdiv(N, blocks["BLOCK_M"]), splits)
    _knn_density_kernel[grid](points, sq, lengths, best, sq if distances is None else distances, ids, far, N, C,
                              *points.stride(), 1.0 / C, cols_per_split, K=k, K_PAD=max(2, triton.next_power_of_2(k)),
                              TIE=TIE_EPS, FROM_D=distances is not None, WITH_IDS=with_ids, **blocks)
    return best, ids, far


def launch_knn_best(points: torch.Tensor, sq: torch.Tensor, lengths: torch.Tensor, k: int, splits: int,
                    cols_per_split: int, distances: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The k smallest squared distances of every point within each column split, [B, splits, N, k] fp32; read from
    `distances` (D [B, N, N], kernels/gram.py) when given, else computed."""
    return _launch_knn(points, sq, lengths, k, splits, cols_per_split, distances, False)[0]


def launch_knn_lists(points: torch.Tensor, sq: torch.Tensor, lengths: torch.Tensor, k: int, splits: int,
                     cols_per_split: int, distances: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """launch_knn_best's distances, their columns [B, splits, N, k] int32 (-1 where a split holds fewer than k) and
    each row's farthest valid distance in the split [B, splits, N]: one pass."""
    return _launch_knn(points, sq, lengths, k, splits, cols_per_split, distances, True)


def knn_density(x: torch.Tensor, k: int, *, valid_len: Optional[torch.Tensor] = None, check: bool = True,
                prepared: Optional[PreparedPoints] = None, splits: Optional[int] = None,
                distances: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rho [B, N] fp32 of the point sets x [B, N, C]; 0 past valid_len. `prepared` may pass prepare_points(x) shared
    with other ops; `splits` fixes the number of column splits (default: enough programs to fill the GPU, 1 in the
    interpreter); `distances` (gram.py's D [B, N, N] of these points, contiguous) is read instead of recomputed."""
    if check:
        check_points(x, valid_len, k=k)
    require_kernel_device(x, valid_len)
    B, N, C = x.shape
    points, sq = prepare_points(x, valid_len) if prepared is None else prepared
    blocks = launch_config(N, C, points.dtype)
    splits, cols_per_split = column_splits(x, blocks, splits)
    k = min(k, N)  # no set has more neighbours (same result; a smaller unrolled loop)
    from .library import knn_best

    best = knn_best(points, sq, lengths_i32(x, valid_len), k, splits, cols_per_split, distances)
    # Sorted, so the sum's order (hence its rounding) does not depend on how tiles and splits found the k nearest.
    nearest = best.permute(0, 2, 1, 3).reshape(B, N, splits * k)
    nearest = nearest.topk(k, dim=-1, largest=False).values if splits > 1 else nearest.sort(dim=-1).values
    finite = torch.isfinite(nearest)
    total = torch.where(finite, nearest, torch.zeros_like(nearest)).sum(-1)
    rho = torch.exp(-total / finite.sum(-1).clamp_min(1))
    valid = valid_mask(x, valid_len)
    return torch.where(valid, rho, torch.zeros_like(rho))

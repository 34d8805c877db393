"""delta_i = min d(i, j) over j of higher density; the densest point gets its largest distance (DESIGN 4).

"Higher density": rho_j > rho_i, or rho_j == rho_i and j < i (deterministic; the official code adds noise instead).
Streams column tiles like the density kernel, keeping a running minimum over higher-density columns and a running
maximum over all columns per row; column splits write partial [B, S, N] minima and maxima that torch reduces, and
the densest point takes the set's largest distance (the maximum of the row maxima), as the official DPC-KNN does.
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
def _precedes_rows(rho_j, j, rho_i, i):
    """[M, K]: point j (one per entry) is denser than row i: rho_j > rho_i, or equal and j < i (DESIGN section 4)."""
    return (rho_j > rho_i[:, None]) | ((rho_j == rho_i[:, None]) & (j < i[:, None]))


@triton.jit
def _density_delta_kernel(p_x, p_sq, p_rho, p_len, p_near, p_far, p_d, p_nbr_d, p_nbr_id, N, C, stride_b, stride_n,
                          stride_c, inv_C, cols_per_split,
                          TIE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          UPCAST: tl.constexpr, FROM_D: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                          FROM_LIST: tl.constexpr):
    """FROM_LIST: each row first looks for a denser point among its k nearest (p_nbr_d / p_nbr_id [B, N, K]); where
    one is there, the nearest such is the nearest denser point of the whole set (every other point is at least as far
    as the k-th nearest), and a block of rows that all found one skips the column pass. p_far is then unused (the
    kNN pass wrote the rows' farthest distances)."""
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    pid_s = tl.program_id(2)
    n_valid = tl.load(p_len + pid_b)
    p_x_set = p_x + pid_b * stride_b
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
    rho_m = tl.load(p_rho + pid_b * N + offs_m, mask=mask_m, other=0.0)
    b_nearest_higher = tl.full([BLOCK_M], float("inf"), tl.float32)
    b_farthest = tl.zeros([BLOCK_M], tl.float32)
    n_start = pid_s * cols_per_split
    n_end = tl.minimum((pid_s + 1) * cols_per_split, n_valid)
    n_end = tl.where(tl.program_id(1) * BLOCK_M < n_valid, n_end, n_start)  # a block past the set's length
    if FROM_LIST:
        cols_k = tl.arange(0, K_PAD)
        m_list = mask_m[:, None] & (cols_k[None, :] < K)
        p_list = (pid_b * N + offs_m[:, None]) * K + cols_k[None, :]
        b_ids = tl.load(p_nbr_id + p_list, mask=m_list, other=-1)
        m_list = m_list & (b_ids >= 0) & (b_ids < n_valid)
        rho_ids = tl.load(p_rho + pid_b * N + b_ids, mask=m_list, other=0.0)
        m_denser = m_list & _precedes_rows(rho_ids, b_ids, rho_m, offs_m)
        b_list = tl.load(p_nbr_d + p_list, mask=m_denser, other=float("inf"))
        b_nearest_higher = tl.min(tl.where(m_denser, b_list, float("inf")), axis=1)
        needs_pass = tl.max((mask_m & (b_nearest_higher == float("inf"))).to(tl.int32), axis=0)
        n_end = tl.where(needs_pass > 0, n_end, n_start)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        sq_n = tl.load(p_sq + pid_b * N + offs_n, mask=mask_n, other=0.0)
        rho_n = tl.load(p_rho + pid_b * N + offs_n, mask=mask_n, other=0.0)
        b_d2 = _tile(p_x_set, p_d + pid_b * N * N, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n,
                     N, C, inv_C, BLOCK_M, BLOCK_N, BLOCK_C, TIE, UPCAST, FROM_D)
        m_higher = (rho_n[None, :] > rho_m[:, None]) | \
            ((rho_n[None, :] == rho_m[:, None]) & (offs_n[None, :] < offs_m[:, None]))
        m_higher = m_higher & mask_n[None, :]
        b_nearest_higher = tl.minimum(b_nearest_higher, tl.min(tl.where(m_higher, b_d2, float("inf")), axis=1))
        b_farthest = tl.maximum(b_farthest, tl.max(tl.where(mask_n[None, :], b_d2, 0.0), axis=1))
    p_out = (pid_b * tl.num_programs(2) + pid_s) * N + offs_m
    tl.store(p_near + p_out, b_nearest_higher, mask=offs_m < N)
    tl.store(p_far + p_out, b_farthest, mask=offs_m < N)


def launch_delta_near_far(points: torch.Tensor, sq: torch.Tensor, rho: torch.Tensor, lengths: torch.Tensor,
                          splits: int, cols_per_split: int, distances: Optional[torch.Tensor] = None,
                          neighbours: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column split: the squared distance to the nearest denser point and to the farthest point, [B, splits, N]
    fp32 each; read from `distances` (D [B, N, N], kernels/gram.py) when given, else computed. `neighbours`: each
    point's k nearest (squared distances [B, N, k] fp32, ids [B, N, k] int32, -1 padded): rows with a denser one
    among them take it, and only blocks with a row that has none run the pass (`far` is then not complete)."""
    B, N, C = points.shape
    blocks = launch_config(N, C, points.dtype)
    near = torch.empty(B, splits, N, dtype=torch.float32, device=points.device)
    far = torch.empty_like(near)
    nbr_d, nbr_id = neighbours if neighbours is not None else (near, near)
    k = nbr_d.shape[-1] if neighbours is not None else 1
    grid = (B, triton.cdiv(N, blocks["BLOCK_M"]), splits)
    _density_delta_kernel[grid](points, sq, rho, lengths, near, far, sq if distances is None else distances, nbr_d,
                                nbr_id, N, C, *points.stride(), 1.0 / C, cols_per_split, TIE=TIE_EPS,
                                FROM_D=distances is not None, K=k, K_PAD=max(2, triton.next_power_of_2(k)),
                                FROM_LIST=neighbours is not None, **blocks)
    return near, far


def density_delta(x: torch.Tensor, rho: torch.Tensor, *, valid_len: Optional[torch.Tensor] = None,
                  check: bool = True, prepared: Optional[PreparedPoints] = None,
                  splits: Optional[int] = None, distances: Optional[torch.Tensor] = None) -> torch.Tensor:
    """delta [B, N] fp32 for x [B, N, C] and its densities rho [B, N]; 0 past valid_len. The densest point gets the
    largest distance in its set. `prepared`, `splits`, `distances`: see knn_density."""
    if check:
        check_points(x, valid_len)
        if rho.shape != x.shape[:2] or rho.dtype != torch.float32:
            raise ValueError(f"rho must be fp32 of shape {tuple(x.shape[:2])}, got {rho.dtype} {tuple(rho.shape)}")
    require_kernel_device(x, rho, valid_len)
    B, N, C = x.shape
    points, sq = prepare_points(x, valid_len) if prepared is None else prepared
    blocks = launch_config(N, C, points.dtype)
    splits, cols_per_split = column_splits(x, blocks, splits)
    from .library import delta_near_far

    near, far = delta_near_far(points, sq, rho.contiguous(), lengths_i32(x, valid_len), splits, cols_per_split,
                               distances)
    valid = valid_mask(x, valid_len)
    near = near.amin(1)
    set_far = torch.where(valid, far.amax(1), torch.zeros_like(near)).amax(1, keepdim=True)
    delta = torch.where(torch.isinf(near), set_far.expand(B, N), near).sqrt()
    return torch.where(valid, delta, torch.zeros_like(delta))

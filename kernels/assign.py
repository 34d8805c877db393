"""Assignment: every point to its nearest centre (lowest centre rank on ties), each centre to itself (DESIGN 4).

A tie is a squared distance within TIE_EPS * (||x_i||^2 + ||c||^2) / C of the smallest (common.TIE_EPS): the norm
expansion's rounding depends on the order of its sums, which differs between Triton versions, tile shapes and the
reference, so exact equality would let rounding, not the rank rule, decide between equidistant centres.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TIE_EPS, check_points
from .distance import PreparedPoints, _sq_dist_tile, launch_config, lengths_i32, prepare_points, require_kernel_device


@triton.jit
def _centre_block_d2(p_x, p_sq, p_centers, pid_b, N, C, L, l0, offs_m, mask_m, sq_m, stride_n, stride_c, inv_C,
                     TIE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                     UPCAST: tl.constexpr):
    """Scaled squared distances of rows offs_m to the centres of ranks l0 .. l0 + BLOCK_L (inf past L), the ranks,
    the centres' point ids, and the tie slack TIE * (||x_i||^2 + ||c_l||^2) / C of each pair."""
    ranks = l0 + tl.arange(0, BLOCK_L)
    mask_l = ranks < L
    centers = tl.load(p_centers + pid_b * L + ranks, mask=mask_l, other=0).to(tl.int32)
    sq_l = tl.load(p_sq + pid_b * N + centers, mask=mask_l, other=0.0)
    b_d2 = _sq_dist_tile(p_x, stride_n, stride_c, offs_m, centers, mask_m, mask_l, sq_m, sq_l, C, inv_C,
                         BLOCK_M, BLOCK_L, BLOCK_C, TIE, UPCAST)
    b_d2 = tl.where(mask_l[None, :], b_d2, float("inf"))
    b_slack = (sq_m[:, None] + sq_l[None, :]) * (TIE * inv_C)
    return b_d2, b_slack, ranks, centers, mask_l


@triton.jit
def _assign_kernel(p_x, p_sq, p_len, p_centers, p_best, p_assign, N, C, L, stride_b, stride_n, stride_c, inv_C,
                   TIE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                   UPCAST: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: all centres in one tile, both steps at once. L past one tile: MODE 1 writes each row's smallest
    distance to p_best, then MODE 2 (a second launch) picks the tie from it (one tile live at a time: no spills)."""
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    n_valid = tl.load(p_len + pid_b)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
    p_set = p_x + pid_b * stride_b
    C = tl.where(tl.program_id(1) * BLOCK_M < n_valid, C, 0)  # a block past the set's length: no channel loop
    # The nearest centre is the lowest rank within the tie slack of the row's smallest distance: ties are decided
    # by this explicit comparison, never by which of two rounded values came out smaller, nor by argmin.
    if MODE == 1:
        best_d2 = tl.full([BLOCK_M], float("inf"), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            b_d2, b_slack, ranks, centers, mask_l = _centre_block_d2(
                p_set, p_sq, p_centers, pid_b, N, C, L, l0, offs_m, mask_m, sq_m, stride_n, stride_c, inv_C,
                TIE, BLOCK_M, BLOCK_L, BLOCK_C, UPCAST)
            block_min = tl.min(b_d2, axis=1)
            best_d2 = tl.where(block_min < best_d2, block_min, best_d2)
        tl.store(p_best + pid_b * N + offs_m, best_d2, mask=offs_m < N)
    else:
        if MODE == 0:
            b_d2, b_slack, ranks, centers, mask_l = _centre_block_d2(
                p_set, p_sq, p_centers, pid_b, N, C, L, 0, offs_m, mask_m, sq_m, stride_n, stride_c, inv_C,
                TIE, BLOCK_M, BLOCK_L, BLOCK_C, UPCAST)
            best_d2 = tl.min(b_d2, axis=1)
            nearest = tl.min(tl.where(b_d2 <= best_d2[:, None] + b_slack, ranks[None, :], L), axis=1)
            is_centre = (offs_m[:, None] == centers[None, :]) & mask_l[None, :]
            own_rank = tl.max(tl.where(is_centre, ranks[None, :], -1), axis=1)
        else:
            best_d2 = tl.load(p_best + pid_b * N + offs_m, mask=offs_m < N, other=float("inf"))
            nearest = tl.full([BLOCK_M], L, tl.int32)
            own_rank = tl.full([BLOCK_M], -1, tl.int32)
            for l0 in range(0, L, BLOCK_L):
                b_d2, b_slack, ranks, centers, mask_l = _centre_block_d2(
                    p_set, p_sq, p_centers, pid_b, N, C, L, l0, offs_m, mask_m, sq_m, stride_n, stride_c, inv_C,
                    TIE, BLOCK_M, BLOCK_L, BLOCK_C, UPCAST)
                tied = b_d2 <= best_d2[:, None] + b_slack
                nearest = tl.minimum(nearest, tl.min(tl.where(tied, ranks[None, :], L), axis=1))
                is_centre = (offs_m[:, None] == centers[None, :]) & mask_l[None, :]
                own_rank = tl.maximum(own_rank, tl.max(tl.where(is_centre, ranks[None, :], -1), axis=1))
        b_assign = tl.where(own_rank >= 0, own_rank, nearest)
        tl.store(p_assign + pid_b * N + offs_m, tl.where(mask_m, b_assign, -1).to(tl.int64), mask=offs_m < N)


MAX_CENTRE_BLOCK = 64  # centres per distance tile: any L compiles to the same registers


def centre_block(L: int) -> int:
    """Centres per tile: L rounded up to a power of two (>= 16 for tl.dot), at most MAX_CENTRE_BLOCK."""
    return min(MAX_CENTRE_BLOCK, max(16, triton.next_power_of_2(L)))


def launch_assign(points: torch.Tensor, sq: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor
                  ) -> torch.Tensor:
    """Cluster rank of every point [B, N] int64 (-1 past its set's length): one launch up to MAX_CENTRE_BLOCK
    centres, two beyond (smallest distance, then the lowest rank within the tie slack)."""
    B, N, C = points.shape
    L = centers.shape[1]
    assignment = torch.empty(B, N, dtype=torch.int64, device=points.device)
    blocks = launch_config(N, C, points.dtype)
    grid = (B, triton.cdiv(N, blocks["BLOCK_M"]))
    block_l = centre_block(L)
    args = (points, sq, lengths, centers)
    tail = (N, C, L, *points.stride(), 1.0 / C)
    options = dict(TIE=TIE_EPS, BLOCK_M=blocks["BLOCK_M"], BLOCK_L=block_l, BLOCK_C=blocks["BLOCK_C"],
                   UPCAST=blocks["UPCAST"], num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])
    if L <= block_l:
        _assign_kernel[grid](*args, assignment, assignment, *tail, MODE=0, **options)  # p_best unused
    else:
        best = torch.empty(B, N, dtype=torch.float32, device=points.device)
        _assign_kernel[grid](*args, best, assignment, *tail, MODE=1, **options)
        _assign_kernel[grid](*args, best, assignment, *tail, MODE=2, **options)
    return assignment


def assign_to_centers(x: torch.Tensor, centers: torch.Tensor, *, valid_len: Optional[torch.Tensor] = None,
                      check: bool = True, prepared: Optional[PreparedPoints] = None) -> torch.Tensor:
    """Cluster rank of every point [B, N] int64 (-1 past valid_len); centers: [B, L] point ids."""
    if check:
        check_points(x, valid_len, num_clusters=centers.shape[-1] if centers.dim() == 2 else None)
        if centers.dim() != 2 or centers.shape[0] != x.shape[0]:
            raise ValueError(f"centers must be [B={x.shape[0]}, L], got shape {tuple(centers.shape)}")
        n = valid_len if valid_len is not None else torch.full_like(centers[:, 0], x.shape[1])
        if bool(((centers < 0) | (centers >= n.to(centers.device)[:, None])).any()):
            raise ValueError("centers holds ids outside [0, valid_len) of their set")
    require_kernel_device(x, centers, valid_len)
    from .library import assign

    points, sq = prepare_points(x, valid_len) if prepared is None else prepared
    return assign(points, sq, lengths_i32(x, valid_len), centers.contiguous())

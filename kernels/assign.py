"""Assignment: every point to its nearest centre (lowest centre rank on ties), each centre to itself (DESIGN 4)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TIE_EPS, check_points
from .distance import PreparedPoints, _sq_dist_tile, launch_config, lengths_i32, prepare_points, require_kernel_device


@triton.jit
def _assign_kernel(p_x, p_sq, p_len, p_centers, p_assign, N, C, L, stride_b, stride_n, stride_c, inv_C,
                   TIE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    n_valid = tl.load(p_len + pid_b)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
    best_d2 = tl.full([BLOCK_M], float("inf"), tl.float32)
    nearest = tl.zeros([BLOCK_M], tl.int32)
    own_rank = tl.full([BLOCK_M], -1, tl.int32)
    # Centres in blocks of BLOCK_L ranks; a later block wins only when strictly nearer (lowest rank on ties).
    for l0 in range(0, L, BLOCK_L):
        ranks = l0 + tl.arange(0, BLOCK_L)
        mask_l = ranks < L
        centers = tl.load(p_centers + pid_b * L + ranks, mask=mask_l, other=0).to(tl.int32)
        sq_l = tl.load(p_sq + pid_b * N + centers, mask=mask_l, other=0.0)
        b_d2 = _sq_dist_tile(p_x + pid_b * stride_b, stride_n, stride_c, offs_m, centers, mask_m, mask_l, sq_m,
                             sq_l, C, inv_C, BLOCK_M, BLOCK_L, BLOCK_C, TIE, UPCAST)
        b_d2 = tl.where(mask_l[None, :], b_d2, float("inf"))
        block_min = tl.min(b_d2, axis=1)
        block_arg = tl.argmin(b_d2, axis=1, tie_break_left=True).to(tl.int32) + l0
        nearer = block_min < best_d2
        nearest = tl.where(nearer, block_arg, nearest)
        best_d2 = tl.where(nearer, block_min, best_d2)
        is_centre = (offs_m[:, None] == centers[None, :]) & mask_l[None, :]
        own_rank = tl.maximum(own_rank, tl.max(tl.where(is_centre, ranks[None, :], -1), axis=1))
    b_assign = tl.where(own_rank >= 0, own_rank, nearest)
    tl.store(p_assign + pid_b * N + offs_m, tl.where(mask_m, b_assign, -1).to(tl.int64), mask=offs_m < N)


MAX_CENTRE_BLOCK = 64  # centres per distance tile: any L compiles to the same registers


def centre_block(L: int) -> int:
    """Centres per tile: L rounded up to a power of two (>= 16 for tl.dot), at most MAX_CENTRE_BLOCK."""
    return min(MAX_CENTRE_BLOCK, max(16, triton.next_power_of_2(L)))


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
    B, N, C = x.shape
    L = centers.shape[1]
    points, sq = prepare_points(x, valid_len) if prepared is None else prepared
    assignment = torch.empty(B, N, dtype=torch.int64, device=x.device)
    blocks = launch_config(N, C, points.dtype)
    grid = (B, triton.cdiv(N, blocks["BLOCK_M"]))
    _assign_kernel[grid](points, sq, lengths_i32(x, valid_len), centers.contiguous(), assignment, N, C, L,
                         *points.stride(), 1.0 / C, TIE=TIE_EPS, BLOCK_M=blocks["BLOCK_M"], BLOCK_L=centre_block(L),
                         BLOCK_C=blocks["BLOCK_C"], UPCAST=blocks["UPCAST"], num_warps=blocks["num_warps"],
                         num_stages=blocks["num_stages"])
    return assignment

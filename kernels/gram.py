"""DPC-KNN v2 (issue 12): the distance matrix computed once, then density, delta and assignment as light passes.

v1 (knn_density.py, density_delta.py, assign.py) recomputes every distance tile in each of its three passes: three
times the Gram's FLOPs, and x re-read per column tile each time. Here one launch computes the scaled squared
distances D[i, j] of DESIGN section 4 (as `_sq_dist_tile`: fp32 accumulation of the centred points, the
TIE_EPS snap, 0 on the diagonal) with large tiles, only the upper triangle of tiles (D is symmetric, so each tile is
stored twice and computed once: half the Gram's FLOPs) and no tile past a set's valid length. v1's density and
delta kernels then read D's tiles instead of computing them (`distances=`), and the assignment is a gather of the
centres' columns of D, which is B x N x N x 4 bytes.

When that passes `max_bytes` (a long video: T = 16,384 frames would be 1 GiB), D is made in row panels of at most
`max_bytes` each: memory stays O(points + panel), at the price of computing the panels twice (density, then delta,
as torch passes over each panel; the assignment then runs v1's kernel, whose work is N x L, not N x N).

Split-C: a short video has few tiles (T = 200 frames: 3 of 128 x 128), far fewer than a GPU's SMs, each looping over
all C = 22,528 channels. Then (channel_splits) the channels are split in S ranges: one launch stores each tile's
partial dot products per range, a second sums them in a fixed order (deterministic, no atomics) and applies the same
epilogue and stores. D then differs from the unsplit launch's only in fp32 summation order.

Semantics are v1's and the reference's (the tie rules, the snap, the densest point's delta). The distances differ
from v1's only in summation order (BLOCK_C, channel splits), within fp32 rounding.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .common import (TIE_EPS, DPCResult, check_points, gpu_split_sms, interpreter_active, interpreter_tiles,
                     pool_weights, valid_mask)
from .density_delta import density_delta
from .distance import PreparedPoints, _dot_tile, _sq_dist_from_dot, lengths_i32, prepare_points, require_kernel_device
from .knn_density import knn_density

# D above this many bytes is made in row panels (module doc).
MAX_DISTANCE_BYTES = 256 * 2 ** 20
# Split-C (channel_splits): each split covers at least this many channel blocks, and the partial dot products of
# all splits stay within PARTIAL_BYTES.
MIN_SPLIT_BLOCKS = 8
PARTIAL_BYTES = 64 * 2 ** 20


@triton.jit
def _gram_tile(p_len, pid_b, pid_m, pid_n, row0, rows, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """(active, offs_m, offs_n, mask_m, mask_n) of D's tile (pid_m, pid_n) of set pid_b: inactive past the set's
    valid length and, SYMMETRIC, below the diagonal."""
    n_valid = tl.load(p_len + pid_b)
    active = (row0 + pid_m * BLOCK < n_valid) & (pid_n * BLOCK < n_valid)
    if SYMMETRIC:
        active = active & (pid_n >= pid_m)
    offs_m = row0 + pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    return active, offs_m, offs_n, offs_m < tl.minimum(n_valid, row0 + rows), offs_n < n_valid


@triton.jit
def _store_distances(p_d, sq_m, sq_n, pid_b, b_dot, offs_m, offs_n, mask_m, mask_n, N, row0, rows, inv_C,
                     SYMMETRIC: tl.constexpr, TIE: tl.constexpr):
    """D's tile from its dot products and the norms sq_m, sq_n (_sq_dist_from_dot), stored. SYMMETRIC: its upper
    triangle and the mirror of it, so D is exactly symmetric, diagonal tiles included."""
    b_d2 = _sq_dist_from_dot(b_dot, sq_m, sq_n, offs_m, offs_n, inv_C, TIE)
    p_set = p_d + pid_b * rows * N
    m_store = mask_m[:, None] & mask_n[None, :]
    if SYMMETRIC:
        m_upper = offs_n[None, :] >= offs_m[:, None]
        tl.store(p_set + offs_m[:, None] * N + offs_n[None, :], b_d2, mask=m_store & m_upper)
        tl.store(p_set + offs_n[None, :] * N + offs_m[:, None], b_d2,
                 mask=m_store & (offs_n[None, :] > offs_m[:, None]))
    else:
        tl.store(p_set + (offs_m - row0)[:, None] * N + offs_n[None, :], b_d2, mask=m_store)


@triton.jit
def _sq_dist_matrix_kernel(p_x, p_sq, p_len, p_d, N, C, row0, rows, stride_b, stride_n, stride_c, inv_C,
                           SYMMETRIC: tl.constexpr, TIE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                           UPCAST: tl.constexpr):
    """D[b, i - row0, j] for rows row0 <= i < row0 + rows and every column j < N of set b. SYMMETRIC (row0 = 0,
    rows = N): only tiles on or above the diagonal run, each storing its upper triangle and the mirror of it.
    Tiles wholly past the set's valid length do nothing (the launcher fills D with +inf first)."""
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    active, offs_m, offs_n, mask_m, mask_n = _gram_tile(p_len, pid_b, tl.program_id(1), tl.program_id(2), row0,
                                                        rows, SYMMETRIC, BLOCK)
    if active:  # the norms loaded before the channel loop: 183 registers on sm_90 (bf16), 210 if after
        sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
        sq_n = tl.load(p_sq + pid_b * N + offs_n, mask=mask_n, other=0.0)
        b_dot = _dot_tile(p_x + pid_b * stride_b, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, 0, C,
                          BLOCK, BLOCK, BLOCK_C, UPCAST)
        _store_distances(p_d, sq_m, sq_n, pid_b, b_dot, offs_m, offs_n, mask_m, mask_n, N, row0, rows, inv_C, SYMMETRIC,
                         TIE)


@triton.jit
def _sq_dot_split_kernel(p_x, p_len, p_part, B, N, C, row0, rows, chans_per_split, stride_b, stride_n, stride_c,
                         SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Split-C, launch 1: partial[s, b, i - row0, j] = <x_i, x_j> over channel split s (program s * B + b on the
    first axis), for the tiles that _sq_dist_matrix_kernel runs; the rest of `partial` is never written."""
    pid_s = tl.program_id(0) // B
    pid_b = (tl.program_id(0) % B).to(tl.int64)
    active, offs_m, offs_n, mask_m, mask_n = _gram_tile(p_len, pid_b, tl.program_id(1), tl.program_id(2), row0,
                                                        rows, SYMMETRIC, BLOCK)
    if active:
        c_begin = pid_s * chans_per_split
        b_dot = _dot_tile(p_x + pid_b * stride_b, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, c_begin,
                          tl.minimum(C, c_begin + chans_per_split), BLOCK, BLOCK, BLOCK_C, UPCAST)
        p_tile = p_part + (pid_s * B + pid_b) * rows * N + (offs_m - row0)[:, None] * N + offs_n[None, :]
        tl.store(p_tile, b_dot, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sq_dist_reduce_kernel(p_part, p_sq, p_len, p_d, S, split_stride, N, row0, rows, inv_C,
                           SYMMETRIC: tl.constexpr, TIE: tl.constexpr, BLOCK: tl.constexpr):
    """Split-C, launch 2: each tile's S partial dot products summed in the order s = 0 .. S - 1 (deterministic),
    then stored as _sq_dist_matrix_kernel stores them."""
    pid_b = tl.program_id(0).to(tl.int64)
    active, offs_m, offs_n, mask_m, mask_n = _gram_tile(p_len, pid_b, tl.program_id(1), tl.program_id(2), row0,
                                                        rows, SYMMETRIC, BLOCK)
    if active:
        m_tile = mask_m[:, None] & mask_n[None, :]
        offs_tile = (offs_m - row0)[:, None] * N + offs_n[None, :]
        p_split = p_part + pid_b * rows * N
        b_dot = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for _ in range(S):
            b_dot += tl.load(p_split + offs_tile, mask=m_tile, other=0.0)
            p_split += split_stride  # a scalar pointer step: S x B x rows x N may pass 2**31
        sq_m = tl.load(p_sq + pid_b * N + offs_m, mask=mask_m, other=0.0)
        sq_n = tl.load(p_sq + pid_b * N + offs_n, mask=mask_n, other=0.0)
        _store_distances(p_d, sq_m, sq_n, pid_b, b_dot, offs_m, offs_n, mask_m, mask_n, N, row0, rows, inv_C, SYMMETRIC,
                         TIE)


def gram_config(N: int, C: int, dtype: torch.dtype) -> dict:
    """Tiles of the distance-matrix launch. GPU: 128 x 128 tiles over 64 channels for 16-bit points (tensor
    cores, 3 stages), 64 x 64 over 32 for fp32 (exact fp32 dots on FMA units); 8 warps; channel splits when the
    tiles are few (channel_splits). Not measured on a GPU yet. Interpreter: few wide tiles (it pays per operation)."""
    if interpreter_tiles():
        block, block_c = min(256, triton.next_power_of_2(N)), 1024
    else:
        block = 128 if dtype != torch.float32 else 64
        block = min(block, triton.next_power_of_2(N))
        block_c = 32 if dtype == torch.float32 else 64
    block = max(16, block)
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    return dict(BLOCK=block, BLOCK_C=block_c, UPCAST=interpreter_active(), num_warps=8,
                num_stages=1 if dtype == torch.float32 else 3)


def channel_splits(B: int, rows: int, N: int, C: int, cfg: dict, device: torch.device,
                   splits: Optional[int] = None) -> tuple[int, int]:
    """(number of channel splits S, channels per split: whole BLOCK_C blocks) of D's rows [B, rows, N].

    Default: 1 when the active tiles (B x the upper triangle's tiles for the whole matrix, B x row tiles x column
    tiles for a row panel) fill the SMs (common.gpu_split_sms; always in the plain interpreter). Fewer tiles: S
    such that tiles x S reaches twice the SM count, but each split at least MIN_SPLIT_BLOCKS channel blocks and the
    partial sums (S x B x rows x N fp32) within PARTIAL_BYTES. `splits` forces S (clamped to 1 .. channel blocks).
    S is then the fewest splits of cdiv(blocks, S) blocks each (the last may hold fewer): none is empty.
    """
    blocks_c = triton.cdiv(C, cfg["BLOCK_C"])
    if splits is None:
        sms = gpu_split_sms(device)
        row_tiles, col_tiles = triton.cdiv(rows, cfg["BLOCK"]), triton.cdiv(N, cfg["BLOCK"])
        tiles = B * (col_tiles * (col_tiles + 1) // 2 if rows == N else row_tiles * col_tiles)
        splits = 1
        if sms is not None and tiles < sms:
            splits = min(triton.cdiv(2 * sms, tiles), blocks_c // MIN_SPLIT_BLOCKS,
                         PARTIAL_BYTES // (B * rows * N * 4))
    blocks_per_split = triton.cdiv(blocks_c, max(1, int(splits)))   # more splits than blocks: one block each
    return triton.cdiv(blocks_c, blocks_per_split), blocks_per_split * cfg["BLOCK_C"]


def reduce_warps(block: int) -> int:
    """Warps of the split-C reduce over BLOCK x BLOCK fp32 tiles: 8, or 16 for 128 x 128 (at 8 warps its 64 values
    per thread took 254 registers on sm_90, 128 at 16)."""
    return max(8, block * block // (32 * 32))


def launch_sq_dist_matrix(points: torch.Tensor, sq: torch.Tensor, lengths: torch.Tensor, row0: int = 0,
                          rows: Optional[int] = None, splits: Optional[int] = None) -> torch.Tensor:
    """D [B, rows, N] fp32 for rows row0 .. row0 + rows (default all: then symmetric launches); +inf in every row
    and column past a set's valid length (the tiles skip them; the output starts filled). `splits`: channel_splits'
    S (default its rule); S > 1 adds a partial buffer [S, B, rows, N] and a reduce launch."""
    B, N, C = points.shape
    rows = N - row0 if rows is None else rows
    symmetric = row0 == 0 and rows == N
    cfg = gram_config(N, C, points.dtype)
    splits, chans_per_split = channel_splits(B, rows, N, C, cfg, points.device, splits)
    block = cfg.pop("BLOCK")
    d = torch.full((B, rows, N), float("inf"), dtype=torch.float32, device=points.device)
    grid = (B, triton.cdiv(rows, block), triton.cdiv(N, block))
    if splits == 1:
        _sq_dist_matrix_kernel[grid](points, sq, lengths, d, N, C, row0, rows, *points.stride(), 1.0 / C,
                                     SYMMETRIC=symmetric, TIE=TIE_EPS, BLOCK=block, **cfg)
        return d
    partial = torch.empty((splits, B, rows, N), dtype=torch.float32, device=points.device)
    _sq_dot_split_kernel[(splits * B,) + grid[1:]](points, lengths, partial, B, N, C, row0, rows, chans_per_split,
                                                  *points.stride(), SYMMETRIC=symmetric, BLOCK=block, **cfg)
    _sq_dist_reduce_kernel[grid](partial, sq, lengths, d, splits, B * rows * N, N, row0, rows, 1.0 / C,
                                 SYMMETRIC=symmetric, TIE=TIE_EPS, BLOCK=block, num_warps=reduce_warps(block))
    return d


def sq_dist_matrix(x: torch.Tensor, *, valid_len: Optional[torch.Tensor] = None, check: bool = True,
                   prepared: Optional[PreparedPoints] = None) -> torch.Tensor:
    """The scaled squared distances [B, N, N] fp32 of DESIGN section 4 (reference.pairwise_sq_dist), +inf in every
    row and column past valid_len."""
    if check:
        check_points(x, valid_len)
    require_kernel_device(x, valid_len)
    points, sq = prepare_points(x, valid_len) if prepared is None else prepared
    from .library import sq_dist_rows

    return sq_dist_rows(points, sq, lengths_i32(x, valid_len), 0, x.shape[1])


def _panels(points, sq, lengths, max_bytes: int) -> tuple[int, Iterator]:
    """(rows per panel, a function yielding (row0, D rows [B, P, N]) over the whole matrix)."""
    from .library import sq_dist_rows

    B, N, _ = points.shape
    rows = max(1, min(N, max_bytes // max(1, B * N * 4)))

    def panels():
        for row0 in range(0, N, rows):
            yield row0, sq_dist_rows(points, sq, lengths, row0, min(rows, N - row0))

    return rows, panels


def _density(d: torch.Tensor, col_valid: torch.Tensor, k: int) -> torch.Tensor:
    """exp(-mean of the k smallest valid entries of each row), summed in ascending order (as v1)."""
    masked = torch.where(col_valid[:, None, :], d, float("inf"))
    nearest = masked.topk(min(k, d.shape[-1]), dim=-1, largest=False, sorted=True).values
    finite = torch.isfinite(nearest)
    total = torch.where(finite, nearest, torch.zeros_like(nearest)).sum(-1)
    return torch.exp(-total / finite.sum(-1).clamp_min(1))


def _near_far(d: torch.Tensor, row0: int, rho: torch.Tensor, col_valid: torch.Tensor):
    """Per row of the panel d [B, P, N]: the squared distance to the nearest denser point (inf if none) and to the
    farthest valid point."""
    B, P, N = d.shape
    rows = torch.arange(row0, row0 + P, device=d.device)
    cols = torch.arange(N, device=d.device)
    rho_i, rho_j = rho[:, row0:row0 + P, None], rho[:, None, :]
    higher = (rho_j > rho_i) | ((rho_j == rho_i) & (cols[None, None, :] < rows[None, :, None]))
    higher &= col_valid[:, None, :]
    near = torch.where(higher, d, float("inf")).amin(-1)
    far = torch.where(col_valid[:, None, :], d, 0.0).amax(-1)
    return near, far


def density_delta_gram(x: torch.Tensor, k: int, *, valid_len: Optional[torch.Tensor] = None, check: bool = True,
                       prepared: Optional[PreparedPoints] = None, max_bytes: int = MAX_DISTANCE_BYTES,
                       return_distances: bool = False):
    """(rho, delta) [B, N] fp32 each (0 past valid_len), as knn_density then density_delta, from distances
    computed once (or twice, in panels, past max_bytes). return_distances=True adds D [B, N, N] when it was made
    whole (else None) for the assignment to reuse."""
    if check:
        check_points(x, valid_len, k=k)
    require_kernel_device(x, valid_len)
    B, N, _ = x.shape
    with torch.no_grad():
        points, sq = prepare_points(x, valid_len) if prepared is None else prepared
        lengths = lengths_i32(x, valid_len)
        valid = valid_mask(x, valid_len)
        rows, panels = _panels(points, sq, lengths, max_bytes)
        if rows >= N:  # whole: v1's density and delta kernels read D instead of recomputing it
            from .library import sq_dist_rows

            d = sq_dist_rows(points, sq, lengths, 0, N)
            prepared = PreparedPoints(points, sq)
            rho = knn_density(x, k, valid_len=valid_len, check=False, prepared=prepared, distances=d)
            delta = density_delta(x, rho, valid_len=valid_len, check=False, prepared=prepared, distances=d)
            return (rho, delta, d) if return_distances else (rho, delta)
        rho = torch.cat([_density(d, valid, k) for _, d in panels()], dim=1)
        rho = torch.where(valid, rho, 0.0)
        near_parts, far_parts = [], []
        for row0, d in panels():
            near, far = _near_far(d, row0, rho, valid)
            near_parts.append(near)
            far_parts.append(far)
        near, far = torch.cat(near_parts, dim=1), torch.cat(far_parts, dim=1)
        far_of_set = torch.where(valid, far, 0.0).amax(-1, keepdim=True)
        delta = torch.where(torch.isinf(near), far_of_set.expand(B, N), near).sqrt()
        delta = torch.where(valid, delta, 0.0)
    return (rho, delta, None) if return_distances else (rho, delta)


def assign_from_distances(d: torch.Tensor, sq_scaled: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor
                          ) -> torch.Tensor:
    """assign_to_centers (reference semantics: the lowest rank within the tie slack) from D [B, N, N]: a gather of
    the centres' columns, no distance recomputed. sq_scaled: the centred points' squared norms over C."""
    B, N, _ = d.shape
    L = centers.shape[1]
    to_centers = torch.gather(d, 2, centers[:, None, :].expand(B, N, L))
    slack = (sq_scaled[:, :, None] + torch.gather(sq_scaled, 1, centers)[:, None, :]) * TIE_EPS
    tied = to_centers <= to_centers.amin(-1, keepdim=True) + slack
    assignment = tied.to(torch.int8).argmax(-1)
    assignment = assignment.scatter(1, centers, torch.arange(L, device=d.device).expand(B, L))
    return torch.where(valid, assignment, -1)


def dpc_knn_gram(x: torch.Tensor, num_clusters: int, k: int, *, weight: str = "uniform",
                 valid_len: Optional[torch.Tensor] = None, check: bool = True,
                 max_bytes: int = MAX_DISTANCE_BYTES) -> DPCResult:
    """dpc_knn (dpc_knn.py) with the distances computed once (this module's doc); the same result."""
    from .assign import assign_to_centers
    from .centers import select_centers
    from .weighted_pool import weighted_pool

    if check:
        check_points(x, valid_len, k=k, num_clusters=num_clusters)
    if weight not in ("uniform", "rho_delta"):
        raise ValueError(f"weight must be 'uniform' or 'rho_delta', got {weight!r}")
    require_kernel_device(x, valid_len)
    with torch.no_grad():
        prepared = prepare_points(x, valid_len)
        rho, delta, d = density_delta_gram(x, k, valid_len=valid_len, check=False, prepared=prepared,
                                           max_bytes=max_bytes, return_distances=True)
        centers = select_centers(rho * delta, num_clusters, valid_len=valid_len)
        if d is not None:
            sq_scaled = prepared.sq / x.shape[-1]
            assignment = assign_from_distances(d, sq_scaled, centers, valid_mask(x, valid_len))
        else:
            assignment = assign_to_centers(x, centers, valid_len=valid_len, check=False, prepared=prepared)
        del prepared, d
        weights = pool_weights(weight, rho, delta, assignment, num_clusters)
    prototypes = weighted_pool(x, assignment, weights, num_clusters, check=False)
    return DPCResult(centers, assignment, prototypes, rho, delta)

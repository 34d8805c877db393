"""The connector's temporal clustering (DPE, paper Sec. 3.2; DESIGN.md sections 4 and 5) over a ragged batch of
videos with no tensor glue between the launches (issue 12 item 3).

From the packed ViT patch tokens [sum T, G*G, C] to each video's event prototypes:
1. `_pool_centre_kernel`: the 2-D average pool of every frame to P = p*p tokens (official
   `compress_spatial_features`), written padded [B, T_max, P*C]; the video's mean over its frames; the centred points
   and per-block partial squared norms (what `common.centre_points` and `sq_norms` give the composed path);
2. the distance matrix of every video once (gram.py's kernel, split over channels when few tiles would run) while it
   fits 256 MB; the density kernel of knn_density.py (k smallest distances per column split with their columns, and
   each row's farthest distance, reading that matrix or computing its tiles), then `_rho_kernel` merges the splits
   into rho and each frame's k nearest;
3. the delta kernel of density_delta.py: a frame with a denser frame among its k nearest takes the nearest such
   (exact: every other frame is at least as far as the k-th nearest); only blocks of frames where some frame has
   none (local density peaks) run the column pass. Then `_centres_kernel` over blocks of each video's frames: delta,
   rho * delta, every frame's rank (the descending stable sort order), the first L_b ranks as centres, a short
   video's frames assigned to their own rank;
4. for videos with more frames than events, the assignment kernel of assign.py (the nearest of the L centres);
5. `_event_pool_kernel`: the prototypes with w = exp(rho * delta) shifted per cluster (common.pool_weights), and
   each prototype's summary cat(mean over P, max over P) for the event scorer.
Seven launches (six when the matrix is not kept; one more with long videos, one more when the matrix is split over
channels) and one tensor op (summing the partial norms), whatever the batch. Results
equal the composed path (dynfocus_infer.models.connector_parts.cluster_events over the separate ops): same centring,
rounding points and tie rules. Inference only: the training path pools with the differentiable weighted_pool.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import centred_dtype, interpreter_active, interpreter_tiles
from .distance import _precedes, _sqrt, column_splits, launch_config
from .gram import MAX_DISTANCE_BYTES
from .spatial import _pad, _round


class TemporalEvents(NamedTuple):
    """Temporal DPC-KNN of a ragged batch of videos; slots l >= L_b are padding."""

    centres: torch.Tensor      # int64 [B, L_max]: centre frame of each event (descending rho * delta), 0 in padding
    prototypes: torch.Tensor   # [B, L_max, P * C] in the tokens' dtype, zero in padding
    summaries: torch.Tensor    # [B, L_max, 2C]: cat(mean, max) over the P rows of each prototype
    assignment: torch.Tensor   # int64 [B, T_max]: each frame's event, -1 past T_b
    rho: torch.Tensor          # fp32 [B, T_max]
    delta: torch.Tensor        # fp32 [B, T_max]
    pooled: torch.Tensor       # [B, T_max, P * C]: the pooled frames, zero past T_b


@triton.jit
def _pool_centre_kernel(p_patch, p_starts, p_frames, p_pooled, p_centred, p_sqp, T_max, F, C, G, PG,
                        stride_t, stride_n, stride_c, STEP: tl.constexpr, BLOCK_F: tl.constexpr,
                        UPCAST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1)
    XDT = p_pooled.dtype.element_ty
    CDT = p_centred.dtype.element_ty
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = offs_f < F
    pool = offs_f // C
    chan = offs_f - pool * C
    first_patch = (pool // PG) * STEP * G + (pool % PG) * STEP
    n_frames = tl.load(p_frames + b)
    start = tl.load(p_starts + b)
    # common.centre_points' weights: 1 / n in the centred dtype (n itself rounded to it first, as torch divides).
    n_c = _round(n_frames.to(tl.float32) + tl.zeros([BLOCK_F], tl.float32), CDT, UPCAST).to(tl.float32)
    weight = _round(tl.div_rn(tl.full([BLOCK_F], 1.0, tl.float32), n_c), CDT, UPCAST).to(tl.float32)
    row = (b * T_max) * F
    b_mean = tl.zeros([BLOCK_F], tl.float32)
    for t in range(0, n_frames):
        p_frame = p_patch + (start + t) * stride_t + chan * stride_c
        b_acc = tl.zeros([BLOCK_F], tl.float32)
        for i in tl.static_range(STEP):
            for j in tl.static_range(STEP):
                b_acc += tl.load(p_frame + (first_patch + i * G + j) * stride_n, mask=m_f, other=0.0).to(tl.float32)
        b_pooled = _round(tl.div_rn(b_acc, STEP * STEP + 0.0), XDT, UPCAST).to(tl.float32)
        tl.store(p_pooled + row + t * F + offs_f, b_pooled, mask=m_f)
        b_mean += b_pooled * weight
    for t in range(n_frames, T_max):
        tl.store(p_pooled + row + t * F + offs_f, tl.zeros([BLOCK_F], tl.float32), mask=m_f)
        tl.store(p_centred + row + t * F + offs_f, tl.zeros([BLOCK_F], tl.float32), mask=m_f)
        tl.store(p_sqp + (b * T_max + t) * tl.num_programs(1) + pid_f, 0.0)
    b_mean = _round(b_mean, CDT, UPCAST).to(tl.float32)
    tl.debug_barrier()
    for t in range(0, n_frames):
        b_x = tl.load(p_pooled + row + t * F + offs_f, mask=m_f, other=0.0).to(tl.float32)
        b_c = _round(tl.where(m_f, b_x - b_mean, 0.0), CDT, UPCAST).to(tl.float32)
        tl.store(p_centred + row + t * F + offs_f, b_c, mask=m_f)
        tl.store(p_sqp + (b * T_max + t) * tl.num_programs(1) + pid_f, tl.sum(b_c * b_c, axis=0))


@triton.jit
def _rho_kernel(p_best, p_ids, p_len, p_rho, p_nbr_d, p_nbr_id, N, S, K: tl.constexpr, K_PAD: tl.constexpr,
                SK_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """rho = exp(-mean of the K smallest of each row's S * K per-split candidates), summed in ascending order (as
    distance._knn_rho_of_rows); those K (squared distance, id) are each row's k nearest [B, N, K] for delta."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_valid = tl.load(p_len + b)
    j = tl.arange(0, SK_PAD)
    split, slot = j // K, j % K
    p_in = ((b * S + split[None, :]) * N + rows[:, None]) * K + slot[None, :]
    m_in = (rows[:, None] < N) & (j[None, :] < S * K)
    b_d = tl.load(p_best + p_in, mask=m_in, other=float("inf"))
    b_id = tl.load(p_ids + p_in, mask=m_in, other=-1)
    cols_k = tl.arange(0, K_PAD)
    b_nbr_d = tl.full([BLOCK, K_PAD], float("inf"), tl.float32)
    b_nbr_id = tl.full([BLOCK, K_PAD], -1, tl.int32)
    b_total = tl.zeros([BLOCK], tl.float32)
    b_count = tl.zeros([BLOCK], tl.float32)
    for step in tl.static_range(K):
        b_near = tl.min(b_d, axis=1)
        at = tl.argmin(b_d, axis=1)
        found = b_near < float("inf")
        near_id = tl.sum(tl.where(j[None, :] == at[:, None], b_id, 0), axis=1)
        b_d = tl.where(j[None, :] == at[:, None], float("inf"), b_d)
        b_total += tl.where(found, b_near, 0.0)
        b_count += tl.where(found, 1.0, 0.0)
        b_nbr_d = tl.where(cols_k[None, :] == step, b_near[:, None], b_nbr_d)
        b_nbr_id = tl.where((cols_k[None, :] == step) & found[:, None], near_id[:, None], b_nbr_id)
    rho = tl.exp(-tl.div_rn(b_total, tl.maximum(b_count, 1.0)))
    tl.store(p_rho + b * N + rows, tl.where(rows < n_valid, rho, 0.0), mask=rows < N)
    p_out = (b * N + rows[:, None]) * K + cols_k[None, :]
    m_out = (rows[:, None] < N) & (cols_k[None, :] < K)
    tl.store(p_nbr_d + p_out, b_nbr_d, mask=m_out)
    tl.store(p_nbr_id + p_out, b_nbr_id, mask=m_out)


@triton.jit
def _delta_of(p_near, b, S, N, idx, n_valid, far, UPCAST: tl.constexpr):
    """delta of points idx from the splits' nearest-denser partials: the smallest, or the set's farthest distance when
    no split found a denser point (the densest point); 0 past n_valid."""
    b_near = tl.full(idx.shape, float("inf"), tl.float32)
    for s in range(0, S):
        b_near = tl.minimum(b_near, tl.load(p_near + (b * S + s) * N + idx, mask=idx < n_valid, other=float("inf")))
    return tl.where(idx < n_valid, _sqrt(tl.where(b_near == float("inf"), far, b_near), UPCAST), 0.0)


@triton.jit
def _score_of(p_rho, delta, b, N, idx, n_valid):
    """rho * delta, NaN (a non-finite video) ranked as -inf so that the ranks stay a permutation; -inf past n_valid."""
    score = tl.load(p_rho + b * N + idx, mask=idx < n_valid, other=0.0) * delta
    return tl.where((idx < n_valid) & (score == score), score, -float("inf"))


@triton.jit
def _centres_kernel(p_rho, p_near, p_far, p_len, p_events, p_delta, p_centres, p_assign, p_long_len, N, S, L_max,
                    BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """One block of one video's frames: their delta (from the split partials), their rank by rho * delta
    (descending, ties to the lower index: the stable sort order) against every frame of the video, the first L_b
    ranks as centres, a short video's frames assigned to their rank (-1 for a long video's: the assignment kernel
    decides them). Block 0 also writes 0 to the centre slots past L_b and the length the assignment kernel takes
    (the video's when long, else 0). Each program recomputes the set's farthest distance and the other frames'
    deltas it compares against (O(S * T) loads), so a long video's ranking spreads over many programs."""
    b = tl.program_id(0).to(tl.int64)
    n_valid = tl.load(p_len + b)
    n_events = tl.load(p_events + b)
    b_far = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        for r0 in range(0, n_valid, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            b_far = tl.maximum(b_far, tl.load(p_far + (b * S + s) * N + rows, mask=rows < n_valid, other=0.0))
    far = tl.max(b_far, axis=0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_rows = rows < n_valid
    delta_rows = _delta_of(p_near, b, S, N, rows, n_valid, far, UPCAST)
    tl.store(p_delta + b * N + rows, delta_rows, mask=rows < N)
    score_rows = _score_of(p_rho, delta_rows, b, N, rows, n_valid)
    rank = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, n_valid, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        score_cols = _score_of(p_rho, _delta_of(p_near, b, S, N, cols, n_valid, far, UPCAST), b, N, cols, n_valid)
        rank += tl.sum(tl.where(_precedes(score_cols, cols, score_rows, rows) & (cols < n_valid)[None, :], 1, 0),
                       axis=1)
    own = tl.where(m_rows & (n_valid <= n_events), rank, -1)
    tl.store(p_assign + b * N + rows, own.to(tl.int64), mask=rows < N)
    tl.store(p_centres + b * L_max + rank, rows.to(tl.int64), mask=m_rows & (rank < n_events))
    if tl.program_id(1) == 0:
        for l0 in range(0, L_max, BLOCK):
            slots = l0 + tl.arange(0, BLOCK)
            tl.store(p_centres + b * L_max + slots, tl.zeros([BLOCK], tl.int64),
                     mask=(slots >= n_events) & (slots < L_max))
        tl.store(p_long_len + b, tl.where(n_valid > n_events, n_valid, 0))


@triton.jit
def _event_pool_kernel(p_x, p_assign, p_rho, p_delta, p_proto, p_summary, N, C, P, L,
                       BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Prototypes m_l = sum_i w_i f_i / sum_i w_i with w_i = exp(s_i - max of s over i's cluster), s = rho * delta,
    for one block of channels of every pooled row p, and the summaries cat(mean_p m_l, max_p m_l)."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = offs_c < C
    l0 = tl.program_id(2) * BLOCK_L
    ranks = l0 + tl.arange(0, BLOCK_L)
    m_l = ranks < L
    XDT = p_proto.dtype.element_ty
    F = P * C
    b_top = tl.full([BLOCK_L], -float("inf"), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        a = tl.load(p_assign + b * N + offs_n, mask=offs_n < N, other=-1)
        s = tl.load(p_rho + b * N + offs_n, mask=offs_n < N, other=0.0) * \
            tl.load(p_delta + b * N + offs_n, mask=offs_n < N, other=0.0)
        b_top = tl.maximum(b_top, tl.max(tl.where(ranks[:, None] == a[None, :], s[None, :], -float("inf")), axis=1))
    b_sum = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
    b_max = tl.full([BLOCK_L, BLOCK_C], -float("inf"), tl.float32)
    for p in range(0, P):
        b_acc = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
        b_wsum = tl.zeros([BLOCK_L], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            a = tl.load(p_assign + b * N + offs_n, mask=offs_n < N, other=-1)
            s = tl.load(p_rho + b * N + offs_n, mask=offs_n < N, other=0.0) * \
                tl.load(p_delta + b * N + offs_n, mask=offs_n < N, other=0.0)
            mine = ranks[:, None] == a[None, :]
            b_w = tl.where(mine, tl.exp(s[None, :] - b_top[:, None]), 0.0)                 # [BLOCK_L, BLOCK_N]
            m_rows = (a >= l0) & (a < l0 + BLOCK_L)  # only this block's points (padding may be inf)
            b_x = tl.load(p_x + b * N * F + offs_n[:, None] * F + p * C + offs_c[None, :],
                          mask=m_rows[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_acc = tl.dot(b_w, b_x, b_acc, input_precision="ieee")
            b_wsum += tl.sum(b_w, axis=1)
        b_proto = tl.where(b_wsum[:, None] > 0, tl.div_rn(b_acc, tl.where(b_wsum > 0, b_wsum, 1.0)[:, None]), 0.0)
        b_proto = _round(b_proto, XDT, UPCAST).to(tl.float32)
        tl.store(p_proto + (b * L + ranks[:, None]) * F + p * C + offs_c[None, :], b_proto,
                 mask=m_l[:, None] & m_c[None, :])
        b_sum += b_proto
        b_max = tl.maximum(b_max, b_proto)
    p_out = p_summary + (b * L + ranks[:, None]) * (2 * C) + offs_c[None, :]
    tl.store(p_out, _round(tl.div_rn(b_sum, P + 0.0), XDT, UPCAST), mask=m_l[:, None] & m_c[None, :])
    tl.store(p_out + C, b_max, mask=m_l[:, None] & m_c[None, :])


def _feature_block(F: int) -> int:
    return min(1024 if interpreter_tiles() else 256, _pad(F))


def feature_blocks(F: int) -> int:
    """Programs per video of the pooling kernel (its partial norms per frame)."""
    return triton.cdiv(F, _feature_block(F))


def launch_pool_centre(patch_tokens: torch.Tensor, frame_starts: torch.Tensor, frames: torch.Tensor, max_frames: int,
                       patch_grid: int, pool_grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [B, T_max, P*C] in the tokens' dtype, centred points in the centred dtype, partial squared norms
    [B, T_max, feature blocks] fp32)."""
    B, C = frames.shape[0], patch_tokens.shape[-1]
    F = pool_grid * pool_grid * C
    block_f = _feature_block(F)
    f_blocks = feature_blocks(F)
    device, dtype = patch_tokens.device, patch_tokens.dtype
    pooled = torch.empty(B, max_frames, F, dtype=dtype, device=device)
    centred = torch.empty(B, max_frames, F, dtype=centred_dtype(dtype), device=device)
    partial_sq = torch.empty(B, max_frames, f_blocks, dtype=torch.float32, device=device)
    _pool_centre_kernel[(B, f_blocks)](patch_tokens, frame_starts, frames, pooled, centred, partial_sq, max_frames, F,
                                       C, patch_grid, pool_grid, *patch_tokens.stride(),
                                       STEP=patch_grid // pool_grid, BLOCK_F=block_f, UPCAST=interpreter_active(),
                                       num_warps=4)
    return pooled, centred, partial_sq


def _row_block(N: int) -> int:
    return min(512, _pad(N)) if interpreter_tiles() else 64


def launch_rho(best: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho [B, N] fp32, each point's k nearest: squared distances [B, N, k] fp32 and ids [B, N, k] int32, -1 padded)
    from knn_lists' per-split candidates [B, S, N, k]."""
    B, S, N, k = best.shape
    rho = torch.empty(B, N, dtype=torch.float32, device=best.device)
    nbr_d = torch.empty(B, N, k, dtype=torch.float32, device=best.device)
    nbr_id = torch.empty(B, N, k, dtype=torch.int32, device=best.device)
    cfg = rho_config(N, S, k)
    _rho_kernel[(B, triton.cdiv(N, cfg["BLOCK"]))](best, ids, lengths, rho, nbr_d, nbr_id, N, S, K=k,
                                                    K_PAD=max(2, triton.next_power_of_2(k)), **cfg)
    return rho, nbr_d, nbr_id


def rho_config(N: int, S: int, k: int) -> dict:
    """Rows per program: 1,024 candidates per program on a GPU (4 warps, no spill), wide in the interpreter."""
    sk_pad = _pad(S * k, 2)
    block = _row_block(N) if interpreter_tiles() else max(1, min(64, 1024 // sk_pad))
    return dict(SK_PAD=sk_pad, BLOCK=block, num_warps=4)


def launch_event_centres(rho: torch.Tensor, near: torch.Tensor, far: torch.Tensor, lengths: torch.Tensor,
                         events: torch.Tensor, max_events: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta [B, N], centres [B, max_events], the short videos' assignment [B, N] (-1 elsewhere), the lengths of
    the long videos (0 for short ones)) from rho and delta_near_far's partials."""
    B, S, N = near.shape
    delta = torch.empty_like(rho)
    centres = torch.empty(B, max_events, dtype=torch.int64, device=rho.device)
    assignment = torch.empty(B, N, dtype=torch.int64, device=rho.device)
    long_lengths = torch.empty_like(lengths)
    block = _row_block(N)
    _centres_kernel[(B, triton.cdiv(N, block))](rho, near, far, lengths, events, delta, centres, assignment,
                                                 long_lengths, N, S, max_events, BLOCK=block,
                                                 UPCAST=interpreter_active())
    return delta, centres, assignment, long_lengths


def launch_event_pool(pooled: torch.Tensor, assignment: torch.Tensor, rho: torch.Tensor, delta: torch.Tensor,
                      num_pooled: int, max_events: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes [B, max_events, P*C], summaries [B, max_events, 2C]) in the pooled points' dtype."""
    B, N, F = pooled.shape
    C = F // num_pooled
    prototypes = torch.empty(B, max_events, F, dtype=pooled.dtype, device=pooled.device)
    summaries = torch.empty(B, max_events, 2 * C, dtype=pooled.dtype, device=pooled.device)
    cfg = event_pool_config(N, C, max_events)
    grid = (B, triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(max_events, cfg["BLOCK_L"]))
    _event_pool_kernel[grid](pooled, assignment, rho, delta, prototypes, summaries, N, C, num_pooled, max_events,
                             **cfg)
    return prototypes, summaries


def event_pool_config(N: int, C: int, L: int) -> dict:
    """GPU: up to 32 events x 32 channels per program over 16-frame tiles (8 warps: 80 registers on sm_90, no
    stack; 32-frame tiles spill); interpreter: wide tiles."""
    if interpreter_tiles():
        blocks = dict(BLOCK_L=min(64, _pad(L)), BLOCK_N=min(256, _pad(N)), BLOCK_C=min(256, _pad(C)))
    else:
        blocks = dict(BLOCK_L=min(32, _pad(L)), BLOCK_N=16, BLOCK_C=min(32, _pad(C)))
    return dict(blocks, UPCAST=interpreter_active(), num_warps=8)


def temporal_events(patch_tokens: torch.Tensor, frame_starts: torch.Tensor, frames: torch.Tensor,
                    events: torch.Tensor, *, max_frames: int, max_events: int, patch_grid: int,
                    pool_grid: int, k: int, any_long: bool, distances: str = "auto") -> TemporalEvents:
    """The temporal clustering of every video of a packed batch: patch_tokens [sum T, patch_grid^2, C];
    frame_starts, frames, events: int64 [B] (first packed frame, T_b, L_b = min(num_events, T_b)); host ints:
    max_frames = max T_b, max_events = max L_b, any_long = some T_b > num_events (then max_events = num_events).
    Every launch is a custom op (kernels/library.py); no host read.

    distances: "gram" computes each video's distance matrix once (kernels/gram.py, one launch, upper-triangle tiles)
    and the density and delta passes read it; "stream" lets each pass compute its own tiles (v1: the Gram twice);
    "auto" takes "gram" while B x T_max^2 fp32 distances fit gram.MAX_DISTANCE_BYTES (256 MB: T = 8,192 for one
    video), else "stream" (memory O(T * C))."""
    from . import library

    if distances not in ("auto", "gram", "stream"):
        raise ValueError(f"distances must be 'auto', 'gram' or 'stream', got {distances!r}")
    pooled, centred, partial_sq = library.pool_centre(patch_tokens, frame_starts, frames, max_frames, patch_grid,
                                                      pool_grid)
    sq = partial_sq.sum(-1)
    lengths = frames.to(torch.int32)  # int32 lengths keep the loop counters int32 (int64 ones spill the Gram kernel)
    B = frames.shape[0]
    gram = distances == "gram" or (distances == "auto" and B * max_frames * max_frames * 4 <= MAX_DISTANCE_BYTES)
    matrix = library.sq_dist_rows(centred, sq, lengths, 0, max_frames) if gram else None
    splits, cols_per_split = column_splits(centred, launch_config(max_frames, centred.shape[-1], centred.dtype))
    best, ids, far = library.knn_lists(centred, sq, lengths, min(k, max_frames), splits, cols_per_split, matrix)
    rho, nbr_d, nbr_id = library.event_rho(best, ids, lengths)
    near = library.delta_near(centred, sq, rho, lengths, splits, cols_per_split, matrix, nbr_d, nbr_id)
    delta, centres, assignment, long_lengths = library.event_centres(rho, near, far, lengths, events, max_events)
    if any_long:  # the long videos' frames to the nearest of their num_events centres (-1 elsewhere)
        assignment = torch.maximum(assignment, library.assign(centred, sq, long_lengths, centres))
    prototypes, summaries = library.event_pool(pooled, assignment, rho, delta, pool_grid * pool_grid, max_events)
    return TemporalEvents(centres, prototypes, summaries, assignment, rho, delta, pooled)

"""The connector's token gather and scatter (issue 12 item 3: no glue around the projector GEMMs).

Inference lays out a ragged batch's visual tokens in two launches around one mm_projector call:
1. `_projector_inputs_kernel` gathers the projector's input rows: for each keyframe (in video, slot order) its cone
   inputs (the kept event's P prototype rows h_t, then G_t's rows; or its patch tokens for uncompressed cones), then
   for each frame the mean of G_t (the first rod's input); it also writes each video's keyframe ids (-1 padded);
2. `_scatter_tokens_kernel` places each frame's rods (mm_projector(mean G_t), vlm_att_val_projector(ctx)) and each
   keyframe's cones at their rows of the packed output (time order; a keyframe's cones before its rods, paper
   Eq. 11): video v from the host's token start (the layout's), each frame at the mask builder's offset within it.
Every output row is written exactly once. The training path (soft cones weighed by the perturbed top-K indicator)
keeps the tensor-op assembly of models/connector.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreter_active, interpreter_tiles
from .spatial import _pad, _round

CONE_NONE, CONE_PROTOTYPES, CONE_PATCHES = 0, 1, 2


@triton.jit
def _keyframe(p_key_video, p_key_slot, p_kept, p_centres, p_starts, p_frames, k, K_max, L_max):
    """(video, slot, time within the video, packed frame) of keyframe k. The kept id and the time are clamped into
    their ranges: with NaN features they are meaningless (the engine fails that request), but an index out of
    bounds would fault the whole batch."""
    v = tl.load(p_key_video + k)
    slot = tl.load(p_key_slot + k)
    kept = tl.minimum(tl.maximum(tl.load(p_kept + v * K_max + slot), 0), L_max - 1)
    time = tl.minimum(tl.maximum(tl.load(p_centres + v * L_max + kept), 0), tl.load(p_frames + v) - 1)
    return v, slot, time, tl.load(p_starts + v) + time


@triton.jit
def _projector_inputs_kernel(p_proto, p_grouped, p_patch, p_centres, p_kept, p_key_video, p_key_slot, p_starts,
                             p_frames, p_keep, p_out, p_keyframes, n_key, n_frames, K_max, L_max, C, n_patch,
                             stride_gt, stride_gn, stride_pt, stride_pn,
                             CONE: tl.constexpr, CONE_ROWS: tl.constexpr, P: tl.constexpr, NG: tl.constexpr,
                             ROD_MEANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = offs_c < C
    ODT = p_out.dtype.element_ty
    rows = tl.arange(0, BLOCK_R)
    if pid < n_key:
        v, slot, time, frame = _keyframe(p_key_video, p_key_slot, p_kept, p_centres, p_starts, p_frames, pid, K_max,
                                         L_max)
        if (pid_c == 0) & (slot < tl.load(p_keep + v)):  # a padding slot (bucket layouts) leaves the -1
            tl.store(p_keyframes + v * K_max + slot, time)
        out_row = pid.to(tl.int64) * CONE_ROWS
        if CONE == 1:  # h_t: the kept event's P prototype rows, then G_t
            kept = tl.minimum(tl.maximum(tl.load(p_kept + v * K_max + slot), 0), L_max - 1)
            m_p = rows < P
            b_h = tl.load(p_proto + (v * L_max + kept) * P * C + rows[:, None] * C + offs_c[None, :],
                          mask=m_p[:, None] & m_c[None, :], other=0.0)
            tl.store(p_out + (out_row + rows[:, None]) * C + offs_c[None, :], b_h, mask=m_p[:, None] & m_c[None, :])
            m_g = rows < NG
            b_g = tl.load(p_grouped + frame * stride_gt + rows[:, None] * stride_gn + offs_c[None, :],
                          mask=m_g[:, None] & m_c[None, :], other=0.0)
            tl.store(p_out + (out_row + P + rows[:, None]) * C + offs_c[None, :], b_g,
                     mask=m_g[:, None] & m_c[None, :])
        if CONE == 2:  # uncompressed: the keyframe's patch tokens
            for r0 in range(0, n_patch, BLOCK_R):
                m_r = r0 + rows < n_patch
                b_x = tl.load(p_patch + frame * stride_pt + (r0 + rows[:, None]) * stride_pn + offs_c[None, :],
                              mask=m_r[:, None] & m_c[None, :], other=0.0)
                tl.store(p_out + (out_row + r0 + rows[:, None]) * C + offs_c[None, :], b_x,
                         mask=m_r[:, None] & m_c[None, :])
    elif pid < n_key + n_frames:
        if ROD_MEANS:  # mean over G_t's rows, in the tokens' dtype (as grouped.mean(dim=1))
            i = (pid - n_key).to(tl.int64)
            m_g = rows < NG
            b_g = tl.load(p_grouped + i * stride_gt + rows[:, None] * stride_gn + offs_c[None, :],
                          mask=m_g[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_mean = _round(tl.sum(b_g, axis=0) / NG, ODT, UPCAST)
            tl.store(p_out + (n_key * CONE_ROWS + i) * C + offs_c, b_mean, mask=m_c)
    else:  # one program per video: its keyframe slots past K_b read -1
        v = pid - n_key - n_frames
        if pid_c == 0:
            slots = tl.arange(0, BLOCK_R)
            for s0 in range(tl.load(p_keep + v), K_max, BLOCK_R):
                tl.store(p_keyframes + v * K_max + s0 + slots, tl.full([BLOCK_R], -1, tl.int64),
                         mask=s0 + slots < K_max)


@triton.jit
def _scatter_tokens_kernel(p_proj, p_val, p_tokens, p_token_starts, p_offsets, p_mask, p_video_of, p_time_of,
                           p_key_video, p_key_slot, p_kept, p_centres, p_starts, p_frames, p_keep, n_key, n_frames,
                           T_max,
                           K_max, L_max, D, CONE_ROWS: tl.constexpr, KEY_RODS: tl.constexpr,
                           OTHER_RODS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Video v's tokens go to rows token_starts[v] .. token_starts[v + 1] (host counts), at the mask builder's offsets
    within it; nothing is written past a video's own rows, so a video whose device layout disagrees with the host
    counts (NaN features: its keyframes may collide; the engine fails it) cannot overwrite its neighbours'. Padding
    frames (t >= T_v) and keyframe slots (slot >= K_v) of bucket layouts write nothing."""
    pid = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    if pid < n_frames:  # frame pid: its rods, after its cones when it is a keyframe
        i = pid.to(tl.int64)
        v = tl.load(p_video_of + i)
        t = tl.load(p_time_of + i)
        start, end = tl.load(p_token_starts + v), tl.load(p_token_starts + v + 1)
        is_key = tl.load(p_mask + v * T_max + t).to(tl.int32)
        carries = tl.where(is_key != 0, KEY_RODS, OTHER_RODS)
        if (carries != 0) & (t < tl.load(p_frames + v)):
            row = start + tl.load(p_offsets + v * (T_max + 1) + t) + is_key * CONE_ROWS
            b_rod = tl.load(p_proj + (n_key * CONE_ROWS + i) * D + offs_d, mask=m_d, other=0.0)
            tl.store(p_tokens + row * D + offs_d, b_rod, mask=m_d & (row < end))
            b_ctx = tl.load(p_val + i * D + offs_d, mask=m_d, other=0.0)
            tl.store(p_tokens + (row + 1) * D + offs_d, b_ctx, mask=m_d & (row + 1 < end))
    else:  # keyframe pid - n_frames: its cones
        k = pid - n_frames
        v, slot, time, frame = _keyframe(p_key_video, p_key_slot, p_kept, p_centres, p_starts, p_frames, k, K_max,
                                         L_max)
        row = tl.load(p_token_starts + v) + tl.load(p_offsets + v * (T_max + 1) + time)
        end = tl.where(slot < tl.load(p_keep + v), tl.load(p_token_starts + v + 1), row)  # padding: no rows
        rows = tl.arange(0, BLOCK_R)
        for r0 in range(0, CONE_ROWS, BLOCK_R):
            m_r = (r0 + rows < CONE_ROWS) & (row + r0 + rows < end)
            b_cone = tl.load(p_proj + (k.to(tl.int64) * CONE_ROWS + r0 + rows[:, None]) * D + offs_d[None, :],
                             mask=m_r[:, None] & m_d[None, :], other=0.0)
            tl.store(p_tokens + (row + r0 + rows[:, None]) * D + offs_d[None, :], b_cone,
                     mask=m_r[:, None] & m_d[None, :])


def _width_block(width: int) -> int:
    return min(1024 if interpreter_tiles() else 128, _pad(width))


def launch_projector_inputs(prototypes: torch.Tensor, grouped: torch.Tensor, patch_tokens: torch.Tensor,
                            centres: torch.Tensor, kept: torch.Tensor, key_video: torch.Tensor,
                            key_slot: torch.Tensor, frame_starts: torch.Tensor, frames: torch.Tensor,
                            keep: torch.Tensor, cone: int,
                            cone_rows: int, num_pooled: int, rod_means: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mm_projector's input rows [n_key * cone_rows + (sum T if rod_means), C], keyframes [B, K_max] int64)."""
    n_key, n_frames, C = key_video.shape[0], patch_tokens.shape[0], patch_tokens.shape[-1]
    B, K_max = kept.shape
    rows = n_key * cone_rows + (n_frames if rod_means else 0)
    out = torch.empty(rows, C, dtype=patch_tokens.dtype, device=patch_tokens.device)
    keyframes = torch.empty(B, K_max, dtype=torch.int64, device=patch_tokens.device)
    NG = grouped.shape[1]
    block_r = _pad(max(num_pooled, NG) if cone != CONE_PATCHES else 64)
    block_c = _width_block(C)
    grid = (n_key + n_frames + B, triton.cdiv(C, block_c))
    _projector_inputs_kernel[grid](prototypes, grouped, patch_tokens, centres, kept, key_video, key_slot, frame_starts,
                                   frames, keep, out, keyframes, n_key, n_frames, K_max, centres.shape[1], C,
                                   patch_tokens.shape[1], grouped.stride(0), grouped.stride(1),
                                   patch_tokens.stride(0), patch_tokens.stride(1), CONE=cone, CONE_ROWS=cone_rows,
                                   P=num_pooled, NG=NG, ROD_MEANS=rod_means, BLOCK_R=block_r, BLOCK_C=block_c,
                                   UPCAST=interpreter_active())
    return out, keyframes


def launch_scatter_tokens(projected: torch.Tensor, values: torch.Tensor, token_starts: torch.Tensor,
                          token_offsets: torch.Tensor, frame_mask: torch.Tensor, video_of_frame: torch.Tensor,
                          time_of_frame: torch.Tensor, key_video: torch.Tensor, key_slot: torch.Tensor,
                          kept: torch.Tensor, centres: torch.Tensor, frame_starts: torch.Tensor, frames: torch.Tensor,
                          keep: torch.Tensor, total: int, cone_rows: int, key_rods: bool, other_rods: bool
                          ) -> torch.Tensor:
    """tokens [total, D]: video v at rows token_starts[v] .. token_starts[v + 1]."""
    D = projected.shape[1]
    T_max = frame_mask.shape[1]
    n_key, n_frames = key_video.shape[0], video_of_frame.shape[0]
    tokens = torch.empty(total, D, dtype=projected.dtype, device=projected.device)
    block_d = _width_block(D)
    grid = (n_frames + n_key, triton.cdiv(D, block_d))
    _scatter_tokens_kernel[grid](projected, values, tokens, token_starts, token_offsets, frame_mask, video_of_frame,
                                 time_of_frame, key_video, key_slot, kept, centres, frame_starts, frames, keep, n_key,
                                 n_frames, T_max, kept.shape[1], centres.shape[1], D, CONE_ROWS=cone_rows,
                                 KEY_RODS=int(key_rods), OTHER_RODS=int(other_rods), BLOCK_R=16, BLOCK_D=block_d)
    return tokens

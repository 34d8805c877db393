"""Pieces of the DynFocus connector (DESIGN.md sections 3 and 5): the clustering backend, the ragged frame layout,
the 2-D frame pooling and the temporal DPC-KNN over a ragged batch of videos (paper Sec. 3.2, Eqs. 1-3).

The temporal clustering is exact per video and vectorised over the batch although L_b = min(num_events, T_b)
differs between videos (the kernels take one num_clusters per call):
- density rho and distance delta are per point and need no L: one padded call with valid_len for all videos;
- centres are each video's first L_b points by descending rho * delta (ties to the lower index), one stable sort;
- a video with T_b <= num_events has every frame as a centre, so each frame is assigned to itself (its rank);
  only videos with T_b > num_events need assign_to_centers, all with the same L = num_events: one call;
- pooling (w = exp(rho * delta), Eq. 3) takes L_max clusters; a short video's clusters past L_b stay empty.
"""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

import dynfocus_kernels
import dynfocus_kernels.reference as dpc_reference
from dynfocus_kernels.common import interpreter_active, pool_weights
from dynfocus_kernels.distance import prepare_points
from dynfocus_kernels.temporal import temporal_events

from .. import ops as topk_ops
from ..config import ConnectorConfig
from ..errors import RequestError
from .event_scorer import prototype_summary
from .token_budget import (FrameTokenBudget, count_visual_tokens, frame_token_budget, num_event_prototypes,
                           num_keyframes)

CLUSTER_BACKENDS = ("auto", "triton", "reference")


def cluster_ops(backend: str, device: torch.device) -> ModuleType:
    """The DPC-KNN module to use: `dynfocus_kernels` (Triton) or `dynfocus_kernels.reference` (plain torch).

    "auto" picks Triton for CUDA tensors or when the interpreter is on, the reference otherwise (a CPU machine
    without TRITON_INTERPRET=1, where Triton cannot run)."""
    if backend not in CLUSTER_BACKENDS:
        raise ValueError(f"cluster_backend must be one of {CLUSTER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" or interpreter_active() else "reference"
    return dynfocus_kernels if backend == "triton" else dpc_reference


class RaggedFrames(NamedTuple):
    """Where each video's frames sit in the packed [sum T, ...] inputs: per-video counts as host ints (to size
    outputs without reading the device) and every index tensor the forward needs, already on the device.

    A bucket layout (bucket_layout) pads the batch to fixed shapes for a CUDA graph: each video owns T_bucket packed
    rows (its frames first), dummy one-frame videos fill the batch to B_bucket, and the host maxima below are the
    bucket's, not the batch's; the device tensors still carry every video's real T_b, L_b, K_b."""

    num_frames: tuple[int, ...]       # T_b
    num_events: tuple[int, ...]       # L_b = min(num_events, T_b)
    num_keep: tuple[int, ...]         # K_b = max(1, round(keep_ratio * L_b))
    frames: torch.Tensor              # int64 [B]: T_b
    events: torch.Tensor              # int64 [B]: L_b
    keep: torch.Tensor                # int64 [B]: K_b
    frame_starts: torch.Tensor        # int64 [B]: packed index of each video's first frame
    video_of_frame: torch.Tensor      # int64 [packed frames]: b of each packed frame
    time_of_frame: torch.Tensor       # int64 [packed frames]: t of each packed frame within its video (>= T_b: pad)
    keyframe_video: torch.Tensor      # int64 [keyframe slots]: b of each kept prototype, in video order
    keyframe_slot: torch.Tensor       # int64 [keyframe slots]: its slot (0..K_b - 1; >= K_b: padding)
    long_videos: torch.Tensor         # int64 [n]: videos with T_b > num_events (reference path; empty in buckets)
    token_starts: torch.Tensor        # int64 [B + 1]: first visual token of each video (host counts), then the total
    max_frames: int                   # host: T_max (the bucket's T in a bucket layout)
    max_events: int                   # host: L_max
    max_keep: int                     # host: K_max
    any_long: bool                    # host: some video may have T_b > num_events (then the assignment pass runs)
    token_rows: int                   # host: rows of the packed token output (>= token_starts[B])
    bucketed: bool = False            # a bucket layout (bucket_layout)

    @property
    def batch_size(self) -> int:
        return len(self.num_frames)


def offsets_within(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) of every element of segments of the given lengths: [0, 0, 1] / [0, 1, 0] for [2, 1]."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(int(counts.sum())) - (np.cumsum(counts) - counts)[owner]


def _to_device(arrays: list[np.ndarray], device: torch.device, into: Optional[torch.Tensor] = None
               ) -> list[torch.Tensor]:
    """All index arrays as int64 tensors on `device` with one host-to-device copy (from pinned memory, so it does not
    wait for the GPU) and no tensor op besides it: the layout is host arithmetic (numpy), not device work. `into`:
    an int64 device buffer of exactly the packed length to copy into (a CUDA graph's static layout)."""
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    packed = torch.from_numpy(np.concatenate(arrays).astype(np.int64))
    if into is not None:
        if into.shape != packed.shape or into.dtype != torch.int64:
            raise ValueError(f"the static layout buffer is {into.dtype} {tuple(into.shape)}, the layout needs "
                             f"int64 {tuple(packed.shape)}")
        into.copy_(packed.pin_memory() if into.device.type == "cuda" else packed, non_blocking=True)
        packed = into
    else:
        if device.type == "cuda":
            packed = packed.pin_memory()
        if device.type != "cpu":
            packed = packed.to(device, non_blocking=True)
    return [packed[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


def _check_frame_counts(frames_per_video: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if isinstance(frames_per_video, torch.Tensor):
        if frames_per_video.dim() != 1 or frames_per_video.dtype.is_floating_point:
            raise ValueError(f"frames_per_video must be a 1-D integer tensor or a list of ints, got "
                             f"{frames_per_video.dtype} {tuple(frames_per_video.shape)}")
        frames_per_video = frames_per_video.tolist()
    num_frames = tuple(int(t) for t in frames_per_video)
    if not num_frames:
        raise RequestError("frames_per_video is empty: pass at least one video")
    empty = [b for b, t in enumerate(num_frames) if t < 1]
    if empty:
        raise RequestError(f"video {empty[0]} has {num_frames[empty[0]]} frames; every video needs at least one "
                           "frame (drop empty videos from the batch and report them as failed requests)")
    return num_frames


def ragged_frames(frames_per_video: Sequence[int] | torch.Tensor, total_frames: int, config: ConnectorConfig,
                  device: torch.device) -> RaggedFrames:
    """Validates the per-video frame counts against the packed inputs and builds the index tensors."""
    num_frames = _check_frame_counts(frames_per_video)
    if sum(num_frames) != total_frames:
        raise ValueError(f"frames_per_video sums to {sum(num_frames)} but the packed inputs hold {total_frames} "
                         f"frames: the counts must describe the concatenated frames exactly")
    num_events = tuple(num_event_prototypes(t, config) for t in num_frames)
    num_keep = tuple(num_keyframes(t, config) for t in num_frames)
    frames, events, keep = (np.asarray(v, dtype=np.int64) for v in (num_frames, num_events, num_keep))
    video_of_frame, time_of_frame = offsets_within(frames)
    keyframe_video, keyframe_slot = offsets_within(keep)
    long_videos = np.flatnonzero(frames > config.num_events)
    token_starts = _token_starts(frames, keep, config)
    on_device = _to_device([frames, events, keep, np.cumsum(frames) - frames, video_of_frame, time_of_frame,
                            keyframe_video, keyframe_slot, long_videos, token_starts], device)
    return RaggedFrames(num_frames, num_events, num_keep, *on_device, max(num_frames), max(num_events),
                        max(num_keep), len(long_videos) > 0, int(token_starts[-1]))


def _token_starts(frames: np.ndarray, keep: np.ndarray, config: ConnectorConfig) -> np.ndarray:
    budget = frame_token_budget(config)
    return np.cumsum([0, *(keep * budget.key_tokens + (frames - keep) * budget.other_tokens)])


def bucket_layout(frames_per_video: Sequence[int], num_videos: int, num_frames: int, config: ConnectorConfig,
                  device: torch.device, into: Optional[torch.Tensor] = None) -> RaggedFrames:
    """The layout of a batch padded to a (num_videos, num_frames) bucket (RaggedFrames' doc): video b's frames at
    packed rows b * num_frames + t, one-frame dummy videos after the real ones, every keyframe slot of K(num_frames)
    listed per video (slots >= K_b are padding the token kernels skip). The array lengths, the host maxima and the
    token rows depend on the bucket only, so a CUDA graph captured on one bucket layout replays on another (`into`:
    the graph's static int64 buffer, bucket_layout_size long). For the fused inference path only."""
    real = _check_frame_counts(frames_per_video)
    if len(real) > num_videos or max(real) > num_frames:
        raise ValueError(f"a batch of {len(real)} videos of up to {max(real)} frames does not fit the bucket "
                         f"({num_videos} videos, {num_frames} frames)")
    counts = real + (1,) * (num_videos - len(real))
    frames = np.asarray(counts, dtype=np.int64)
    keep = np.asarray([num_keyframes(t, config) for t in counts], dtype=np.int64)
    events = np.minimum(frames, config.num_events)
    k_max = num_keyframes(num_frames, config)
    video_of_frame = np.repeat(np.arange(num_videos), num_frames)
    time_of_frame = np.tile(np.arange(num_frames), num_videos)
    keyframe_video = np.repeat(np.arange(num_videos), k_max)
    keyframe_slot = np.tile(np.arange(k_max), num_videos)
    token_starts = _token_starts(frames, keep, config)
    on_device = _to_device([frames, events, keep, np.arange(num_videos) * num_frames, video_of_frame, time_of_frame,
                            keyframe_video, keyframe_slot, np.zeros(0, np.int64), token_starts], device, into)
    rows = num_videos * count_visual_tokens(num_frames, config)
    return RaggedFrames(counts, tuple(int(v) for v in events), tuple(int(v) for v in keep), *on_device, num_frames,
                        num_event_prototypes(num_frames, config), k_max, num_frames > config.num_events, rows,
                        bucketed=True)


def bucket_layout_size(num_videos: int, num_frames: int, config: ConnectorConfig) -> int:
    """Length of bucket_layout's packed int64 device buffer."""
    return num_videos * (5 + 2 * num_frames + 2 * num_keyframes(num_frames, config)) + 1


def pool_frames(patch_tokens: torch.Tensor, patch_grid: int, pool_grid: int) -> torch.Tensor:
    """2-D average pool of the patch grid: [T, g*g, C] -> [T, p*p, C] (official `compress_spatial_features`)."""
    T, _, C = patch_tokens.shape
    step = patch_grid // pool_grid
    grid = patch_tokens.reshape(T, pool_grid, step, pool_grid, step, C)
    return grid.mean(dim=(2, 4)).reshape(T, pool_grid * pool_grid, C)


class EventPrototypes(NamedTuple):
    """Temporal DPC-KNN result for a ragged batch; slots l >= L_b are padding."""

    centres: torch.Tensor     # int64 [B, L_max]: centre frame (within its video) of each prototype, 0 in padding
    prototypes: torch.Tensor  # [B, L_max, P * C]: m_l (Eq. 3), zero in padding
    valid: torch.Tensor       # bool [B, L_max]: l < L_b


def cluster_events(pooled: torch.Tensor, layout: RaggedFrames, config: ConnectorConfig,
                   ops: ModuleType) -> EventPrototypes:
    """Temporal DPC-KNN of every video's pooled frames (points: flattened f_t; k = temporal_k; L_b centres;
    weight exp(rho * delta)); see the module docstring for how L_b may differ per video."""
    device = pooled.device
    B, T_max, L_max = layout.batch_size, layout.max_frames, layout.max_events
    points = pooled.flatten(1)
    padded = points.new_zeros(B, T_max, points.shape[1])
    padded = padded.index_put((layout.video_of_frame, layout.time_of_frame), points)
    valid_len = layout.frames
    in_video = torch.arange(T_max, device=device) < valid_len[:, None]
    with torch.no_grad():
        # The fused kernels centre the points and take their norms once for the three distance passes.
        prepared = prepare_points(padded, valid_len) if ops is dynfocus_kernels else None
        rho = ops.knn_density(padded, config.temporal_k, valid_len=valid_len, check=False, prepared=prepared)
        delta = ops.density_delta(padded, rho, valid_len=valid_len, check=False, prepared=prepared)
        centre_score = torch.where(in_video, rho * delta, torch.full_like(rho, float("-inf")))
        order = torch.sort(centre_score, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(T_max, device=device).expand(B, T_max))
        assignment = torch.where(in_video, rank, torch.full_like(rank, -1))
        if len(layout.long_videos):
            index = layout.long_videos
            if len(index) < B:
                subset = padded.index_select(0, index)
                prepared = None if prepared is None else prepared.select(index)
            else:
                subset = padded
            assigned = ops.assign_to_centers(subset, order[index, :config.num_events].contiguous(),
                                             valid_len=valid_len[index], check=False, prepared=prepared)
            assignment = assignment.index_copy(0, index, assigned)
        weights = pool_weights("rho_delta", rho, delta, assignment, L_max)
        del prepared
    prototypes = ops.weighted_pool(padded, assignment, weights, L_max, check=False)
    valid = torch.arange(L_max, device=device) < layout.events[:, None]
    centres = torch.where(valid, order[:, :L_max], torch.zeros_like(order[:, :L_max]))
    return EventPrototypes(centres, prototypes, valid)


def video_events(patch_tokens: torch.Tensor, layout: RaggedFrames, config: ConnectorConfig,
                 ops: ModuleType) -> tuple[EventPrototypes, torch.Tensor]:
    """The events of every video straight from the packed patch tokens [sum T, g*g, C], and each prototype's summary
    cat(mean, max) over its P rows [B, L_max, 2C] (the event scorer's input).

    Triton backend without a gradient wanted: dynfocus_kernels.temporal (pooling, centring, density, delta, ranks,
    assignment and prototypes in six or seven launches and one tensor op). Otherwise the composed cluster_events
    (differentiable prototypes for training; the reference backend). Same results (tests/test_temporal_events.py)."""
    wants_grad = torch.is_grad_enabled() and patch_tokens.requires_grad
    if ops is dynfocus_kernels and not wants_grad:
        fused = temporal_events(patch_tokens, layout.frame_starts, layout.frames, layout.events,
                                max_frames=layout.max_frames, max_events=layout.max_events,
                                patch_grid=config.patch_grid, pool_grid=config.pool_grid, k=config.temporal_k,
                                any_long=layout.any_long)
        valid = torch.arange(layout.max_events, device=patch_tokens.device) < layout.events[:, None]
        return EventPrototypes(fused.centres, fused.prototypes, valid), fused.summaries
    events = cluster_events(pool_frames(patch_tokens, config.patch_grid, config.pool_grid), layout, config, ops)
    return events, prototype_summary(events.prototypes.unflatten(-1, (config.num_pooled, config.vision_width)))


def _mask_builder(device: torch.device):
    """The csrc mask builder where it can run here, else its plain-torch twin (same contract, same results)."""
    try:
        has_cuda_kernel = topk_ops.has_cuda_build()  # imports the extension
    except ImportError:  # extension not built: the twin keeps the connector usable
        return topk_ops.build_topk_mask_reference
    if device.type == "cpu" or (device.type == "cuda" and has_cuda_kernel):
        return topk_ops.build_topk_mask
    return topk_ops.build_topk_mask_reference


def topk_mask(scores: torch.Tensor, centres: torch.Tensor, layout: RaggedFrames, budget: FrameTokenBudget,
              device: torch.device):
    """Keyframes and per-frame token offsets of every video in one call (DESIGN.md section 7)."""
    build = _mask_builder(device)
    return build(scores, centres, layout.events, layout.keep, layout.frames, key_tokens=budget.key_tokens,
                 other_tokens=budget.other_tokens, max_keep=layout.max_keep, max_frames=layout.max_frames,
                 check=False)

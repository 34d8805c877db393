"""SlowFocus frame choice: sparse (low-frequency) frames over the whole video, dense (high-frequency) frames inside
the focus segments, and their merge into one frame order with the lfreq / hfreq lists the mixing attention reads
(the authors' `video_sampling` with search "dense_v0" and `merge`, eval/model_*_tsearch.py).

Indices are into the decoded video's frames (native rate). Rounding is Python's round() (halves to even) and
numpy's linspace(...).astype(int) (truncation), as the authors', so the same frames come out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .segments import Segment


def _check_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames = {num_frames!r} is invalid: expected an integer >= 1 (an empty video has "
                         f"no frames to sample)")


def sparse_frame_indices(num_frames: int, avg_fps: float, *, fps: float = 1.0, max_frames: int = 100) -> list[int]:
    """Every step-th frame from 0, step = round(avg_fps / fps) clipped to [1, num_frames], widened to
    round(num_frames / max_frames) when that would give more than max_frames (the authors' eval: fps 1, 100)."""
    _check_frames(num_frames)
    if avg_fps <= 0 or fps <= 0 or max_frames < 1:
        raise ValueError(f"avg_fps = {avg_fps}, fps = {fps}, max_frames = {max_frames}: expected positive values")
    step = min(max(round(avg_fps / fps), 1), num_frames)
    if num_frames / step > max_frames:
        step = round(num_frames / max_frames)
    return list(range(0, num_frames, step))


def dense_frame_indices(segment: Segment | tuple, num_frames: int, count: int = 20) -> list[int]:
    """Frames of one normalised segment: first = round(start * n), last = min(round(end * n), n - 1); when
    last - first > count, linspace(first, last, count) truncated to integers, else every frame first..last.

    So a segment spanning exactly `count` frame steps gives count + 1 frames, as the authors'. One difference:
    a start that rounds past the last frame (the authors then sample nothing) is pulled back to it, so a
    non-empty segment always yields at least one frame.
    """
    _check_frames(num_frames)
    if count < 1:
        raise ValueError(f"count = {count} is invalid: expected an integer >= 1")
    start, end = (segment.start, segment.end) if isinstance(segment, Segment) else segment
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"segment ({start}, {end}) is invalid: expected 0 <= start <= end <= 1 "
                         f"(focus.parse_segments normalises model answers)")
    last = min(round(end * num_frames), num_frames - 1)
    first = min(round(start * num_frames), last)
    if last - first > count:
        return np.linspace(first, last, num=count).astype(int).tolist()
    return list(range(first, last + 1))


@dataclass(frozen=True)
class MergedFrames:
    """frame_indices: the frames to encode, in order; lfreq_ids / hfreq_ids: positions in frame_indices of the
    sparse and the dense frames; positions: frame index / video frames (the temporal embedding's input)."""

    frame_indices: tuple
    lfreq_ids: tuple
    hfreq_ids: tuple
    positions: tuple
    num_dense: int


def merge_frame_indices(sparse: Sequence[int], dense: Sequence[int], num_frames: int) -> MergedFrames:
    """Merge the sorted sparse frames with the dense frames (sorted here: several segments may come out of order)
    by frame index; on a tie the sparse frame comes first and both stay (the authors encode such a frame twice).

    With no dense frame the authors pass lfreq = hfreq = [0]; a checkpoint trained that way mixes frame 0 with
    itself in sparse-only runs, so that is kept.
    """
    _check_frames(num_frames)
    sparse, dense = list(sparse), sorted(dense)
    if not sparse:
        raise ValueError("sparse frame indices are empty: sample at least one frame of the video")
    if sparse != sorted(sparse):
        raise ValueError(f"sparse frame indices must be increasing, got {sparse}")
    if any(not 0 <= i < num_frames for i in sparse + dense):
        raise ValueError(f"frame indices must lie in [0, {num_frames}): sparse {sparse}, dense {dense}")
    if not dense:
        return MergedFrames(tuple(sparse), (0,), (0,), tuple(i / num_frames for i in sparse), 0)
    merged, lfreq, hfreq = [], [], []
    s = d = 0
    while s < len(sparse) or d < len(dense):
        if d == len(dense) or (s < len(sparse) and sparse[s] <= dense[d]):
            lfreq.append(len(merged))
            merged.append(sparse[s])
            s += 1
        else:
            hfreq.append(len(merged))
            merged.append(dense[d])
            d += 1
    return MergedFrames(tuple(merged), tuple(lfreq), tuple(hfreq), tuple(i / num_frames for i in merged), len(dense))


def focus_frames(num_frames: int, avg_fps: float, segments: Sequence[Segment], *, fps: float = 1.0,
                 max_frames: int = 100, dense_count: int = 20) -> MergedFrames:
    """Pass-2 frames of the authors' eval: sparse frames plus `dense_count` frames per segment, merged.
    No segment (a fallback parse) -> the sparse frames alone."""
    sparse = sparse_frame_indices(num_frames, avg_fps, fps=fps, max_frames=max_frames)
    dense = [i for segment in segments for i in dense_frame_indices(segment, num_frames, dense_count)]
    return merge_frame_indices(sparse, dense, num_frames)

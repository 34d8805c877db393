"""How many visual tokens the DynFocus connector emits (DESIGN.md section 5, paper Eq. 11 and Table 6).

A video of T frames has L = min(num_events, T) event prototypes and keeps K = max(1, round(keep_ratio * L)) of
them; the centre frame of each kept prototype is a keyframe (b_t = 1). Centres are distinct frames, so a video
has exactly K keyframes. Per-frame budgets follow the two columns of paper Table 6, read as
(tokens of a frame with b_t = 0 / tokens of a frame with b_t = 1):

| switches                              | other | key | keyframe tokens                              |
|---------------------------------------|-------|-----|----------------------------------------------|
| rods, cone_mode="compressed" (paper)  | 2     | 40  | cones mm_projector(h_t || G_t) (38), rods (2) |
| rods=False                            | 0     | 40  | as above: the Table's "0 / 40" row            |
| cone_mode="uncompressed"              | 2     | 256 | mm_projector of the 256 patch tokens          |
| cone_mode="coarse"                    | 2     | 2   | rods only, like every other frame             |
| cone_mode="off"                       | 2     | 0   | nothing: keyframes are dropped                |

The paper's 40 counts "22 multi-grained prototypes, 16 event tokens, 1 global content token and 1 text-guided
token", i.e. a keyframe's own rods are part of its budget, which is why turning rods off leaves 40 for keyframes.
Everything here is host arithmetic on Python ints, shared by the connector (to size its output without a device
read) and by the engine (to lay out prompts).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..config import ConnectorConfig

ROD_TOKENS = 2  # [mm_projector(mean G_t), vlm_att_val_projector(ctx)] (paper Eq. 10)


class FrameTokenBudget(NamedTuple):
    """Per-frame token counts under one ConnectorConfig."""

    cone_tokens: int      # tokens a keyframe gets before its rods: P + |G| (38), patch_grid^2 (256) or 0
    keyframe_rods: bool   # whether a keyframe carries its ROD_TOKENS rods after the cones
    other_tokens: int     # tokens of a frame with b_t = 0: ROD_TOKENS, or 0 with rods off

    @property
    def key_tokens(self) -> int:
        return self.cone_tokens + (ROD_TOKENS if self.keyframe_rods else 0)


def frame_token_budget(config: ConnectorConfig) -> FrameTokenBudget:
    """The (cones, keyframe rods, other-frame tokens) budget of the Table 6 switch set in `config`."""
    cone_tokens = {"compressed": config.num_pooled + config.num_spatial_tokens,
                   "uncompressed": config.patch_grid ** 2, "coarse": 0, "off": 0}[config.cone_mode]
    keyframe_rods = config.cone_mode in ("compressed", "coarse")
    return FrameTokenBudget(cone_tokens, keyframe_rods, ROD_TOKENS if config.rods else 0)


def num_event_prototypes(num_frames: int, config: ConnectorConfig) -> int:
    """L = min(num_events, T) (paper Sec. 3.2)."""
    return min(config.num_events, num_frames)


def num_keyframes(num_frames: int, config: ConnectorConfig) -> int:
    """K = max(1, round(keep_ratio * L)), with Python's round (half to even) on the host."""
    return max(1, round(config.keep_ratio * num_event_prototypes(num_frames, config)))


def _check_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"a video needs an integer number of frames >= 1, got {num_frames!r}")


def count_visual_tokens(num_frames: int, config: ConnectorConfig) -> int:
    """Exact number of visual tokens the connector emits for one video of `num_frames` frames."""
    _check_frames(num_frames)
    budget = frame_token_budget(config)
    keyframes = num_keyframes(num_frames, config)
    return keyframes * budget.key_tokens + (num_frames - keyframes) * budget.other_tokens


def count_visual_tokens_batch(frames_per_video: Sequence[int] | torch.Tensor,
                              config: ConnectorConfig) -> list[int] | torch.Tensor:
    """`count_visual_tokens` for many videos: a list in, a list out; an integer tensor in, an int64 tensor out
    (on its device, no host read: K comes from a table over L built with the host's rounding, so both forms
    agree exactly; a count below 1, which the list form rejects, gives 0 there)."""
    if not isinstance(frames_per_video, torch.Tensor):
        return [count_visual_tokens(int(t), config) for t in frames_per_video]
    frames = frames_per_video.to(torch.int64)
    budget = frame_token_budget(config)
    keep_of_events = torch.tensor([0] + [num_keyframes(L, config) for L in range(1, config.num_events + 1)],
                                  dtype=torch.int64, device=frames.device)
    keyframes = keep_of_events[frames.clamp(0, config.num_events)]
    counts = keyframes * budget.key_tokens + (frames - keyframes) * budget.other_tokens
    return torch.where(frames >= 1, counts, torch.zeros_like(counts))

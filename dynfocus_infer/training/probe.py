"""The scene probe: an auxiliary head used only in training (never exported, never run by the engine).

Why: the first run trained the visual path through the frozen LLM's answer loss alone (issue 17, README): 1,200
steps taught the answer templates and their priors, not the video. A linear probe on that run's visual tokens could
not tell the asked shape's colour (20% on held-out videos, the majority class 24%): the encoder, trained from scratch
with one answer token or so of signal per video, had not learned to see. The probe reads the visual tokens the LLM
reads (after the connector, per video) and predicts the scene directly: how many shapes, which colours and which
(shape, colour) pairs are present, each present pair's direction, and the briefly visible shape's colour. Its losses
reach the ViT, the Q-Former and the connector through the same tokens, many labels per video instead of one answer,
and it costs no LLM pass: extra videos can train the visual path through the probe alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..synthetic.scene import COLOURS, DIRECTIONS, SHAPES, STILL

COLOUR_NAMES = tuple(COLOURS)
DIRECTION_NAMES = tuple(DIRECTIONS) + (STILL,)
NUM_PAIRS = len(SHAPES) * len(COLOUR_NAMES)
NO_BRIEF = len(COLOUR_NAMES)            # the brief head's extra class: no briefly visible shape


def patch_targets(scene, frames, grid: int, points: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, kind) labels [len(frames), grid * grid] int64 of the ViT's patches: which shape covers most of
    points x points sample points inside each patch of the centred square the model sees (0: the background, else
    1 + its index in COLOUR_NAMES / SHAPES). The sample points are at most 0.36 patch from any point, and the
    smallest shape's half-extent is 0.64 patch, so every visible shape labels at least one patch."""
    from ..synthetic.render import shape_mask

    left, top, side = scene.square
    step = side / grid
    offsets = (np.arange(grid * points) + 0.5) * step / points
    xs, ys = (left + offsets)[None, :], (top + offsets)[:, None]
    colour = np.zeros((len(frames), grid, grid), dtype=np.int64)
    kind = np.zeros_like(colour)
    for row, frame in enumerate(frames):
        best = np.zeros((grid, grid))
        for i, shape in enumerate(scene.shapes):
            if not scene.visible(i, int(frame)):
                continue
            covered = shape_mask(shape, int(frame), xs, ys).reshape(grid, points, grid, points).sum(axis=(1, 3))
            wins = covered > best
            colour[row][wins] = 1 + COLOUR_NAMES.index(shape.colour)
            kind[row][wins] = 1 + SHAPES.index(shape.kind)
            best = np.maximum(best, covered)
    return torch.from_numpy(colour.reshape(len(frames), -1)), torch.from_numpy(kind.reshape(len(frames), -1))


def scene_targets(scene, frames=None, grid: int = 0) -> dict:
    """The probes' labels of one scene (synthetic/scene.Scene) as int64 / float32 tensors; with the sampled
    `frames` and the ViT's patch `grid`, also the patch labels (patch_targets)."""
    colours = torch.zeros(len(COLOUR_NAMES))
    pairs = torch.zeros(NUM_PAIRS)
    directions = torch.full((NUM_PAIRS,), -100, dtype=torch.int64)   # -100: pair absent, ignored
    for shape in scene.shapes:
        c = COLOUR_NAMES.index(shape.colour)
        pair = SHAPES.index(shape.kind) * len(COLOUR_NAMES) + c
        colours[c] = 1.0
        pairs[pair] = 1.0
        directions[pair] = DIRECTION_NAMES.index(shape.direction)
    brief = NO_BRIEF if scene.brief_index is None else COLOUR_NAMES.index(scene.shapes[scene.brief_index].colour)
    targets = {"count": torch.tensor(len(scene.shapes) - 1), "colours": colours, "pairs": pairs,
               "directions": directions, "brief": torch.tensor(brief)}
    if grid:
        targets["patch_colour"], targets["patch_kind"] = patch_targets(scene, frames, grid)
    return targets


PROBE_NORMS = ("batch", "layer")


class SceneProbe(nn.Module):
    """Attention pooling of a video's visual tokens by `num_queries` learned queries, then one linear layer per label
    group.

    The tokens are first normalised per channel over all the tokens of the step (norm "batch": BatchNorm statistics
    of the batch, no running statistics; the probe only ever sees training batches). The visual tokens share a
    component far larger than what tells one video from another (run 3's: norms 90-350, about 3/4 of their energy
    the same in every video at a given position); a per-token LayerNorm (norm "layer", runs 1-3) keeps that component,
    and the probe then sat at its prior (loss 4.29 from step 250 to step 2,000 of runs 2 and 3; tests/test_train.py
    shows the same on synthetic tokens, and that centring over the batch learns them)."""

    def __init__(self, llm_width: int, width: int = 256, num_queries: int = 8, num_heads: int = 4,
                 norm: str = "batch"):
        super().__init__()
        if norm not in PROBE_NORMS:
            raise ValueError(f"probe norm {norm!r} is unknown: expected one of {PROBE_NORMS}")
        first = nn.BatchNorm1d(llm_width, track_running_stats=False) if norm == "batch" else nn.LayerNorm(llm_width)
        self.inp = nn.Sequential(first, nn.Linear(llm_width, width))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width ** -0.5)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.body = nn.Sequential(nn.LayerNorm(num_queries * width), nn.Linear(num_queries * width, width), nn.GELU())
        self.count = nn.Linear(width, 3)
        self.colours = nn.Linear(width, len(COLOUR_NAMES))
        self.pairs = nn.Linear(width, NUM_PAIRS)
        self.directions = nn.Linear(width, NUM_PAIRS * len(DIRECTION_NAMES))
        self.brief = nn.Linear(width, len(COLOUR_NAMES) + 1)

    def forward(self, tokens: torch.Tensor, num_tokens: Sequence[int]) -> dict:
        """tokens [sum(num_tokens), llm_width] (the connector's output, videos one after another) -> logits."""
        videos = len(num_tokens)
        longest = max(num_tokens)
        x = self.inp(tokens.float())
        padded = x.new_zeros(videos, longest, x.shape[-1])
        lengths = torch.tensor(list(num_tokens), device=x.device)
        valid = torch.arange(longest, device=x.device)[None, :] < lengths[:, None]
        padded[valid] = x
        queries = self.queries[None].expand(videos, -1, -1)
        pooled, _ = self.attention(queries, padded, padded, key_padding_mask=~valid, need_weights=False)
        h = self.body(pooled.flatten(1))
        return {"count": self.count(h), "colours": self.colours(h), "pairs": self.pairs(h),
                "directions": self.directions(h).view(videos * NUM_PAIRS, len(DIRECTION_NAMES)),
                "brief": self.brief(h)}


class PatchProbe(nn.Module):
    """Per-patch linear heads on the ViT's patch tokens: the colour and the kind of shape each patch shows (or the
    background). Dense labels, 64 per frame: they teach a ViT trained from scratch to see in a few hundred steps,
    where one answer per video (or the scene probe's few labels) barely moves it (README, issue 17)."""

    def __init__(self, vision_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.colour = nn.Linear(vision_width, len(COLOUR_NAMES) + 1)
        self.kind = nn.Linear(vision_width, len(SHAPES) + 1)

    def forward(self, patch_tokens: torch.Tensor) -> dict:
        """patch_tokens [frames, grid^2, C] -> {"patch_colour", "patch_kind"} logits [frames * grid^2, classes]."""
        x = self.norm(patch_tokens.float()).flatten(0, 1)
        return {"patch_colour": self.colour(x), "patch_kind": self.kind(x)}


def frame_pairs(scene, frame: int) -> torch.Tensor:
    """float32 [NUM_PAIRS]: 1 for each (shape, colour) pair visible in frame `frame` (index kind * 6 + colour, as the
    scene probe's pairs)."""
    pairs = torch.zeros(NUM_PAIRS)
    for i, shape in enumerate(scene.shapes):
        if scene.visible(i, int(frame)):
            pairs[SHAPES.index(shape.kind) * len(COLOUR_NAMES) + COLOUR_NAMES.index(shape.colour)] = 1.0
    return pairs


class FrameProbe(nn.Module):
    """A linear head on the mean of a frame's patch tokens: which (shape, colour) pairs the frame shows. Used by the
    ViT's pretraining (training/vit_pretrain.py), so that a pooled token (what the connector's rods and cones are)
    carries which shape has which colour; the patch probe alone labels patches one by one."""

    def __init__(self, vision_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.pairs = nn.Linear(vision_width, NUM_PAIRS)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [frames, grid^2, C] -> pair logits [frames, NUM_PAIRS]."""
        return self.pairs(self.norm(patch_tokens.float().mean(dim=1)))


def patch_loss(logits: dict, targets: Sequence[dict]) -> torch.Tensor:
    """Mean cross-entropy of the patch colour and kind labels over every frame of every video."""
    device = logits["patch_colour"].device
    colour = torch.cat([t["patch_colour"] for t in targets]).flatten().to(device)
    kind = torch.cat([t["patch_kind"] for t in targets]).flatten().to(device)
    return F.cross_entropy(logits["patch_colour"], colour) + F.cross_entropy(logits["patch_kind"], kind)


def probe_loss(logits: dict, targets: Sequence[dict]) -> torch.Tensor:
    """The sum of the five label groups' mean losses over the videos."""
    keys = ("count", "colours", "pairs", "directions", "brief")
    stacked = {k: torch.stack([t[k] for t in targets]).to(logits["count"].device) for k in keys}
    return (F.cross_entropy(logits["count"], stacked["count"])
            + F.binary_cross_entropy_with_logits(logits["colours"], stacked["colours"])
            + F.binary_cross_entropy_with_logits(logits["pairs"], stacked["pairs"])
            + F.cross_entropy(logits["directions"], stacked["directions"].flatten(), ignore_index=-100)
            + F.cross_entropy(logits["brief"], stacked["brief"]))

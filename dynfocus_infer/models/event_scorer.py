"""Event scorer of the DPE module (paper Sec. 3.2; official `PredictorLG` inside `PatchNet`, DESIGN.md section 5).

Each event prototype m_l [P, C] is summarised as cat(Avg_P(m_l), Max_P(m_l)) [2C] (official `PatchNet.forward`);
PredictorLG maps it to one score: LayerNorm(2C) -> Linear(2C, 2C) -> GELU, the second channel half averaged over
the prototypes of the same video and concatenated back, -> Linear(2C, C) -> GELU -> Linear(C, C/2) -> GELU ->
Linear(C/2, 1). Scores are then min-max normalised per video (official `min_max_norm`, eps 1e-5).

Parameter names are the official ones under `selective_net.score_network.` (`in_conv.0` LayerNorm, `in_conv.1`,
`out_conv.0`, `out_conv.2`, `out_conv.4` Linear), so `load_state_dict` takes that dict with the prefix stripped.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

MIN_MAX_EPS = 1e-5


def prototype_summary(prototypes: torch.Tensor) -> torch.Tensor:
    """[..., P, C] -> [..., 2C]: cat(mean over the P rows, elementwise max over the P rows)."""
    return torch.cat([prototypes.mean(dim=-2), prototypes.amax(dim=-2)], dim=-1)


def masked_min_max_normalise(scores: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(s - min) / (max - min + 1e-5) per row over its valid entries (official `min_max_norm`); 0 elsewhere."""
    if valid is None:
        low = scores.amin(dim=-1, keepdim=True)
        high = scores.amax(dim=-1, keepdim=True)
        return (scores - low) / (high - low + MIN_MAX_EPS)
    low = scores.masked_fill(~valid, float("inf")).amin(dim=-1, keepdim=True)
    high = scores.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True)
    normalised = (scores - low) / (high - low + MIN_MAX_EPS)
    return torch.where(valid, normalised, torch.zeros_like(normalised))


class EventScorer(nn.Module):
    """PredictorLG over the summaries of a (ragged) batch of videos' event prototypes: [B, L, 2C] -> [B, L]."""

    def __init__(self, vision_width: int):
        super().__init__()
        if vision_width % 2:
            raise ValueError(f"EventScorer needs an even vision_width (its last hidden layer is C/2 wide), "
                             f"got {vision_width}")
        width = 2 * vision_width  # embed_dim of the official PredictorLG(embed_dim=2 * in_channels)
        self.in_conv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(),
                                      nn.Linear(width // 2, width // 4), nn.GELU(),
                                      nn.Linear(width // 4, 1))

    def forward(self, summaries: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw scores [B, L] (fp32) of summaries [B, L, 2C]; `valid` [B, L] marks real prototypes (ragged batch):
        padding is left out of the per-video mean and gets score 0."""
        hidden = self.in_conv(summaries.to(self.in_conv[1].weight.dtype))
        half = hidden.shape[-1] // 2
        local, pooled = hidden[..., :half], hidden[..., half:]
        if valid is None:
            video_mean = pooled.mean(dim=1, keepdim=True)
        else:
            weights = valid.to(pooled.dtype)[..., None]
            video_mean = (pooled * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1)
        hidden = torch.cat([local, video_mean.expand_as(local)], dim=-1)
        scores = self.out_conv(hidden).squeeze(-1).float()
        return scores if valid is None else torch.where(valid, scores, torch.zeros_like(scores))

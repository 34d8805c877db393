"""SlowFocus per-frame tokens (the authors' `token_generation`): 1 question-conditioned context token and
pool_grid^2 content tokens per frame, all at the LLM width.

For frame t with patch features v_t [256, C] (penultimate CLIP layer, CLS dropped) and text_q_t [Q, C] (the
Q-Former's query states through vlm_att_projector):

    context_t = vlm_att_val_projector(mean_q softmax(text_q_t K_t^T / sqrt(C)) v_t),  K_t = vlm_att_key_projector(v_t)
    content_t = AvgPool_{16x16 -> 8x8}(v_t) + temporal_embedding(bucket(tau_t))       (added to every pooled token)
    content   = mixing attention over the video's frames (mixing_attention.py), when mix_attn == "bi"
    tokens_t  = [context_t, mm_projector(content_t)]                                   -> [1 + 64, llm_width]

bucket(tau) = clamp(floor(1000 tau), 0, 999) with tau = frame index / number of video frames (the authors'
`temporal_pos * 1000` then `.long()`, i.e. truncation). We compute in fp64; their eval casts tau to fp16 first,
which can move a frame that sits just above a bucket boundary down by one bucket.

Parameter names are the authors' without the leading `model.`: mm_projector (mlp2x_gelu), vlm_att_key_projector,
vlm_att_val_projector, vlm_att_bert_proj (vision width -> the Q-Former's 1408, only when they differ),
temporal_embedding, mix_attn_{lfreq,hfreq}_projector or mix_attn_{q,k,v}_projector.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SlowFocusConnectorConfig
from .mixing_attention import mix_frequencies, mix_frequencies_ragged


def temporal_buckets(positions: torch.Tensor, num_buckets: int = 1000) -> torch.Tensor:
    """Normalised frame times tau in [0, 1] -> long bucket ids clamp(floor(num_buckets * tau), 0, num_buckets - 1).
    Pass fp64 times (MergedFrames.positions): then frame i of n lands in floor(1000 i / n) exactly, where an fp32
    tau such as 29 / 100 would fall one bucket low."""
    return torch.clamp(torch.floor(positions.double() * num_buckets), 0, num_buckets - 1).long()


def grid_pool(patch_features: torch.Tensor, pool_grid: int) -> torch.Tensor:
    """[T, g*g, C] -> [T, pool_grid^2, C]: 2-D average pool of the patch grid with stride g // pool_grid."""
    num_frames, num_patches, width = patch_features.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches or grid % pool_grid != 0:
        raise ValueError(f"{num_patches} patch tokens are not a square grid divisible by pool_grid={pool_grid}")
    stride = grid // pool_grid
    image = patch_features.reshape(num_frames, grid, grid, width).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, kernel_size=stride, stride=stride).permute(0, 2, 3, 1).flatten(1, 2)


class SlowFocusConnector(nn.Module):
    """Patch features + Q-Former queries + frame times (+ frequency lists) -> [T, 1 + pool_grid^2, llm_width]."""

    def __init__(self, config: Optional[SlowFocusConnectorConfig] = None):
        super().__init__()
        self.config = config = config or SlowFocusConnectorConfig()
        width, llm = config.vision_width, config.llm_width
        self.mm_projector = nn.Sequential(nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
        self.vlm_att_key_projector = nn.Linear(width, width)
        self.vlm_att_val_projector = nn.Linear(width, llm)
        if config.needs_bert_proj:
            self.vlm_att_bert_proj = nn.Linear(width, config.qformer_width)
        if config.temporal_buckets:
            self.temporal_embedding = nn.Embedding(config.temporal_buckets, width)
        if config.mix_attn in ("bi", "v1"):
            self.mix_attn_hfreq_projector = nn.Linear(width, width)
            self.mix_attn_lfreq_projector = nn.Linear(width, width)
        elif config.mix_attn == "qkv":
            self.mix_attn_q_projector = nn.Linear(width, width)
            self.mix_attn_k_projector = nn.Linear(width, width)
            self.mix_attn_v_projector = nn.Linear(width, width)

    def qformer_input(self, patch_features: torch.Tensor) -> torch.Tensor:
        """What the Q-Former cross-attends to: the patch features, through vlm_att_bert_proj when it exists."""
        bert_proj = getattr(self, "vlm_att_bert_proj", None)
        return patch_features if bert_proj is None else bert_proj(patch_features.to(bert_proj.weight.dtype))

    def context_token(self, patch_features: torch.Tensor, text_q: torch.Tensor) -> torch.Tensor:
        """[T, S, C], [T, Q, C] -> [T, 1, llm_width]."""
        keys = self.vlm_att_key_projector(patch_features)
        scores = text_q @ keys.transpose(-1, -2) / math.sqrt(patch_features.shape[-1])
        context = (scores.softmax(dim=-1) @ patch_features).mean(dim=1)
        return self.vlm_att_val_projector(context[:, None])

    def content_tokens(self, patch_features: torch.Tensor, temporal_positions: Optional[torch.Tensor],
                       lfreq_ids: Optional[torch.Tensor], hfreq_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """[T, S, C] -> mixed, temporally embedded pooled tokens [T, pool_grid^2, C] (before mm_projector)."""
        content = self._pooled(patch_features, temporal_positions)
        if self.config.mix_attn == "bi":
            if lfreq_ids is None or hfreq_ids is None:
                raise ValueError("mix_attn='bi' needs lfreq_ids and hfreq_ids (focus.merge_frame_indices gives "
                                 "them; a sparse-only video uses [0] and [0], as the authors do)")
            content = mix_frequencies(content, lfreq_ids.to(content.device), hfreq_ids.to(content.device),
                                      self.mix_attn_lfreq_projector, self.mix_attn_hfreq_projector,
                                      scale_low_to_high=self.config.scale_low_to_high)
        return content

    def _pooled(self, patch_features: torch.Tensor, temporal_positions: Optional[torch.Tensor]) -> torch.Tensor:
        """[T, S, C] -> grid-pooled tokens plus each frame's temporal embedding [T, pool_grid^2, C]."""
        content = grid_pool(patch_features, self.config.pool_grid)
        if self.config.temporal_buckets:
            if temporal_positions is None or temporal_positions.shape != (content.shape[0],):
                raise ValueError(f"temporal_positions must be [T] = [{content.shape[0]}] frame times in [0, 1], got "
                                 f"{None if temporal_positions is None else list(temporal_positions.shape)}")
            buckets = temporal_buckets(temporal_positions.to(content.device), self.config.temporal_buckets)
            content = content + self.temporal_embedding(buckets)[:, None, :]
        return content

    def count_tokens(self, num_frames: int) -> int:
        """Visual tokens of a video of num_frames frames (every frame: a context token and its pooled tokens)."""
        return num_frames * self.config.tokens_per_frame

    def forward_ragged(self, patch_features: torch.Tensor, text_q: torch.Tensor, temporal_positions: torch.Tensor,
                       low_rows: torch.Tensor, high_rows: torch.Tensor) -> torch.Tensor:
        """Every video of a batch at once (the engine's path): patch_features [N, S, C] and text_q [N, Q, C] of all
        their frames, concatenated video after video; temporal_positions [N] (fp64 frame times); low_rows /
        high_rows [B, *] each video's low / high-frequency frames as rows of the N, padded with -1
        (mixing_attention.mix_frequencies_ragged). Returns [N, 1 + pool_grid^2, llm_width]: what `forward` gives
        each video."""
        dtype = self.mm_projector[0].weight.dtype
        patch_features, text_q = patch_features.to(dtype), text_q.to(dtype)
        context = self.context_token(patch_features, text_q)
        content = self._pooled(patch_features, temporal_positions)
        if self.config.mix_attn == "bi":
            content = mix_frequencies_ragged(content, low_rows.to(content.device), high_rows.to(content.device),
                                             self.mix_attn_lfreq_projector, self.mix_attn_hfreq_projector,
                                             scale_low_to_high=self.config.scale_low_to_high)
        return torch.cat((context, self.mm_projector(content)), dim=1)

    def forward(self, patch_features: torch.Tensor, text_q: torch.Tensor,
                temporal_positions: Optional[torch.Tensor] = None, lfreq_ids: Optional[torch.Tensor] = None,
                hfreq_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One video: patch_features [T, S, C], text_q [T, Q, C], temporal_positions [T], lfreq_ids / hfreq_ids
        long frame indices -> tokens [T, 1 + pool_grid^2, llm_width], context token first (authors' order)."""
        dtype = self.mm_projector[0].weight.dtype
        width = self.config.vision_width
        if patch_features.dim() != 3 or patch_features.shape[-1] != width:
            raise ValueError(f"patch_features must be [T, S, {width}], got {list(patch_features.shape)}")
        if text_q.dim() != 3 or text_q.shape[0] != patch_features.shape[0] or text_q.shape[-1] != width:
            raise ValueError(f"text_q must be [T={patch_features.shape[0]}, Q, {width}], got {list(text_q.shape)}")
        patch_features, text_q = patch_features.to(dtype), text_q.to(dtype)
        context = self.context_token(patch_features, text_q)
        content = self.content_tokens(patch_features, temporal_positions, lfreq_ids, hfreq_ids)
        return torch.cat((context, self.mm_projector(content)), dim=1)

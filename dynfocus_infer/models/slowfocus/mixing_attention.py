"""SlowFocus mixing attention between high-frequency (dense, in-segment) and low-frequency (sparse, whole-video)
frame tokens: the authors' `mix_attn == "bi"` branch of `token_generation`, written from its equations.

With V the content tokens of one video's frames [F, N, C] (after the temporal embedding), L = V[lfreq] and
H = V[hfreq] flattened to token rows, Lp = lfreq_projector(L), Hp = hfreq_projector(H):

    H_mix = softmax(Hp Lp^T / sqrt(C)) L            each dense token reads the sparse tokens
    L_mix = softmax(Lp Hp^T) H                      each sparse token reads the dense tokens, UNSCALED
    V'    = V + M,   M[hfreq] = H_mix, M[lfreq] = L_mix, M = 0 for frames in neither list

Values are the raw tokens (not projected): the authors' code has no value projection in this branch.
The low-to-high line of the authors' code reads `weight2 - weight2 / sqrt(C)`, an expression whose result is
discarded, so a checkpoint trained with it saw unscaled logits; `scale_low_to_high=False` (the default) keeps that,
True applies the 1/sqrt(C) the line evidently meant (for checkpoints trained with a corrected line).
A frame listed in both lists (the authors' sparse-only runs pass lfreq = hfreq = [0]) ends with L_mix: their
assignment to the low-frequency rows comes second and overwrites.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def mix_frequencies(content: torch.Tensor, lfreq_ids: torch.Tensor, hfreq_ids: torch.Tensor,
                    lfreq_projector: nn.Module, hfreq_projector: nn.Module, *,
                    scale_low_to_high: bool = False) -> torch.Tensor:
    """content [F, N, C]; lfreq_ids / hfreq_ids: long [Fl] / [Fh] frame indices into content. Returns V + M."""
    num_frames, num_tokens, width = content.shape
    for name, ids in (("lfreq_ids", lfreq_ids), ("hfreq_ids", hfreq_ids)):
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D index list, got shape {list(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= num_frames:
            raise ValueError(f"{name} holds frame indices outside [0, {num_frames}): {ids.tolist()}")
    low = content[lfreq_ids].flatten(0, 1)
    high = content[hfreq_ids].flatten(0, 1)
    low_keys = lfreq_projector(low)
    high_keys = hfreq_projector(high)
    high_mix = torch.softmax(high_keys @ low_keys.transpose(0, 1) / math.sqrt(width), dim=-1) @ low
    low_logits = low_keys @ high_keys.transpose(0, 1)
    if scale_low_to_high:
        low_logits = low_logits / math.sqrt(width)
    low_mix = torch.softmax(low_logits, dim=-1) @ high
    mix = torch.zeros_like(content)
    mix[hfreq_ids] = high_mix.view(-1, num_tokens, width)
    mix[lfreq_ids] = low_mix.view(-1, num_tokens, width)
    return content + mix

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

`mix_frequencies` is one video as the authors run it (the reference); `mix_frequencies_ragged` is the engine's:
every video of a batch at once, padded to the longest lists and masked, with the same result.
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


def mix_frequencies_ragged(content: torch.Tensor, low_rows: torch.Tensor, high_rows: torch.Tensor,
                           lfreq_projector: nn.Module, hfreq_projector: nn.Module, *,
                           scale_low_to_high: bool = False) -> torch.Tensor:
    """mix_frequencies for many videos at once, with no loop over them and no host sync: content [N, n, C] holds the
    frames of every video (concatenated); low_rows [B, Lmax] / high_rows [B, Hmax] long hold each video's low /
    high-frequency frames as rows of content, right-padded with -1 (each video has at least one of each). A video's
    tokens attend only to its own: padding reads a zero row (never another video's frames, which may hold NaN) and
    is masked out of both softmaxes; its results land in a spare row, dropped. Returns content + M."""
    num_frames, num_tokens, width = content.shape
    videos = low_rows.shape[0]
    spare = torch.cat([content, content.new_zeros(1, num_tokens, width)])   # row N: padding's zeros

    def gather(rows: torch.Tensor):
        rows = torch.where(rows >= 0, rows, num_frames)
        tokens = spare[rows].reshape(videos, -1, width)                      # [B, R * n, C]
        token_valid = (rows < num_frames).repeat_interleave(num_tokens, dim=1)   # [B, R * n]
        return tokens, token_valid, rows.flatten()

    low, low_valid, low_index = gather(low_rows)
    high, high_valid, high_index = gather(high_rows)
    low_keys, high_keys = lfreq_projector(low), hfreq_projector(high)
    masked = torch.finfo(content.dtype).min
    high_logits = (high_keys @ low_keys.transpose(1, 2) / math.sqrt(width)).masked_fill(~low_valid[:, None], masked)
    high_mix = torch.softmax(high_logits, dim=-1) @ low
    low_logits = low_keys @ high_keys.transpose(1, 2)
    if scale_low_to_high:
        low_logits = low_logits / math.sqrt(width)
    low_mix = torch.softmax(low_logits.masked_fill(~high_valid[:, None], masked), dim=-1) @ high
    mix = torch.zeros_like(spare)
    # High first, then low: a frame in both lists ends with its low-frequency mix, as in mix_frequencies. Padding
    # writes the spare row only (several times: whichever lands there is dropped).
    mix.index_copy_(0, high_index, high_mix.reshape(-1, num_tokens, width))
    mix.index_copy_(0, low_index, low_mix.reshape(-1, num_tokens, width))
    return content + mix[:num_frames]

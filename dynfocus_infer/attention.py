"""Attention backends: flash_attn when importable, torch SDPA otherwise."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [B, H, Sq, D], k/v: [B, H, Sk, D] -> [B, H, Sq, D]. Bidirectional by default (ViT, Q-Former)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)

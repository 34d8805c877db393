"""The whole SlowFocus model: CLIP ViT-L/14 -> (vlm_att_bert_proj ->) Q-Former -> SlowFocus connector -> LLaMA LLM.

`SlowFocusModel` holds the parts and encodes one video's frames into LLM-width tokens; the engine's focus
scheduling (two passes, feature cache) is not here. Every frame of a video is encoded with the same question, and
the frame order is the merged order of focus.merge_frame_indices (sparse and dense frames interleaved by index).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..llama import LlamaForCausalLM
from ..qformer import QFormerEncoder
from .clip_vit import CLIPVisionTower
from .config import SlowFocusConfig
from .frame_tokens import SlowFocusConnector


class SlowFocusModel(nn.Module):
    """vision_tower, qformer, connector and llm of one SlowFocus model (random until weights are loaded).

    The engine (core/visual_stage.py) runs it stage by stage: `encode_frames` for many videos' frames at once, then
    the Q-Former and `connector.forward_ragged` over a batch of videos; `encode_video` is one video, the reference."""

    family = "slowfocus"
    text_only = False

    def __init__(self, config: Optional[SlowFocusConfig] = None, *, llm: Optional[LlamaForCausalLM] = None):
        super().__init__()
        self.config = config = config or SlowFocusConfig()
        self.vision_tower = CLIPVisionTower(config.vit)
        self.qformer = QFormerEncoder(config.qformer)
        self.connector = SlowFocusConnector(config.connector)
        self.llm = llm if llm is not None else LlamaForCausalLM(config.llm)

    @property
    def tokens_per_frame(self) -> int:
        return self.config.connector.tokens_per_frame

    def encode_frames(self, pixels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Preprocessed frames [T, 3, H, W] -> patch features [T, S, C] (penultimate CLIP layer, no CLS)."""
        return self.vision_tower(pixels, chunk_size=chunk_size)

    @torch.inference_mode()
    def encode_video(self, pixels: torch.Tensor, question_ids: torch.Tensor, temporal_positions: torch.Tensor, *,
                     question_mask: Optional[torch.Tensor] = None, lfreq_ids: Optional[torch.Tensor] = None,
                     hfreq_ids: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
        """One video: pixels [T, 3, H, W] in merged frame order, question_ids [1, L] (Q-Former vocabulary),
        temporal_positions [T] (frame index / video frames), lfreq_ids / hfreq_ids from merge_frame_indices.
        Returns the video's LLM input tokens [T * tokens_per_frame, llm_width], frame by frame."""
        patch_features = self.vision_tower(pixels, chunk_size=chunk_size)
        text_q = self.qformer(self.connector.qformer_input(patch_features), question_ids, question_mask)
        tokens = self.connector(patch_features, text_q, temporal_positions, lfreq_ids, hfreq_ids)
        return tokens.flatten(0, 1)


def build_slowfocus(config: Optional[SlowFocusConfig] = None, *, seed: int = 0, device=None,
                    dtype: Optional[torch.dtype] = None) -> SlowFocusModel:
    """A SlowFocus model with seeded random weights (tests, benchmarks); the caller's RNG state is untouched.
    Load real weights with checkpoint.load_slowfocus_checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SlowFocusModel(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

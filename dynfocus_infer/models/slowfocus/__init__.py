"""The SlowFocus model family (fudan-zvg/SlowFocus, NeurIPS 2024): CLIP ViT-L/14, grid pooling + context token,
temporal embedding, mixing attention, loadable from the authors' checkpoint layout (the Focus section of DESIGN.md).

Where we follow what a checkpoint trained with the authors' code needs rather than the code as published:
- their `LlavaLlamaAttForCausalLM.forward` (and `prepare_inputs_for_generation`) never pass temporal_pos /
  lfreq_token_ids / hfreq_token_ids on, so the published forward cannot run; a checkpoint trained with the temporal
  embedding and mixing saw them, so `SlowFocusModel.encode_video` takes them as inputs;
- their low-to-high mixing scale is a discarded expression: mixing is unscaled in that direction by default;
- temporal buckets are floor(1000 tau) as their `.long()` truncates (not rounded), computed in fp64.
"""
from .checkpoint import export_slowfocus_state, load_slowfocus_checkpoint
from .clip_vit import CLIPVisionTower, convert_hf_clip_vision
from .config import CLIPViTConfig, SlowFocusConfig, SlowFocusConnectorConfig
from .frame_tokens import SlowFocusConnector, grid_pool, temporal_buckets
from .mixing_attention import mix_frequencies
from .model import SlowFocusModel, build_slowfocus
from .presets import SLOWFOCUS_PRESETS, LoadedSlowFocus, load_slowfocus, tiny_slowfocus_config

__all__ = ["CLIPVisionTower", "CLIPViTConfig", "LoadedSlowFocus", "SLOWFOCUS_PRESETS", "SlowFocusConfig",
           "SlowFocusConnector", "SlowFocusConnectorConfig", "SlowFocusModel", "build_slowfocus",
           "convert_hf_clip_vision", "export_slowfocus_state", "grid_pool", "load_slowfocus",
           "load_slowfocus_checkpoint", "mix_frequencies", "temporal_buckets", "tiny_slowfocus_config"]

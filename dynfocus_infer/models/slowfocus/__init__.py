"""The SlowFocus model family (fudan-zvg/SlowFocus, NeurIPS 2024): CLIP ViT-L/14, grid pooling + context token,
temporal embedding, mixing attention, loadable from the authors' checkpoint layout (the Focus section of DESIGN.md)."""
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

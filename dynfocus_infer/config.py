"""Dataclasses for every model part and engine knob, validated in __post_init__.

Defaults are the DynFocus-7B sizes (DESIGN.md sections 5 and 6); presets for smaller models live beside
the engine. Every check names the field and the allowed range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError


def _check(cond: bool, cls: str, name: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{name} = {value!r} is invalid: expected {allowed}")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and value >= 1, type(obj).__name__, name, value, "an integer >= 1")


@dataclass
class ViTConfig:
    """EVA ViT-g/14 (LAVIS `eva_vit_g`): 39 blocks used, CLS + patches out, no final norm."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
        _check(self.image_size % self.patch_size == 0, "ViTConfig", "image_size", self.image_size,
               f"a multiple of patch_size={self.patch_size}")
        _check(self.width % self.num_heads == 0, "ViTConfig", "width", self.width,
               f"a multiple of num_heads={self.num_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1


@dataclass
class QFormerConfig:
    """BERT-base Q-Former of InstructBLIP: queries + question tokens, cross-attention every 2nd layer."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 1408
    num_query_tokens: int = 32
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    output_width: int = 1408  # model.vlm_att_projector: hidden_size -> output_width

    def __post_init__(self):
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "cross_attention_freq",
                  "encoder_width", "num_query_tokens", "vocab_size", "max_position_embeddings", "output_width")
        _check(self.hidden_size % self.num_heads == 0, "QFormerConfig", "hidden_size", self.hidden_size,
               f"a multiple of num_heads={self.num_heads}")


@dataclass
class LlamaConfig:
    """LLaMA-family decoder. Defaults: Vicuna-7B v1.5."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "max_position_embeddings")
        _check(self.num_heads % self.num_kv_heads == 0, "LlamaConfig", "num_kv_heads", self.num_kv_heads,
               f"a divisor of num_heads={self.num_heads}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0, "LlamaConfig", "hidden_size", self.hidden_size,
                   f"a multiple of num_heads={self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        _check(self.rope_theta > 0, "LlamaConfig", "rope_theta", self.rope_theta, "> 0")


CONE_MODES = ("compressed", "uncompressed", "coarse", "off")


@dataclass
class ConnectorConfig:
    """DynFocus connector (DPE + CCE), DESIGN.md section 5.

    cone_mode selects the paper's Table 6 budgets for keyframes: "compressed" (h_t + G_t = 38 tokens, the default),
    "uncompressed" (all 256 patch tokens), "coarse" (keyframes encoded like other frames: 2/2), "off" (no cones).
    """

    vision_width: int = 1408
    llm_width: int = 4096
    qformer_width: int = 768
    num_queries: int = 32
    patch_grid: int = 16
    pool_grid: int = 4
    num_events: int = 25          # L = min(num_events, T)
    temporal_k: int = 5
    keep_ratio: float = 0.8       # K = max(1, round(keep_ratio * L))
    spatial_centers: tuple = (16, 6)
    spatial_k: tuple = (8, 3)
    rods: bool = True
    cone_mode: str = "compressed"
    perturb_samples: int = 500
    perturb_sigma: float = 0.1

    def __post_init__(self):
        _positive(self, "vision_width", "llm_width", "qformer_width", "num_queries", "patch_grid", "pool_grid",
                  "num_events", "temporal_k", "perturb_samples")
        _check(self.patch_grid % self.pool_grid == 0, "ConnectorConfig", "pool_grid", self.pool_grid,
               f"a divisor of patch_grid={self.patch_grid}")
        _check(0.0 < self.keep_ratio <= 1.0, "ConnectorConfig", "keep_ratio", self.keep_ratio, "in (0, 1]")
        self.spatial_centers = tuple(self.spatial_centers)
        self.spatial_k = tuple(self.spatial_k)
        _check(len(self.spatial_centers) == 2 and len(self.spatial_k) == 2, "ConnectorConfig", "spatial_centers",
               self.spatial_centers, "two layers (first, second) with a k for each")
        c1, c2 = self.spatial_centers
        _check(1 <= c1 <= self.patch_grid ** 2, "ConnectorConfig", "spatial_centers[0]", c1,
               f"in [1, {self.patch_grid ** 2}]")
        _check(1 <= c2 <= c1, "ConnectorConfig", "spatial_centers[1]", c2, f"in [1, {c1}]")
        _check(all(isinstance(k, int) and k >= 1 for k in self.spatial_k), "ConnectorConfig", "spatial_k",
               self.spatial_k, "integers >= 1")
        _check(self.cone_mode in CONE_MODES, "ConnectorConfig", "cone_mode", self.cone_mode, f"one of {CONE_MODES}")
        _check(self.rods or self.cone_mode != "off", "ConnectorConfig", "rods", self.rods,
               "True when cone_mode is 'off' (otherwise no frame gets a token)")
        _check(self.perturb_sigma > 0, "ConnectorConfig", "perturb_sigma", self.perturb_sigma, "> 0")

    @property
    def num_pooled(self) -> int:
        """P: tokens per frame after the 2-D average pool (16 for a 4x4 grid)."""
        return self.pool_grid * self.pool_grid

    @property
    def num_spatial_tokens(self) -> int:
        """|G_t|: first- plus second-layer spatial prototypes (22 by default)."""
        return sum(self.spatial_centers)


@dataclass
class ModelConfig:
    """A whole DynFocus model: vision tower, Q-Former, connector, LLM."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)

    def __post_init__(self):
        _check(self.connector.vision_width == self.vit.width, "ModelConfig", "connector.vision_width",
               self.connector.vision_width, f"equal to vit.width={self.vit.width}")
        _check(self.qformer.encoder_width == self.vit.width, "ModelConfig", "qformer.encoder_width",
               self.qformer.encoder_width, f"equal to vit.width={self.vit.width}")
        _check(self.connector.llm_width == self.llm.hidden_size, "ModelConfig", "connector.llm_width",
               self.connector.llm_width, f"equal to llm.hidden_size={self.llm.hidden_size}")
        _check(self.connector.patch_grid == self.vit.grid, "ModelConfig", "connector.patch_grid",
               self.connector.patch_grid, f"equal to the ViT grid {self.vit.grid}")

"""Configs of the SlowFocus model family (fudan-zvg/SlowFocus, NeurIPS 2024; the Focus section of DESIGN.md).

Defaults are the authors' 7B sizes: CLIP ViT-L/14 at 224 px read at its penultimate layer, a BERT-base Q-Former
pretrained on EVA features (1408 wide, reached through `vlm_att_bert_proj`), 8x8 grid pooling, a 1000-bucket
temporal embedding, the "bi" mixing attention and Vicuna-7B v1.5.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import LlamaConfig, QFormerConfig, _check, _positive

CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
# "bi": low/high-frequency projectors, applied (the only variant the authors' forward applies);
# "v1": the same projectors exist in the checkpoint but the authors' forward never reads them;
# "qkv": q/k/v projectors exist (the authors build them for any other non-empty mix_attn) and are never read;
# "none": no mixing parameters.
MIX_ATTN_MODES = ("bi", "v1", "qkv", "none")


@dataclass
class CLIPViTConfig:
    """CLIP vision tower (transformers `CLIPVisionModel` layout). Defaults: openai/clip-vit-large-patch14 (224 px)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2   # LLaVA's mm_vision_select_layer: index into hidden_states (embeddings, layer 1, ...)

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
        _check(self.image_size % self.patch_size == 0, "CLIPViTConfig", "image_size", self.image_size,
               f"a multiple of patch_size={self.patch_size}")
        _check(self.width % self.num_heads == 0, "CLIPViTConfig", "width", self.width,
               f"a multiple of num_heads={self.num_heads}")
        _check(self.hidden_act in CLIP_ACTIVATIONS, "CLIPViTConfig", "hidden_act", self.hidden_act,
               f"one of {CLIP_ACTIVATIONS}")
        _check(isinstance(self.select_layer, int) and -self.depth - 1 <= self.select_layer <= self.depth
               and self.select_layer != 0, "CLIPViTConfig", "select_layer", self.select_layer,
               f"a non-zero hidden_states index in [{-self.depth - 1}, {self.depth}]")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_layers_run(self) -> int:
        """Encoder layers that feed hidden_states[select_layer] (23 of 24 for -2)."""
        return self.select_layer if self.select_layer > 0 else self.depth + 1 + self.select_layer


@dataclass
class SlowFocusConnectorConfig:
    """Per-frame token generation, temporal embedding and mixing attention (authors' `token_generation`)."""

    vision_width: int = 1024      # mm_hidden_size
    llm_width: int = 4096
    qformer_width: int = 1408     # the Q-Former's encoder_width; vlm_att_bert_proj maps vision_width to it
    patch_grid: int = 16
    pool_grid: int = 8            # compress_type "grid:8"
    temporal_buckets: int = 1000  # nn.Embedding(1000, 1024); 0: no temporal embedding (config.json without it)
    mix_attn: str = "bi"
    scale_low_to_high: bool = False  # see mixing_attention.mix_frequencies: the authors' line is a no-op

    def __post_init__(self):
        _positive(self, "vision_width", "llm_width", "qformer_width", "patch_grid", "pool_grid")
        _check(self.pool_grid >= 2 and self.patch_grid % self.pool_grid == 0, "SlowFocusConnectorConfig",
               "pool_grid", self.pool_grid, f"an integer >= 2 dividing patch_grid={self.patch_grid}")
        _check(isinstance(self.temporal_buckets, int) and self.temporal_buckets >= 0, "SlowFocusConnectorConfig",
               "temporal_buckets", self.temporal_buckets, "an integer >= 0 (0: no temporal embedding)")
        _check(self.mix_attn in MIX_ATTN_MODES, "SlowFocusConnectorConfig", "mix_attn", self.mix_attn,
               f"one of {MIX_ATTN_MODES}")

    @property
    def tokens_per_frame(self) -> int:
        """1 context token + pool_grid^2 content tokens (65 for the 7B model)."""
        return 1 + self.pool_grid * self.pool_grid

    @property
    def needs_bert_proj(self) -> bool:
        """The authors build vlm_att_bert_proj only when the vision width differs from the Q-Former's."""
        return self.vision_width != self.qformer_width


def _slowfocus_qformer() -> QFormerConfig:
    return QFormerConfig(encoder_width=1408, output_width=1024)


@dataclass
class SlowFocusConfig:
    """A whole SlowFocus model: CLIP tower, Q-Former, connector, LLM."""

    vit: CLIPViTConfig = field(default_factory=CLIPViTConfig)
    qformer: QFormerConfig = field(default_factory=_slowfocus_qformer)
    connector: SlowFocusConnectorConfig = field(default_factory=SlowFocusConnectorConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)

    def __post_init__(self):
        _check(self.connector.vision_width == self.vit.width, "SlowFocusConfig", "connector.vision_width",
               self.connector.vision_width, f"equal to vit.width={self.vit.width}")
        _check(self.connector.patch_grid == self.vit.grid, "SlowFocusConfig", "connector.patch_grid",
               self.connector.patch_grid, f"equal to the ViT grid {self.vit.grid}")
        _check(self.qformer.encoder_width == self.connector.qformer_width, "SlowFocusConfig", "qformer.encoder_width",
               self.qformer.encoder_width, f"equal to connector.qformer_width={self.connector.qformer_width}")
        # vlm_att_projector maps the Q-Former to mm_hidden_size: the context token's queries meet vision keys there.
        _check(self.qformer.output_width == self.vit.width, "SlowFocusConfig", "qformer.output_width",
               self.qformer.output_width, f"equal to vit.width={self.vit.width}")
        _check(self.connector.llm_width == self.llm.hidden_size, "SlowFocusConfig", "connector.llm_width",
               self.connector.llm_width, f"equal to llm.hidden_size={self.llm.hidden_size}")

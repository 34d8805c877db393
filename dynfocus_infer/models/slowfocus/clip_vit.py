"""CLIP ViT (ViT-L/14 at 224 px for SlowFocus): the vision tower as LLaVA's `CLIPVisionTower` reads it.

Pre-norm transformer behind a `pre_layrnorm`; quick-GELU MLP; q/k/v/out projections with biases. SlowFocus reads
hidden_states[-2] (the output of the penultimate encoder layer, LLaVA's mm_vision_select_layer = -2) and drops the
CLS token (select_feature "patch"), so the last layer and `post_layernorm` never run. They are still built: a
transformers `CLIPVisionModel` state dict (and the authors' `model.vision_tower.vision_tower.*` keys) then loads with
strict key checks, tensor for tensor.

Parameter names are transformers' (`vision_model.embeddings.class_embedding`, `vision_model.pre_layrnorm`,
`vision_model.encoder.layers.N.self_attn.q_proj`, ...), the spelling `pre_layrnorm` included.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention import dense_attention
from ...errors import CheckpointError
from ...weights import load_into
from .config import CLIPViTConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPViTConfig):
        super().__init__()
        width = config.width
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, -1).transpose(1, 2)

        out = dense_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, width))


class CLIPMlp(nn.Module):
    def __init__(self, config: CLIPViTConfig):
        super().__init__()
        self.activation = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPViTConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(config.grid * config.grid + 1, config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


class CLIPTransformer(nn.Module):
    """The `vision_model` of transformers' CLIPVisionModel."""

    def __init__(self, config: CLIPViTConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.depth))
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPVisionTower(nn.Module):
    """pixels [N, 3, H, W] (CLIP-normalised) -> patch features [N, grid^2, width] of hidden_states[select_layer]."""

    def __init__(self, config: Optional[CLIPViTConfig] = None):
        super().__init__()
        self.config = config = config or CLIPViTConfig()
        self.vision_model = CLIPTransformer(config)
        self._init_random()

    @torch.no_grad()
    def _init_random(self) -> None:
        # Only for runs without a checkpoint: small weights keep the residual stream finite in fp16.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.vision_model.embeddings.class_embedding, std=0.02)

    def forward(self, pixels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Encodes frames `chunk_size` at a time (all at once when None) to bound activation memory."""
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"CLIPVisionTower expects pixels [N, 3, {size}, {size}], got {list(pixels.shape)}: "
                             f"resize and centre-crop frames to the tower's image_size first")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size = {chunk_size} is invalid: expected None or an integer >= 1")
        if chunk_size is None or chunk_size >= pixels.shape[0]:
            return self._encode(pixels)
        return torch.cat([self._encode(pixels[start:start + chunk_size])
                          for start in range(0, pixels.shape[0], chunk_size)])

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixels.to(tower.pre_layrnorm.weight.dtype)))
        for layer in tower.encoder.layers[:self.config.num_layers_run]:
            x = layer(x)
        return x[:, 1:]

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], *, source: str = "CLIP vision checkpoint",
                        device=None, dtype=None) -> "CLIPVisionTower":
        """Loads a transformers CLIPVisionModel or CLIPModel state dict (only `vision_model.*` is read from the
        latter); every weight of the tower must be present."""
        return load_into(self, convert_hf_clip_vision(state_dict, source=source), strict=True, source=source,
                         device=device, dtype=dtype)


def convert_hf_clip_vision(state_dict: Mapping[str, torch.Tensor], *,
                           source: str = "CLIP vision state dict") -> dict[str, torch.Tensor]:
    """transformers CLIP vision weights -> CLIPVisionTower keys (`vision_model.*`). Takes a CLIPModel or a
    transformers 4.x CLIPVisionModel (keys `vision_model.*`: the text tower and projections are dropped) or a
    transformers 5 CLIPVisionModel state dict (the same names without the `vision_model.` prefix). Drops the
    `position_ids` buffer older transformers saved."""
    if any(k.startswith("vision_model.") for k in state_dict):
        vision = {k: v for k, v in state_dict.items() if k.startswith("vision_model.")}
    elif any(k.startswith(("embeddings.", "encoder.layers.")) for k in state_dict):
        vision = {f"vision_model.{k}": v for k, v in state_dict.items()}
    else:
        raise CheckpointError(f"{source} holds no CLIP vision tensors (`vision_model.*`): pass a transformers "
                              f"CLIPVisionModel or CLIPModel checkpoint (e.g. openai/clip-vit-large-patch14)")
    return {k: v for k, v in vision.items() if not k.endswith("embeddings.position_ids")}

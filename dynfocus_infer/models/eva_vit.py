"""EVA ViT-g/14, the frozen vision tower of BLIP-2 / InstructBLIP / LLaMA-VID / DynFocus (DESIGN.md section 6).

Pre-norm transformer: x += Attn(LN1(x)); x += MLP(LN2(x)), with a plain GELU MLP (LAVIS `eva_vit.Mlp`), q and v biases
but no k bias, learned absolute position embeddings and a CLS token. The output is every token (CLS + patches) of the
last block, with no final norm: LAVIS builds 39 of the checkpoint's 40 blocks and DynFocus reads `forward_features`.

Parameter names follow the LAVIS `eva_vit_g.pth` layout, so that file loads after dropping its 40th block;
`convert_hf_vision` maps the transformers InstructBLIP / BLIP-2 `vision_model.*` layout onto the same names.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import dense_attention
from ..config import ViTConfig
from ..errors import CheckpointError
from ..weights import load_into


class EvaAttention(nn.Module):
    """Multi-head self-attention with q and v biases only (LAVIS `eva_vit.Attention`, qkv_bias=True)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = dense_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = EvaAttention(config.width, config.num_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = EvaMlp(config.width, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; the submodule exists so the LAVIS `patch_embed.proj.*` names fit."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EvaViT(nn.Module):
    """pixels [N, 3, H, W] (CLIP-normalised) -> tokens [N, 1 + grid^2, width] from the last block, no final norm."""

    def __init__(self, config: Optional[ViTConfig] = None):
        super().__init__()
        self.config = config = config or ViTConfig()
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.width))
        self.blocks = nn.ModuleList(EvaBlock(config) for _ in range(config.depth))
        self._init_random()

    @torch.no_grad()
    def _init_random(self) -> None:
        # Only for runs without a checkpoint: small weights keep 39 residual blocks finite in fp16.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, pixels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Encodes frames `chunk_size` at a time (all at once when None) to bound activation memory."""
        size = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != size or pixels.shape[3] != size:
            raise ValueError(f"EvaViT expects pixels [N, 3, {size}, {size}], got {list(pixels.shape)}: "
                             f"resize and centre-crop frames to the ViT's image_size first")
        num_frames = pixels.shape[0]
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size = {chunk_size} is invalid: expected None or an integer >= 1")
        if chunk_size is None or chunk_size >= num_frames:
            return self._encode(pixels)
        dtype = self.cls_token.dtype
        out = torch.empty(num_frames, self.config.num_tokens, self.config.width, dtype=dtype, device=pixels.device)
        for start in range(0, num_frames, chunk_size):
            out[start:start + chunk_size] = self._encode(pixels[start:start + chunk_size])
        return out

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], *, layout: str = "lavis",
                        source: str = "EVA ViT checkpoint", device=None, dtype=None) -> "EvaViT":
        """Loads a LAVIS (`layout="lavis"`) or transformers (`"hf"`) state dict; every weight must be present.
        Build the module on the meta device first to skip the random initialisation and hold no second copy."""
        converters = {"lavis": convert_lavis_eva_vit, "hf": convert_hf_vision}
        if layout not in converters:
            raise ValueError(f"layout = {layout!r} is invalid: expected one of {sorted(converters)}")
        return load_into(self, converters[layout](state_dict, self.config), strict=True, source=source,
                         device=device, dtype=dtype)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.cls_token.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts -> EvaViT names


def check_converted(converted: Mapping[str, torch.Tensor], reference: nn.Module, *, source: str,
                    may_omit: tuple[str, ...] = ()) -> None:
    """Raises CheckpointError naming the missing, unexpected and wrong-shape keys of `converted` against the
    state dict of `reference` (build it on the meta device: only names and shapes are read). Keys starting with
    a `may_omit` prefix may be absent (parts a layout does not hold), but must have the right shape if present."""
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    missing = sorted(k for k in set(expected) - set(converted) if not k.startswith(may_omit))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(f"{k} {tuple(converted[k].shape)} != {expected[k]}"
                         for k in set(expected) & set(converted) if tuple(converted[k].shape) != expected[k])
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                if keys]
    if problems:
        raise CheckpointError(f"{source} does not match {type(reference).__name__}: " + "; ".join(problems)
                              + ". Check that the checkpoint and the model config describe the same model.")


def _meta_vit(config: ViTConfig) -> EvaViT:
    with torch.device("meta"):
        return EvaViT(config)


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def convert_lavis_eva_vit(state_dict: Mapping[str, torch.Tensor],
                          config: Optional[ViTConfig] = None) -> dict[str, torch.Tensor]:
    """LAVIS `eva_vit_g.pth` -> EvaViT names. The file holds 40 blocks; LAVIS builds `depth` = 39 and loads with
    strict=False, so blocks >= config.depth are dropped here. Everything else must match exactly."""
    config = config or ViTConfig()
    converted = {}
    for name, tensor in state_dict.items():
        block = _BLOCK_KEY.match(name)
        if block and int(block.group(1)) >= config.depth:
            continue
        converted[name] = tensor
    check_converted(converted, _meta_vit(config), source="LAVIS EVA ViT state dict")
    return converted


_HF_VISION_RENAMES = (
    (re.compile(r"^embeddings\.class_embedding$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embedding$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embedding\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$"), r"blocks.\1.norm\2.\3"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$"), r"blocks.\1.attn.qkv.weight"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qv]_bias)$"), r"blocks.\1.attn.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$"), r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"), r"blocks.\1.mlp.\2.\3"),
)
_HF_FUSED_QKV_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def convert_hf_vision(state_dict: Mapping[str, torch.Tensor],
                      config: Optional[ViTConfig] = None) -> dict[str, torch.Tensor]:
    """transformers InstructBLIP / BLIP-2 vision tower -> EvaViT names.

    Takes the vision keys alone or a whole InstructBLIP state dict (then only `vision_model.*` is read).
    transformers stores one fused `qkv.bias` = cat(q_bias, 0, v_bias); it is split back into q_bias and v_bias.
    A non-zero k part would be dropped without changing the output: q.(k + b) shifts every score of a softmax row
    by the same q.b. `post_layernorm` is not part of the ViT (DynFocus reads the last block un-normed): it is the
    Q-Former's `vlm_att_ln`, which `qformer.convert_hf_qformer` picks up from a whole InstructBLIP state dict.
    Blocks >= config.depth are dropped, as for the LAVIS layout.
    """
    config = config or ViTConfig()
    if any(name.startswith("vision_model.") for name in state_dict):
        state_dict = {name[len("vision_model."):]: t for name, t in state_dict.items()
                      if name.startswith("vision_model.")}
    converted, unmapped = {}, []
    for name, tensor in state_dict.items():
        if name.startswith("post_layernorm."):
            continue
        layer = re.match(r"^encoder\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= config.depth:
            continue
        fused = _HF_FUSED_QKV_BIAS.match(name)
        if fused:
            q_bias, _, v_bias = tensor.chunk(3)
            converted[f"blocks.{fused.group(1)}.attn.q_bias"] = q_bias
            converted[f"blocks.{fused.group(1)}.attn.v_bias"] = v_bias
            continue
        for pattern, target in _HF_VISION_RENAMES:
            if pattern.match(name):
                converted[pattern.sub(target, name)] = tensor
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise CheckpointError(f"HF vision state dict has keys with no EvaViT counterpart: "
                              f"{', '.join(sorted(unmapped)[:12])}. Pass the `vision_model.*` part of an "
                              f"InstructBLIP / BLIP-2 checkpoint.")
    check_converted(converted, _meta_vit(config), source="HF vision state dict")
    return converted

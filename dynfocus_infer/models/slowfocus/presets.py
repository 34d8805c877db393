"""Named SlowFocus builds (the models alone). dynfocus_infer.presets.load_model wraps them for the engine with
their tokenizers (`LLM("slowfocus-tiny")`, `LLM("slowfocus-7b", random_weights=True)`, an authors'-layout directory).

- "slowfocus-7b": the authors' sizes (CLIP ViT-L/14 224 px, Q-Former on 1408-wide inputs, 8x8 grid, Vicuna-7B).
  No weights have been published: give a checkpoint directory in the authors' layout, or random_weights=True for
  shapes and benchmarks (the notice then says every weight is random). device="meta" builds shapes only.
- "slowfocus-tiny": a few-layer random model at test sizes (the notice says so).
- a directory: the authors' layout at the paper's vision sizes and the LLM sizes of its config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...config import LlamaConfig, QFormerConfig
from ...errors import ConfigError
from ...weights import read_official_config
from ..llama import RMSNorm
from .checkpoint import load_slowfocus_checkpoint
from .config import CLIPViTConfig, SlowFocusConfig, SlowFocusConnectorConfig
from .model import SlowFocusModel, build_slowfocus

SLOWFOCUS_PRESETS = ("slowfocus-7b", "slowfocus-tiny")
RANDOM_NOTICE = ("every weight is random (no SlowFocus checkpoint has been published): outputs are meaningless; "
                 "load a checkpoint directory in the authors' layout for real answers")


@dataclass
class LoadedSlowFocus:
    """A SlowFocus model and what to tell users about its weights (None when they came from a checkpoint)."""

    name: str
    model: SlowFocusModel
    notice: Optional[str]


def tiny_slowfocus_config(*, mix_attn: str = "bi", temporal_buckets: int = 1000) -> SlowFocusConfig:
    """Test sizes: 56 px / patch 7 (8x8 patches pooled to 4x4), a 2-layer 32-wide tower, a 2-layer Q-Former reading
    48-wide inputs through vlm_att_bert_proj, a 2-layer 64-wide LLM."""
    vit = CLIPViTConfig(image_size=56, patch_size=7, width=32, depth=3, num_heads=4, mlp_dim=64)
    qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=48,
                            num_query_tokens=4, vocab_size=128, max_position_embeddings=64, output_width=vit.width)
    connector = SlowFocusConnectorConfig(vision_width=vit.width, llm_width=64, qformer_width=48, patch_grid=vit.grid,
                                         pool_grid=4, temporal_buckets=temporal_buckets, mix_attn=mix_attn)
    llm = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512)
    return SlowFocusConfig(vit=vit, qformer=qformer, connector=connector, llm=llm)


def _paper_random(device: torch.device, dtype: torch.dtype, seed: int) -> SlowFocusModel:
    with torch.device("meta"):
        model = SlowFocusModel(SlowFocusConfig())
    model = model.to(dtype).to_empty(device=device)  # cast on meta first: never 7B parameters in fp32
    if device.type == "meta":
        return model.eval().requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # unit scales, zero shifts: a random gamma would distort every activation
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model.eval().requires_grad_(False)


def load_slowfocus(model: str, *, device=None, dtype: Optional[torch.dtype] = None, seed: int = 0,
                   random_weights: bool = False, vision_tower: Optional[str] = None) -> LoadedSlowFocus:
    """Build a SlowFocus preset or load a checkpoint directory in the authors' layout (see the module docstring).
    Default device: CUDA when available; default dtype: bf16 on CUDA, fp32 elsewhere."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model == "slowfocus-tiny":
        return LoadedSlowFocus(model, build_slowfocus(tiny_slowfocus_config(), seed=seed, device=device, dtype=dtype),
                               RANDOM_NOTICE)
    if model == "slowfocus-7b":
        if not random_weights:
            raise ConfigError("model 'slowfocus-7b' needs weights: none have been published, so pass a checkpoint "
                              "directory in the authors' layout, or random_weights=True to build random weights at "
                              "the paper's sizes")
        return LoadedSlowFocus(model, _paper_random(device, dtype, seed), RANDOM_NOTICE)
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"model {model!r} is neither a SlowFocus preset ({', '.join(SLOWFOCUS_PRESETS)}) nor a "
                          f"checkpoint directory")
    llm_config, mm = read_official_config(path)
    config = slowfocus_config_from_json(json.loads((path / "config.json").read_text()), llm_config)
    with torch.device("meta"):
        built = SlowFocusModel(config)
    load_slowfocus_checkpoint(built, path, vision_tower=vision_tower, device=device, dtype=dtype)
    return LoadedSlowFocus(str(path), built.eval().requires_grad_(False), None)


def slowfocus_config_from_json(raw: dict, llm_config: LlamaConfig) -> SlowFocusConfig:
    """Sizes from an authors' config.json: mm_hidden_size, bert_type ("pretrain" -> the Q-Former reads 1408-wide
    EVA-sized inputs), compress_type "grid:N", temporal_embedding "v1", mix_attn. A "slowfocus" block
    ({"vit": {...}, "qformer": {...}, "connector": {...}}, our extension for small checkpoints) overrides them."""
    sizes = raw.get("slowfocus", {})
    vit = CLIPViTConfig(**{"width": raw.get("mm_hidden_size", 1024),
                           "select_layer": raw.get("mm_vision_select_layer", -2), **sizes.get("vit", {})})
    qformer_width = 1408 if "pretrain" in raw.get("bert_type", "qformer_pretrain") else vit.width
    compress = str(raw.get("compress_type") or "grid:8")
    if not compress.startswith("grid:"):
        raise ConfigError(f"compress_type = {compress!r} is not supported: SlowFocus checkpoints use 'grid:N'")
    connector = SlowFocusConnectorConfig(**{
        "vision_width": vit.width, "llm_width": llm_config.hidden_size, "qformer_width": qformer_width,
        "patch_grid": vit.grid, "pool_grid": int(compress.split("grid:")[-1]),
        "temporal_buckets": 1000 if raw.get("temporal_embedding") == "v1" else 0,
        "mix_attn": mix_attn_mode(raw.get("mix_attn")), **sizes.get("connector", {})})
    qformer = QFormerConfig(**{"encoder_width": connector.qformer_width, "output_width": vit.width,
                               "num_query_tokens": raw.get("num_query", 32), **sizes.get("qformer", {})})
    return SlowFocusConfig(vit=vit, qformer=qformer, connector=connector, llm=llm_config)


def mix_attn_mode(value: Optional[str]) -> str:
    """The authors' config.json `mix_attn` -> ours. They build the low/high-frequency projectors when the string
    contains "v1" or "bi", q/k/v projectors for any other non-empty string, and apply mixing only for exactly
    "bi": so "bi" -> "bi", other strings containing "v1" or "bi" -> "v1" (projectors, unused), others -> "qkv"."""
    if not value:
        return "none"
    if value == "bi":
        return "bi"
    return "v1" if ("v1" in value or "bi" in value) else "qkv"

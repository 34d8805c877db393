"""The SlowFocus authors' checkpoint layout (a LLaVA `LlavaLlamaAttForCausalLM` directory) <-> SlowFocusModel.

Authors' names (HF shards, `model.` prefix):
- LLM: model.embed_tokens.*, model.layers.*, model.norm.*, lm_head.*
- Q-Former: model.vlm_att_encoder.bert.*, model.vlm_att_query, model.vlm_att_ln.*, model.vlm_att_projector.*
- connector: model.mm_projector.{0,2}.*, model.vlm_att_key_projector.*, model.vlm_att_val_projector.*,
  model.vlm_att_bert_proj.*, model.temporal_embedding.weight, model.mix_attn_*_projector.*
- vision tower: model.vision_tower.vision_tower.vision_model.* (LLaVA's CLIPVisionTower wrapping transformers'
  CLIPVisionModel) when the shards hold it; LLaVA-style releases usually do not, and then it comes from a separate
  transformers CLIP checkpoint (the config's mm_vision_tower, e.g. openai/clip-vit-large-patch14).
Every part is loaded with strict key checks; tensors that belong to no part raise CheckpointError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from ...errors import CheckpointError
from ...weights import load_into, read_state_dict
from ..qformer import convert_official_qformer, export_official_qformer
from .clip_vit import convert_hf_clip_vision
from .model import SlowFocusModel

LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
VISION_TOWER_PREFIX = "model.vision_tower.vision_tower."
QFORMER_PARTS = ("vlm_att_encoder.", "vlm_att_query", "vlm_att_ln.", "vlm_att_projector.")
CONNECTOR_PARTS = ("mm_projector.", "vlm_att_key_projector.", "vlm_att_val_projector.", "vlm_att_bert_proj.",
                   "temporal_embedding.", "mix_attn_")


def _short(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def convert_slowfocus_connector(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' connector tensors (with or without `model.`) -> SlowFocusConnector names; other keys are ignored."""
    return {_short(k): v for k, v in state_dict.items()
            if _short(k).startswith(CONNECTOR_PARTS) and not k.startswith(VISION_TOWER_PREFIX)}


def export_slowfocus_state(model: SlowFocusModel, *, with_vision_tower: bool = True) -> dict[str, torch.Tensor]:
    """SlowFocusModel -> a state dict in the authors' layout (the inverse of load_slowfocus_checkpoint)."""
    state = dict(model.llm.state_dict())
    state.update(export_official_qformer(model.qformer.state_dict()))
    state.update({f"model.{k}": v for k, v in model.connector.state_dict().items()})
    if with_vision_tower:
        state.update({VISION_TOWER_PREFIX + k: v for k, v in model.vision_tower.state_dict().items()})
    return state


def load_slowfocus_checkpoint(model: SlowFocusModel, directory: str | Path, *,
                              vision_tower: Optional[str | Path] = None, device=None, dtype=None) -> SlowFocusModel:
    """Fill `model` from a checkpoint directory in the authors' layout (config.json + shards or one file).

    The vision tower comes from the shards' `model.vision_tower.vision_tower.*` keys, else from `vision_tower`
    (a transformers CLIPVisionModel / CLIPModel file or directory). Missing, mis-shaped and unknown tensors raise
    CheckpointError naming the part and the keys. Build the model on the meta device to skip its random init.
    """
    directory = Path(directory)
    state = read_state_dict(directory)
    source = str(directory)
    # transformers <= 4.31 (LLaVA's pin) saved RoPE's inv_freq buffer with every layer; we compute it.
    llm_state = {k: v for k, v in state.items()
                 if k.startswith(LLM_PREFIXES) and not k.endswith("rotary_emb.inv_freq")}
    load_into(model.llm, llm_state, source=f"{source} (LLM)", device=device, dtype=dtype)
    qformer_state = convert_official_qformer(state, model.config.qformer)
    load_into(model.qformer, qformer_state, source=f"{source} (Q-Former)", device=device, dtype=dtype)
    load_into(model.connector, convert_slowfocus_connector(state), source=f"{source} (connector)", device=device,
              dtype=dtype)
    vision_state = {k[len(VISION_TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_TOWER_PREFIX)}
    vision_source = f"{source} ({VISION_TOWER_PREFIX}*)"
    if not vision_state:
        if vision_tower is None:
            raise CheckpointError(f"{source} holds no vision tower weights ({VISION_TOWER_PREFIX}*): pass "
                                  f"vision_tower=<a transformers CLIP checkpoint, e.g. openai/clip-vit-large-patch14>")
        vision_state, vision_source = read_state_dict(vision_tower), str(vision_tower)
    model.vision_tower.load_checkpoint(convert_hf_clip_vision(vision_state, source=vision_source),
                                       source=vision_source, device=device, dtype=dtype)
    known = LLM_PREFIXES + (VISION_TOWER_PREFIX,) + tuple(p + part for p in ("model.", "")
                                                           for part in QFORMER_PARTS + CONNECTOR_PARTS)
    leftover = sorted(k for k in state if not k.startswith(known))
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
        raise CheckpointError(f"{source}: {len(leftover)} tensors belong to no part of SlowFocus: {shown}. Check "
                              f"the connector config (mix_attn, temporal_buckets) against the checkpoint")
    return model

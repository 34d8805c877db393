"""The whole DynFocus model: EVA ViT-g -> Q-Former -> DynFocus connector -> LLaMA-family LLM (DESIGN.md 3).

`DynFocusModel` holds the parts; the engine runs them stage by stage (timing each) over a ragged batch. `load_official_checkpoint` fills it from an official DynFocus / LLaMA-VID checkpoint directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..weights import load_into, read_state_dict
from .connector import DynFocusConnector, convert_official_connector
from .eva_vit import EvaViT
from .llama import LlamaForCausalLM
from .qformer import QFormerEncoder, convert_official_qformer

LLM_KEY_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
VISION_TOWER_PREFIX = "model.vision_tower.vision_tower."
# Names of the multimodal parts in official checkpoints (with and without the leading "model.").
OFFICIAL_MM_PREFIXES = tuple(p + part for p in ("model.", "") for part in (
    "vlm_att_", "mm_projector.", "selective_net.", "merge."))


class DynFocusModel(nn.Module):
    """vit, qformer, connector and llm of one DynFocus model (random initialisation until weights are loaded).
    text_only=True keeps the LLM alone (a plain chat model: the engine then refuses video requests)."""

    def __init__(self, config: ModelConfig, *, cluster_backend: str = "auto",
                 llm: Optional[LlamaForCausalLM] = None, text_only: bool = False):
        super().__init__()
        self.config = config
        self.text_only = text_only
        self.family = "dynfocus"      # the engine's visual stage runs each family its own way (SlowFocus: "slowfocus")
        if not text_only:
            self.vit = EvaViT(config.vit)
            self.qformer = QFormerEncoder(config.qformer)
            self.connector = DynFocusConnector(config.connector, cluster_backend=cluster_backend)
        self.llm = llm if llm is not None else LlamaForCausalLM(config.llm)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Preprocessed frames [N, 3, H, W] -> ViT tokens [N, 257, C] (CLS + patches, no final norm)."""
        return self.vit(pixels.to(self.vit.cls_token.dtype), chunk_size=chunk_size)


def _take(state: dict, prefixes: Sequence[str]) -> dict:
    # transformers <= 4.31 (LLaMA-VID's pin) saved RoPE's inv_freq buffer with every layer; we compute it.
    return {k: v for k, v in state.items() if k.startswith(tuple(prefixes)) and not k.endswith("rotary_emb.inv_freq")}


def load_official_checkpoint(model: DynFocusModel, directory: str | Path, *, vision_tower: Optional[str | Path] = None,
                             device=None, dtype=None) -> DynFocusModel:
    """Fill `model` from an official checkpoint directory (config.json + shards, LLaMA-VID key layout).

    The LLM, Q-Former and connector come from the shards. The ViT comes from `model.vision_tower.vision_tower.*`
    keys when the shards hold them, else from `vision_tower` (a LAVIS eva_vit_g.pth) or `<directory>/eva_vit_g.pth`.
    Keys that belong to no part raise CheckpointError, as do missing or mis-shaped ones.
    """
    directory = Path(directory)
    state = read_state_dict(directory)
    source = str(directory)
    load_into(model.llm, _take(state, LLM_KEY_PREFIXES), source=f"{source} (LLM)", device=device, dtype=dtype)
    qformer_state = convert_official_qformer(state, model.config.qformer)
    load_into(model.qformer, qformer_state, source=f"{source} (Q-Former)", device=device, dtype=dtype)
    connector_state = convert_official_connector(state, model.config.connector)
    load_into(model.connector, connector_state, source=f"{source} (connector)", device=device, dtype=dtype)
    vit_state = {k[len(VISION_TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_TOWER_PREFIX)}
    if not vit_state:
        vit_path = Path(vision_tower) if vision_tower else directory / "eva_vit_g.pth"
        if not vit_path.exists():
            raise CheckpointError(f"{source} holds no vision tower weights and {vit_path} does not exist: pass "
                                  f"vision_tower=<path of the LAVIS eva_vit_g.pth>")
        vit_state, source_vit = read_state_dict(vit_path), str(vit_path)
    else:
        source_vit = f"{source} ({VISION_TOWER_PREFIX}*)"
    model.vit.load_checkpoint(vit_state, layout="lavis", source=source_vit, device=device, dtype=dtype)
    known = LLM_KEY_PREFIXES + (VISION_TOWER_PREFIX,) + OFFICIAL_MM_PREFIXES
    leftover = sorted(k for k in state if not k.startswith(known))
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
        raise CheckpointError(f"{source}: {len(leftover)} tensors belong to no part of DynFocus: {shown}")
    return model


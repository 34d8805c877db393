"""The InstructBLIP Q-Former as LLaMA-VID and DynFocus call it (DESIGN.md sections 3 and 6).

Per frame t: v_t [S, 1408] -> vlm_att_ln -> BERT-base over [32 learned queries; question tokens] with joint
self-attention (text padding masked), cross-attention from the query positions to v_t on every
`cross_attention_freq`-th layer, separate FFNs for query and text positions -> the 32 query states of the last
layer -> vlm_att_projector (768 -> 1408) -> q_emb_t [32, 1408] (official `vlm_attention`).

Parameter names are the official ones without the leading `model.` (`vlm_att_query`, `vlm_att_ln.*`,
`vlm_att_projector.*`), and `bert.*` follows the LAVIS / LLaMA-VID BertModel layout
(`embeddings.LayerNorm`, `encoder.layer.N.attention.self.query`, `crossattention`, `intermediate_query`, ...).

Two exact savings over the official per-frame loop, neither of which changes a value:
- layer 0's self-attention and text FFN see only the learned queries and the question, so they run once per
  question and are gathered to the frames afterwards (frames first differ at layer 0's cross-attention);
- the last layer computes self-attention rows and FFN for the query positions only, the only ones read.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import dense_attention
from ..config import QFormerConfig
from ..weights import load_into
from .eva_vit import check_converted


class QFormerProjections(nn.Module):
    """query / key / value projections (`BertSelfAttention`); key and value read kv_width-wide context."""

    def __init__(self, hidden_size: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)


class QFormerResidualOutput(nn.Module):
    """LayerNorm(dense(x) + residual) (`BertSelfOutput` / `BertOutput`)."""

    def __init__(self, in_width: int, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerIntermediate(nn.Module):
    """GELU(dense(x)) (`BertIntermediate`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerAttention(nn.Module):
    """Multi-head attention, then LayerNorm(dense(out) + hidden) (`BertAttention`)."""

    def __init__(self, config: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.self = QFormerProjections(config.hidden_size, kv_width)
        self.output = QFormerResidualOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [R, Sq, H] attends to context [R, Sk, kv_width]; key_mask [R, 1, 1, Sk] bool, True = attend."""
        q = self._heads(self.self.query(hidden))
        k = self._heads(self.self.key(context))
        v = self._heads(self.self.value(context))
        out = dense_attention(q, k, v, attn_mask=key_mask).transpose(1, 2).flatten(2)
        return self.output(out, hidden)


class QFormerLayer(nn.Module):
    """One Q-Former layer (LAVIS `BertLayer` with query_length = num_queries)."""

    def __init__(self, config: QFormerConfig, layer_index: int):
        super().__init__()
        hidden, inner, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.attention = QFormerAttention(config, hidden)
        self.has_cross_attention = layer_index % config.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_width)
        self.intermediate = QFormerIntermediate(hidden, inner)
        self.output = QFormerResidualOutput(inner, hidden, eps)
        self.intermediate_query = QFormerIntermediate(hidden, inner)
        self.output_query = QFormerResidualOutput(inner, hidden, eps)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor, frames: torch.Tensor, num_queries: int, *,
                frame_rows: Optional[torch.Tensor] = None, text_out: bool = True) -> torch.Tensor:
        """hidden [R, Q + L, H]; frames [T, S, Cv]; frame_rows [T] picks the row of `hidden` each frame reads
        (None: R == T, one row per frame). Returns [T, Q + L, H], or [T, Q, H] when text_out is False."""
        rows = hidden if text_out else hidden[:, :num_queries]
        attended = self.attention(rows, hidden, key_mask)
        queries, text = attended[:, :num_queries], attended[:, num_queries:]
        if frame_rows is not None:
            queries = queries.index_select(0, frame_rows)
        if self.has_cross_attention:
            queries = self.crossattention(queries, frames)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if not text_out:
            return queries
        if text.shape[1] > 0:
            text = self.output(self.intermediate(text), text)
        if frame_rows is not None:
            text = text.index_select(0, frame_rows)
        return torch.cat((queries, text), dim=1)


class QFormerEmbeddings(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """LayerNorm(cat(queries, word + position embeddings)); the LayerNorm is per token, so the queries ([1, Q, H])
        are normed once and broadcast over the B questions."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        queries = self.LayerNorm(query_embeds).expand(input_ids.shape[0], -1, -1)
        return torch.cat((queries, text), dim=1)


class QFormerBert(nn.Module):
    """The BERT of the Q-Former (LAVIS `BertModel` without pooler, called with query_embeds)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                frames: torch.Tensor, frame_question: torch.Tensor) -> torch.Tensor:
        """query_embeds [1, Q, H]; input_ids / text_mask [B, L] (mask: 1 = token, 0 = padding);
        frames [T, S, Cv]; frame_question [T] in [0, B). Returns the last layer's query states [T, Q, H]."""
        num_queries = query_embeds.shape[1]
        hidden = self.embeddings(query_embeds, input_ids)
        query_mask = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=text_mask.device)
        key_mask = torch.cat((query_mask, text_mask.bool()), dim=1)[:, None, None, :]
        layers = self.encoder.layer
        for index, layer in enumerate(layers):
            first, last = index == 0, index == len(layers) - 1
            hidden = layer(hidden, key_mask, frames, num_queries,
                           frame_rows=frame_question if first else None, text_out=not last)
            if first:
                key_mask = key_mask.index_select(0, frame_question)
        return hidden[:, :num_queries]


class QFormerEncoder(nn.Module):
    """Frame tokens + question -> q_emb [T, num_query_tokens, output_width] (official `vlm_attention`)."""

    def __init__(self, config: Optional[QFormerConfig] = None):
        super().__init__()
        self.config = config = config or QFormerConfig()
        # torch.nn.LayerNorm default eps (1e-5), as LLaMA-VID builds it; HF's post_layernorm uses 1e-6.
        self.vlm_att_ln = nn.LayerNorm(config.encoder_width)
        self.vlm_att_query = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        self.bert = QFormerBert(config)
        self.vlm_att_projector = nn.Linear(config.hidden_size, config.output_width)
        self._init_random()

    @torch.no_grad()
    def _init_random(self) -> None:
        # BERT initialisation (std 0.02), used only where no checkpoint provides the weights.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.vlm_att_query, std=0.02)

    def forward(self, frame_tokens: torch.Tensor, question_ids: Optional[torch.Tensor] = None,
                question_mask: Optional[torch.Tensor] = None,
                frame_question: Optional[torch.Tensor] = None) -> torch.Tensor:
        """frame_tokens [T, S, Cv] (ViT output, CLS included); question_ids / question_mask [B, L] right-padded
        (mask 1 = token; None = all tokens; no question at all = queries only, as BLIP-2);
        frame_question [T] long: the question row of each frame, e.g. its video index. When None, B must be 1
        (the question is shared by every frame) or T. Returns [T, num_query_tokens, output_width]."""
        num_frames = frame_tokens.shape[0]
        if frame_tokens.dim() != 3 or frame_tokens.shape[2] != self.config.encoder_width:
            raise ValueError(f"frame_tokens must be [T, S, {self.config.encoder_width}], "
                             f"got {list(frame_tokens.shape)}")
        device = frame_tokens.device
        if question_ids is None:
            question_ids = torch.zeros(1, 0, dtype=torch.long, device=device)
        if question_ids.dim() != 2:
            raise ValueError(f"question_ids must be [B, L] token ids, got shape {list(question_ids.shape)}")
        num_questions, length = question_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"questions of {length} tokens exceed max_position_embeddings = "
                             f"{self.config.max_position_embeddings}: truncate them (the tokenizer's max_length)")
        if question_mask is None:
            question_mask = torch.ones_like(question_ids)
        elif question_mask.shape != question_ids.shape:
            raise ValueError(f"question_mask {list(question_mask.shape)} must match question_ids "
                             f"{list(question_ids.shape)}")
        if frame_question is None:
            if num_questions not in (1, num_frames):
                raise ValueError(f"{num_questions} questions for {num_frames} frames: pass frame_question [T] "
                                 f"to say which question each frame reads")
            frame_question = (torch.zeros(num_frames, dtype=torch.long, device=device) if num_questions == 1
                              else torch.arange(num_frames, device=device))
        elif frame_question.shape != (num_frames,):
            raise ValueError(f"frame_question must be [T] = [{num_frames}], got {list(frame_question.shape)}")
        frames = self.vlm_att_ln(frame_tokens.to(self.vlm_att_ln.weight.dtype))
        query_states = self.bert(self.vlm_att_query, question_ids, question_mask, frames, frame_question)
        return self.vlm_att_projector(query_states)

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], *, layout: str = "official",
                        source: str = "Q-Former checkpoint") -> "QFormerEncoder":
        """Loads an official DynFocus / LLaMA-VID state dict (`layout="official"`, every weight required) or a
        transformers InstructBLIP one (`"hf"`: the BERT is required; vlm_att_query / vlm_att_ln come from a whole
        InstructBLIP state dict when present, vlm_att_projector never does and keeps its initialisation, so build
        the module on a real device for this layout)."""
        if layout == "official":
            return load_into(self, convert_official_qformer(state_dict, self.config), strict=True, source=source)
        if layout == "hf":
            return load_into(self, convert_hf_qformer(state_dict, self.config), strict=False, source=source)
        raise ValueError(f"layout = {layout!r} is invalid: expected 'official' or 'hf'")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts -> QFormerEncoder names

_OFFICIAL_PARTS = ("vlm_att_encoder.", "vlm_att_query", "vlm_att_ln.", "vlm_att_projector.")


def _meta_qformer(config: QFormerConfig) -> QFormerEncoder:
    with torch.device("meta"):
        return QFormerEncoder(config)


def convert_official_qformer(state_dict: Mapping[str, torch.Tensor],
                             config: Optional[QFormerConfig] = None) -> dict[str, torch.Tensor]:
    """Official DynFocus / LLaMA-VID checkpoint (`model.vlm_att_encoder.bert.*`, `model.vlm_att_query`,
    `model.vlm_att_ln.*`, `model.vlm_att_projector.*`; the leading `model.` is optional) -> QFormerEncoder names.

    Reads only those parts of a whole-model state dict: `vlm_att_key_projector`, `vlm_att_val_projector` and
    the rest belong to the connector and the LLM. The `position_ids` buffer is dropped; all else must match.
    """
    converted = {}
    for name, tensor in state_dict.items():
        short = name[len("model."):] if name.startswith("model.") else name
        if not short.startswith(_OFFICIAL_PARTS) or short.endswith("embeddings.position_ids"):
            continue
        converted[short[len("vlm_att_encoder."):] if short.startswith("vlm_att_encoder.") else short] = tensor
    check_converted(converted, _meta_qformer(config or QFormerConfig()), source="official Q-Former state dict")
    return converted


def export_official_qformer(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """QFormerEncoder state dict -> official names (the inverse of convert_official_qformer)."""
    return {(f"model.vlm_att_encoder.{name}" if name.startswith("bert.") else f"model.{name}"): tensor
            for name, tensor in state_dict.items()}


_HF_QFORMER_RENAMES = (
    (re.compile(r"^embeddings\.layernorm\."), "embeddings.LayerNorm."),
    (re.compile(r"\.(attention|crossattention)\.attention\."), r".\1.self."),
)


def convert_hf_qformer(state_dict: Mapping[str, torch.Tensor],
                       config: Optional[QFormerConfig] = None) -> dict[str, torch.Tensor]:
    """transformers `InstructBlipQFormerModel` names (`embeddings.layernorm`, `encoder.layer.N.attention.attention.
    query`, `crossattention`, `intermediate_query`, ...) -> QFormerEncoder names.

    Given a whole InstructBLIP state dict (keys `qformer.*`), also takes `query_tokens` as vlm_att_query and
    `vision_model.post_layernorm.*` as vlm_att_ln (its eps differs: 1e-6 there, 1e-5 in LLaMA-VID; the
    weights are the same kind). InstructBLIP has no vlm_att_projector (its 768 -> 4096 language_projection is
    another layer), so the result may lack vlm_att_query / vlm_att_ln / vlm_att_projector: load it with
    strict=False and initialise those. The BERT itself must match exactly.
    """
    if any(name.startswith("qformer.") for name in state_dict):
        qformer = {name[len("qformer."):]: t for name, t in state_dict.items() if name.startswith("qformer.")}
        extras = {name: t for name, t in state_dict.items()
                  if name == "query_tokens" or name.startswith("vision_model.post_layernorm.")}
        state_dict = {**qformer, **extras}
    converted = {}
    for name, tensor in state_dict.items():
        if name == "embeddings.position_ids":
            continue
        if name == "query_tokens":
            converted["vlm_att_query"] = tensor
        elif name.startswith("vision_model.post_layernorm."):
            converted["vlm_att_ln." + name.rsplit(".", 1)[1]] = tensor
        else:
            for pattern, target in _HF_QFORMER_RENAMES:
                name = pattern.sub(target, name)
            converted["bert." + name] = tensor
    check_converted(converted, _meta_qformer(config or QFormerConfig()), source="HF Q-Former state dict",
                    may_omit=("vlm_att_query", "vlm_att_ln.", "vlm_att_projector."))
    return converted

"""LLaMA-family decoder (Vicuna-7B v1.5 for DynFocus, SmolLM2 for real-weight tests), DESIGN.md section 6.

RMSNorm, rotary position embedding (RoPE, Su et al. 2021; HF-style "linear", "dynamic" and "llama3" scaling),
SwiGLU MLP, grouped-query attention, tied or untied embeddings. Parameter names follow transformers'
`LlamaForCausalLM` (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`),
so HF checkpoints load with `weights.load_into` and no renaming.

Two entry points, both writing into a preallocated `KVCache` (one row per sequence slot):
`prefill` over packed variable-length sequences (rows of all sequences concatenated + cu_seqlens) and `decode`,
one token per active sequence with per-sequence positions read on the device (no host sync).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import decode_with_cache, packed_positions, paged_attention, prefill_varlen
from ..config import LlamaConfig
from ..errors import ConfigError, RequestError
from .paged_cache import PagedKVCache, StepMetadata

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_type_of(config: LlamaConfig) -> str:
    """The HF rope type named by config.rope_scaling ("type" or "rope_type" key); "default" without scaling."""
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"LlamaConfig.rope_scaling type {rope_type!r} is not supported: expected one of "
                          f"{ROPE_TYPES}; convert the checkpoint's rope settings or drop rope_scaling")
    return rope_type


def rope_inv_freq(config: LlamaConfig, device: torch.device) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) [head_dim / 2] (fp32) after linear / llama3 scaling.

    linear: positions divided by `factor` (Chen et al. 2023), i.e. inv_freq / factor. llama3: long wavelengths
    (> original_max / low_freq_factor) divided by factor, short ones kept, a smooth blend in between (Llama 3.1).
    dynamic: scaled per sequence in `rope_cos_sin`, so the base table is returned here.
    """
    rope_type, scaling, dim = rope_type_of(config), config.rope_scaling or {}, config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen > original_len / low, inv_freq / factor,
                           torch.where(wavelen < original_len / high, inv_freq, blended))
    return inv_freq


def rope_cos_sin(config: LlamaConfig, positions: torch.Tensor, seq_lens: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for integer positions [N]; seq_lens [N] is each row's sequence length, used only by
    "dynamic" NTK scaling: base * ((factor * len / max_pos) - (factor - 1))^(d / (d - 2)) once len > max_pos."""
    inv_freq = rope_inv_freq(config, positions.device)
    if rope_type_of(config) == "dynamic":
        dim, factor, max_pos = config.head_dim, config.rope_scaling["factor"], config.max_position_embeddings
        seq_len = seq_lens.to(torch.float32).clamp(min=max_pos)[:, None]
        base = config.rope_theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] rotated by its row's angles (the rotate-half pairing of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Preallocated K/V of every layer: k, v [num_layers, max_batch, max_seq, num_kv_heads, head_dim] (each layer's
    slice is the flash_attn kv-cache layout), and lengths [max_batch] int32 on the device: valid positions per slot.

    Zero-filled, not empty: masked positions still enter the softmax-weighted sum with weight 0, and 0 * NaN from
    uninitialised memory would poison the output.
    """

    def __init__(self, num_layers: int, max_batch: int, max_seq: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, max_batch, max_seq, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.max_batch, self.max_seq = max_batch, max_seq

    @classmethod
    def for_model(cls, config: LlamaConfig, max_batch: int, max_seq: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "KVCache":
        return cls(config.num_layers, max_batch, max_seq, config.num_kv_heads, config.head_dim, dtype, device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_index], self.v[layer_index]

    def write(self, layer_index: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Scatter rows k/v [N, Hkv, D] to (slots[i], positions[i]) of one layer (positions must be < max_seq)."""
        self.k[layer_index, slots, positions] = k.to(self.k.dtype)
        self.v[layer_index, slots, positions] = v.to(self.v.dtype)

    def reset(self, slots: Optional[torch.Tensor] = None) -> None:
        """Forget the sequences in `slots` (all when None); their rows are overwritten by the next prefill."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One ATen op for the normalisation (was 6), the same fp32 math; the cast and the weight follow HF.
        normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: Optional[torch.Tensor] = None   # set by LlamaForCausalLM.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """Grouped-query self-attention over packed rows; K/V of every row go to the cache (when one is given)."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_weight: Optional[torch.Tensor] = None       # set by LlamaForCausalLM.fuse_projections

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        rows = x.shape[0]
        if self.qkv_weight is not None:  # one GEMM for q, k and v
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv_weight).split([q_size, kv_size, kv_size], dim=-1)
            q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        else:
            q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(self, x, cos, sin, cu_seqlens, max_seqlen, cache: Optional[KVCache], row_slots, row_index):
        """row_index: (sequence index, position in sequence) of every packed row."""
        q, k, v = self._project(x, cos, sin)
        if cache is not None:
            cache.write(self.layer_index, row_slots, row_index[1], k, v)
        out = prefill_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, row_positions=row_index)
        return self.o_proj(out.reshape(x.shape[0], -1))

    def decode(self, x, cos, sin, cache: KVCache, slots, row_slots, positions, max_cache_len):
        q, k, v = self._project(x, cos, sin)
        cache.write(self.layer_index, row_slots, positions, k, v)
        k_cache, v_cache = cache.layer(self.layer_index)
        out = decode_with_cache(q, k_cache, v_cache, positions + 1, cache_slots=slots, max_cache_len=max_cache_len)
        return self.o_proj(out.reshape(x.shape[0], -1))


    def step(self, x, cos, sin, cache: PagedKVCache, meta: StepMetadata):
        """Packed rows of any mix of prefill chunks and decodes against the paged cache (the engine's step)."""
        q, k, v = self._project(x, cos, sin)
        cache.write(self.layer_index, meta.slot_mapping, k, v)
        k_pool, v_pool = cache.layer(self.layer_index)
        out = paged_attention(q, k_pool, v_pool, meta)
        return self.o_proj(out.reshape(x.shape[0], -1))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm (the `model.` prefix of HF checkpoints)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. With tie_word_embeddings the head reuses model.embed_tokens.weight, and a checkpoint's
    `lm_head.weight` (HF writes it for tied models too) is ignored by `weights.load_into`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        rope_type_of(config)  # fail at build time, not at the first forward
        self.config = config
        self.model = LlamaModel(config)
        if config.tie_word_embeddings:
            self.ignored_checkpoint_keys = ("lm_head.weight",)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights into one matrix each (one GEMM instead of three / two). The
        separate weights become views into the fused ones, so the state dict (names, values, memory) is unchanged;
        call it after loading a checkpoint (loading again afterwards would leave the fused copies stale)."""
        for layer in self.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if attention.q_proj.weight.is_meta or attention.qkv_weight is not None:
                continue
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            attention.qkv_weight = self._fuse(projections)
            mlp.gate_up_weight = self._fuse((mlp.gate_proj, mlp.up_proj))

    @staticmethod
    def _fuse(linears) -> torch.Tensor:
        fused = torch.cat([linear.weight.detach() for linear in linears])
        offset = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight = nn.Parameter(fused[offset:offset + rows], requires_grad=False)
            offset += rows
        return fused

    def rope_table(self, device: torch.device, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [max_position_embeddings, head_dim] computed once per device and dtype (None for "dynamic"
        scaling, whose frequencies depend on the sequence length)."""
        if rope_type_of(self.config) == "dynamic":
            return None
        key = (device, dtype)
        tables = self.__dict__.setdefault("_rope_tables", {})
        if key not in tables:
            positions = torch.arange(self.config.max_position_embeddings, device=device)
            tables[key] = rope_cos_sin(self.config, positions, positions + 1, dtype)
        return tables[key]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, for callers that splice visual tokens into the sequence before `prefill`."""
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(self.model.norm(hidden), weight)

    def _inputs(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise RequestError("pass exactly one of input_ids and inputs_embeds")
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds

    @torch.inference_mode()
    def prefill(self, cu_seqlens: torch.Tensor, max_seqlen: int, *, input_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                slots: Optional[torch.Tensor] = None, all_logits: bool = False) -> torch.Tensor:
        """Run packed sequences from position 0: input_ids [total] or inputs_embeds [total, hidden].

        cu_seqlens [B + 1] (device, int32) delimits the sequences; max_seqlen (host int) bounds their lengths.
        Sequence b's K/V land in cache slot slots[b] (default b) and its cache length becomes its own length.
        Returns logits [B, vocab] at each sequence's last row, or [total, vocab] with all_logits=True.
        """
        hidden = self._inputs(input_ids, inputs_embeds)
        total = hidden.shape[0]
        if cache is not None and max_seqlen > cache.max_seq:
            raise RequestError(f"a prompt of up to {max_seqlen} tokens does not fit the KV cache of {cache.max_seq} "
                               f"positions; shorten the prompt or allocate a longer cache")
        seq_index, positions = packed_positions(cu_seqlens, total)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        cos, sin = rope_cos_sin(self.config, positions, lengths[seq_index], hidden.dtype)
        row_slots = seq_index if slots is None else slots.to(torch.int64)[seq_index]
        for layer in self.model.layers:
            hidden = hidden + layer.self_attn.prefill(layer.input_layernorm(hidden), cos, sin, cu_seqlens,
                                                      max_seqlen, cache, row_slots, (seq_index, positions))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if cache is not None:
            sequence_slots = torch.arange(len(lengths), device=hidden.device) if slots is None else slots
            cache.lengths[sequence_slots] = lengths.to(cache.lengths.dtype)
        if not all_logits:
            hidden = hidden[cu_seqlens[1:].to(torch.int64) - 1]
        return self.logits(hidden)

    def forward_packed(self, inputs_embeds: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Final hidden states [total, hidden] of packed sequences from position 0, with autograd and no cache: the
        training path (gradients reach inputs_embeds, e.g. spliced visual tokens, through a frozen LLM). Same layers
        and attention as `prefill`; pass rows to `logits`."""
        hidden = inputs_embeds
        seq_index, positions = packed_positions(cu_seqlens, hidden.shape[0])
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        cos, sin = rope_cos_sin(self.config, positions, lengths[seq_index], hidden.dtype)
        for layer in self.model.layers:
            hidden = hidden + layer.self_attn.prefill(layer.input_layernorm(hidden), cos, sin, cu_seqlens,
                                                      max_seqlen, None, seq_index, (seq_index, positions))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    @torch.inference_mode()
    def decode(self, cache: KVCache, *, input_ids: Optional[torch.Tensor] = None,
               inputs_embeds: Optional[torch.Tensor] = None, slots: Optional[torch.Tensor] = None,
               max_cache_len: Optional[int] = None) -> torch.Tensor:
        """One token per active sequence: input_ids [B] or inputs_embeds [B, hidden] -> logits [B, vocab].

        Sequence b sits in cache slot slots[b] (default b); its position is that slot's cache length, read on
        the device, and the length grows by one. max_cache_len: optional host bound on the lengths after this
        step (see attention.decode_with_cache).
        """
        hidden = self._inputs(input_ids, inputs_embeds)
        row_slots = torch.arange(hidden.shape[0], device=hidden.device) if slots is None else slots.to(torch.int64)
        positions = cache.lengths[row_slots].to(torch.int64)
        cos, sin = rope_cos_sin(self.config, positions, positions + 1, hidden.dtype)
        for layer in self.model.layers:
            hidden = hidden + layer.self_attn.decode(layer.input_layernorm(hidden), cos, sin, cache, slots,
                                                     row_slots, positions, max_cache_len)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        cache.lengths[row_slots] = (positions + 1).to(cache.lengths.dtype)
        return self.logits(hidden)

    @torch.inference_mode()
    def step(self, inputs_embeds: torch.Tensor, cache: PagedKVCache, meta: StepMetadata) -> torch.Tensor:
        """One engine step over packed rows [T, hidden] (prefill chunks, recomputation and decodes mixed): writes
        every row's K/V to its slot and returns the final hidden states [T, hidden] (pass rows to `logits`)."""
        hidden = inputs_embeds
        table = self.rope_table(hidden.device, hidden.dtype)
        if table is not None:
            cos, sin = table[0][meta.positions], table[1][meta.positions]
        else:
            seq_lens = meta.context_lens.to(torch.int64)[meta.seq_index]
            cos, sin = rope_cos_sin(self.config, meta.positions, seq_lens, hidden.dtype)
        for layer in self.model.layers:
            hidden = hidden + layer.self_attn.step(layer.input_layernorm(hidden), cos, sin, cache, meta)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden


def greedy_generate(model: LlamaForCausalLM, cache: KVCache, prompts_token_ids: list[list[int]],
                    max_new_tokens: int, eos_token_id: Optional[int] = None) -> list[list[int]]:
    """Greedy decoding of a batch: one packed prefill, then decode steps with no host sync until the end.

    Each sequence is cut after its first eos_token_id (kept), as transformers' `generate` returns it.
    """
    lengths = [len(ids) for ids in prompts_token_ids]
    if not lengths or min(lengths) == 0 or max_new_tokens < 1:
        raise RequestError("greedy_generate needs at least one non-empty prompt and max_new_tokens >= 1")
    if len(lengths) > cache.max_batch or max(lengths) + max_new_tokens > cache.max_seq:
        raise RequestError(f"{len(lengths)} prompts of up to {max(lengths)} tokens + {max_new_tokens} new tokens do "
                           f"not fit a KV cache of {cache.max_batch} x {cache.max_seq}; allocate a larger cache")
    device = cache.device
    input_ids = torch.tensor([t for ids in prompts_token_ids for t in ids], dtype=torch.int64, device=device)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    next_tokens = model.prefill(cu_seqlens, max(lengths), input_ids=input_ids, cache=cache).argmax(-1)
    generated = [next_tokens]
    for step in range(1, max_new_tokens):
        logits = model.decode(cache, input_ids=next_tokens, max_cache_len=max(lengths) + step)
        next_tokens = logits.argmax(-1)
        generated.append(next_tokens)
    outputs = torch.stack(generated, dim=1).tolist()
    if eos_token_id is not None:
        outputs = [ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids for ids in outputs]
    return outputs

"""Attention backends: flash_attn when importable, torch SDPA otherwise.

Two LLM entry points share one contract whatever the backend:

- `prefill_varlen`: causal attention over PACKED variable-length sequences, q [total, H, D], k/v [total, Hkv, D],
  sequence b owning rows cu_seqlens[b]:cu_seqlens[b + 1] (the flash_attn varlen layout).
- `decode_with_cache`: one query token per sequence against a preallocated KV cache [slots, S_max, Hkv, D]
  (the flash_attn kv-cache layout), cache_lens[b] valid positions, the new token's K/V already written.

Grouped-query attention: query head h reads KV head h // (H / Hkv), as transformers' `repeat_kv` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:  # flash_attn is optional: a CUDA-only wheel that is often absent.
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    _HAS_FLASH_ATTN = True
except ImportError:
    _HAS_FLASH_ATTN = False

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [B, H, Sq, D], k/v: [B, H, Sk, D] -> [B, H, Sq, D]. Bidirectional by default (ViT, Q-Former)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)


def attention_backend(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> str:
    """Name of the backend used for tensors on `device` in `dtype`: "flash_attn" or "sdpa".

    Without arguments: the backend a CUDA fp16/bf16 model would get on this machine.
    """
    if not _HAS_FLASH_ATTN:
        return "sdpa"
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    dtype_ok = dtype is None or dtype in _FLASH_DTYPES
    return "flash_attn" if on_cuda and dtype_ok else "sdpa"


def _use_flash(*tensors: torch.Tensor) -> bool:
    return _HAS_FLASH_ATTN and all(t.is_cuda and t.dtype in _FLASH_DTYPES for t in tensors)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_heads % num_kv_heads != 0 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{where}: q heads/dim {tuple(q.shape[-2:])} do not fit k heads/dim {tuple(k.shape[-2:])}; "
                         f"query heads must be a multiple of KV heads and head dims must match")


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `total` packed rows: (sequence index, position inside its sequence), both int64 [total].

    Computed on the device of cu_seqlens with no host sync (searchsorted instead of repeat_interleave).
    """
    rows = torch.arange(total, device=cu_seqlens.device)
    seq_index = torch.searchsorted(cu_seqlens.to(torch.int64), rows, right=True) - 1
    return seq_index, rows - cu_seqlens.to(torch.int64)[seq_index]


def prefill_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   causal: bool = True, scale: Optional[float] = None, *,
                   row_positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Attention within each packed sequence: q [total, H, D], k/v [total, Hkv, D] -> [total, H, D].

    cu_seqlens: [B + 1] int32 cumulative lengths starting at 0 (on q's device); max_seqlen: host int >= every length.
    The SDPA path scatters the rows into a padded batch [B, H, max_seqlen, D] (memory B * max_seqlen^2 for the
    mask, not total^2 as a block-diagonal mask would need), masks padded keys, and gathers the rows back.
    row_positions: `packed_positions(cu_seqlens, total)` when the caller already has it (one per model, not per layer).
    """
    _check_heads(q, k, v, "prefill_varlen")
    if _use_flash(q, k, v):
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)

    total, num_heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    seq_index, position = row_positions if row_positions is not None else packed_positions(cu_seqlens, total)

    def to_padded(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(batch, max_seqlen, x.shape[1], head_dim)
        padded[seq_index, position] = x
        return padded.transpose(1, 2)

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device)
    key_index = torch.arange(max_seqlen, device=q.device)
    mask = (key_index[None, :] < lengths[:, None])[:, None, None, :]            # [B, 1, 1, S] valid keys
    if causal:
        mask = mask & (key_index[None, :] <= key_index[:, None])[None, None]    # [B, 1, S, S]
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v), attn_mask=mask, scale=scale,
                                         enable_gqa=num_heads != k.shape[1])
    return out.transpose(1, 2)[seq_index, position]


def decode_with_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, *,
                      cache_slots: Optional[torch.Tensor] = None, max_cache_len: Optional[int] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    """One decode step: q [B, H, D] against k_cache/v_cache [num_slots, S_max, Hkv, D] -> [B, H, D].

    cache_lens [B] (device, int): valid cache positions of each sequence, INCLUDING the token being decoded,
    whose K/V the caller has already written. cache_slots [B] (device, int): the cache row of each sequence
    (default: row b for sequence b). max_cache_len: optional host-side bound on max(cache_lens) that lets the
    SDPA path read only that prefix of the cache; the engine knows it without a device sync.
    """
    _check_heads(q, k_cache, v_cache, "decode_with_cache")
    if _use_flash(q, k_cache, v_cache):
        slots = None if cache_slots is None else cache_slots.to(torch.int32)
        out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=cache_lens.to(torch.int32),
                                      cache_batch_idx=slots, softmax_scale=scale, causal=True)
        return out.squeeze(1)

    batch = q.shape[0]
    span = k_cache.shape[1] if max_cache_len is None else min(max_cache_len, k_cache.shape[1])
    if cache_slots is None:
        keys, values = k_cache[:batch, :span], v_cache[:batch, :span]
    else:
        keys, values = k_cache[cache_slots, :span], v_cache[cache_slots, :span]
    mask = (torch.arange(span, device=q.device)[None, :] < cache_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[2])
    return out.squeeze(2)


_warned_sdpa_on_cuda = False


def _warn_sdpa_on_cuda_once() -> None:
    """flash_attn is an optional extra; without it CUDA prefill chunks run through SDPA, which gathers each sequence's
    blocks (decodes read the cache in place through paged_decode)."""
    global _warned_sdpa_on_cuda
    if not _warned_sdpa_on_cuda:
        _warned_sdpa_on_cuda = True
        import warnings
        warnings.warn("flash_attn is not installed (or the dtype is fp32): CUDA prefill attention runs the SDPA "
                      "fallback, which copies each sequence's KV blocks (decodes read the paged cache in place "
                      "through a Triton kernel); `pip install dynfocus-infer[flash]` reads it in place for both",
                      RuntimeWarning, stacklevel=3)


IN_PLACE_DECODE_OFF_CUDA = False   # tests set it to run paged_decode's kernel under the Triton interpreter


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of packed query rows q [T, H, D] against a paged KV cache k_pool/v_pool
    [num_blocks, block_size, Hkv, D] that already holds every row's own K/V. `meta` is a StepMetadata: sequence b's
    rows cu_seqlens_q[b]:cu_seqlens_q[b+1] sit at positions[...] and see its cache positions 0..position.

    One call serves decode rows (one query each), prefill chunks and recomputation alike. flash_attn reads the block
    table in place; without it, CUDA decode steps read it in place through paged_decode (Triton), and the SDPA
    fallback (prefill chunks, and every step on a CPU) gathers each sequence's blocks into a padded batch.
    """
    _check_heads(q, k_pool, v_pool, "paged_attention")
    if _use_flash(q, k_pool, v_pool):
        if meta.max_query_len == 1:
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_pool, v_pool, cache_seqlens=meta.context_lens,
                                          block_table=meta.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        return flash_attn_varlen_func(q, k_pool, v_pool, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_query_len,
                                      meta.max_context_len, softmax_scale=scale, causal=True,
                                      block_table=meta.block_tables)
    if meta.max_query_len == 1 and (q.is_cuda or IN_PLACE_DECODE_OFF_CUDA):
        from .paged_decode import paged_decode, supports
        if supports(q, k_pool):
            return paged_decode(q, k_pool, v_pool, meta.block_tables, meta.context_lens, meta.max_context_len, scale)
    if q.is_cuda:
        _warn_sdpa_on_cuda_once()
    return sdpa_paged_attention(q, k_pool, v_pool, meta, scale)


def sdpa_paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta,
                         scale: Optional[float] = None) -> torch.Tensor:
    """paged_attention's SDPA fallback: each sequence's blocks gathered into a padded batch, then one SDPA. A step
    that mixes decode rows with prefill chunks (and knows its host lengths) runs the two as separate batches
    (StepMetadata.sdpa_groups), so decode rows are not padded to the longest chunk."""
    groups = meta.sdpa_groups()
    if groups is None:
        return _padded_sdpa(q, k_pool, v_pool, meta, scale)
    out = q.new_empty(q.shape)
    for rows, group in groups:
        out[rows] = _padded_sdpa(q[rows], k_pool, v_pool, group, scale)
    return out


def _padded_sdpa(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta,
                 scale: Optional[float]) -> torch.Tensor:
    """Every sequence of `meta` padded to its longest query and context, one SDPA."""
    batch, block_size = meta.block_tables.shape[0], k_pool.shape[1]
    num_blocks = -(-meta.max_context_len // block_size)
    blocks = meta.block_tables[:, :num_blocks].to(torch.int64)
    keys = k_pool[blocks].flatten(1, 2)              # [B, num_blocks * block_size, Hkv, D]
    values = v_pool[blocks].flatten(1, 2)
    local = torch.arange(q.shape[0], device=q.device) - meta.cu_seqlens_q.to(torch.int64)[meta.seq_index]
    padded_q = q.new_zeros(batch, meta.max_query_len, *q.shape[1:])
    padded_q[meta.seq_index, local] = q
    # Padding query rows see key 0 only (never an all-masked row, whose softmax would be NaN); they are dropped.
    query_pos = torch.zeros(batch, meta.max_query_len, dtype=torch.int64, device=q.device)
    query_pos[meta.seq_index, local] = meta.positions
    key_pos = torch.arange(keys.shape[1], device=q.device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]   # [B, 1, Q, S]
    out = F.scaled_dot_product_attention(padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_pool.shape[2])
    return out.transpose(1, 2)[meta.seq_index, local]

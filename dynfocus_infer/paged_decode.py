"""Decode attention over the paged KV cache, read in place (Triton): what CUDA runs when flash_attn is absent.

One query row per sequence, q [B, H, D], against k_pool / v_pool [num_blocks, block_size, Hkv, D] through the block
table, as flash-decoding does: program (b, kv head, split) walks its share of sequence b's blocks with an online
softmax for the H / Hkv query heads that read that KV head (GQA: each K/V tile is loaded once for the whole group),
and writes an unnormalised partial (acc, max, sum); the splits are merged by a few tensor ops. Bytes: each live K/V
row once, q and the partials (B * H * splits * (D + 2) fp32); no gather of the cache into a padded copy, which the
SDPA fallback makes every layer and step (three times the KV traffic).

Positions past a sequence's length are masked at load (their rows may hold stale or non-finite values of a freed
sequence). fp32 tiles are multiplied in IEEE fp32 (no TF32), bf16/fp16 tiles on tensor cores with fp32 accumulation
(under the Triton interpreter, which multiplies 16-bit floats as raw bits, 16-bit tiles are widened to fp32 first).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MIN_TILE = 16        # tl.dot's smallest tile side on the GPU


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, stats_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_tb,
                         scale, blocks_per_split,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(length, BLOCK_N))

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block in range(first, last):
        physical = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + block).to(tl.int64)
        live = (block * BLOCK_N + n) < length
        offsets = physical * stride_kb + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :]
        k = tl.load(k_ptr + offsets, mask=live[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale          # [BLOCK_G, BLOCK_N] fp32
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))         # finite: every walked block holds a live row
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offsets, mask=live[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split     # [BLOCK_G]
    tl.store(acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(stats_ptr + row * 2, m, mask=g_ok)
    tl.store(stats_ptr + row * 2 + 1, s_sum, mask=g_ok)


def supports(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Shapes the kernel takes: a power-of-two block size >= 16, head dim <= 256, contiguous head dims."""
    block_size, head_dim = k_pool.shape[1], k_pool.shape[3]
    return (block_size >= MIN_TILE and block_size & (block_size - 1) == 0 and head_dim <= 256
            and q.stride(-1) == 1 and k_pool.stride(-1) == 1 and q.dtype == k_pool.dtype)


def default_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Enough splits of the block walk for about two programs per SM (1 off CUDA), never more than the blocks."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_blocks, -(-2 * sms // max(1, batch * kv_heads))))


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, max_context_len: int, scale: Optional[float] = None,
                 num_splits: Optional[int] = None) -> torch.Tensor:
    """q [B, H, D], k_pool / v_pool [num_blocks, block_size, Hkv, D], block_tables [B, W] int32, context_lens [B]
    (>= 1, each sequence's positions including the new token's, whose K/V are written). max_context_len: a host
    bound on context_lens (no device sync). Returns [B, H, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_blocks_pool, block_size, kv_heads, _ = k_pool.shape
    if not supports(q, k_pool) or k_pool.shape != v_pool.shape or num_heads % kv_heads:
        raise ValueError(f"paged_decode: unsupported shapes q {tuple(q.shape)} k_pool {tuple(k_pool.shape)} "
                         f"v_pool {tuple(v_pool.shape)} ({q.dtype}, {k_pool.dtype})")
    group = num_heads // kv_heads
    max_blocks = max(1, -(-max_context_len // block_size))
    splits = num_splits or default_splits(batch, kv_heads, max_blocks, q.device)
    splits = max(1, min(splits, max_blocks))
    per_split = -(-max_blocks // splits)
    block_d = max(MIN_TILE, triton.next_power_of_2(head_dim))
    acc = torch.empty(batch, num_heads, splits, block_d, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    interpreted = q.device.type != "cuda"          # the interpreter multiplies 16-bit floats as raw bits
    precision = "ieee" if q.dtype == torch.float32 else "tf32"   # "tf32" is ignored for 16-bit inputs
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_pool, v_pool, block_tables, context_lens, acc, stats,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        scale if scale is not None else head_dim ** -0.5, per_split,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(MIN_TILE, triton.next_power_of_2(group)), BLOCK_N=block_size,
        BLOCK_D=block_d, NUM_SPLITS=splits, PRECISION=precision, UPCAST=q.dtype != torch.float32 and interpreted,
        num_warps=4)
    if splits == 1:
        out = acc[:, :, 0] / stats[:, :, 0, 1:]
    else:
        peak = stats[..., 0].amax(-1, keepdim=True)
        weight = torch.exp(stats[..., 0] - peak)                    # an empty split: exp(-inf) = 0
        out = (acc * weight[..., None]).sum(2) / (stats[..., 1] * weight).sum(-1, keepdim=True)
    return out[..., :head_dim].to(q.dtype)

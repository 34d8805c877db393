"""The SDPA fallback of paged attention (the CPU path, and CUDA prefill chunks without flash_attn): a step that mixes
decode rows with prefill chunks runs them as two batches (StepMetadata.sdpa_groups); every row equals plain causal
attention over its own sequence's cache, with and without the split."""
import math

import pytest
import torch

from dynfocus_infer.attention import sdpa_paged_attention
from dynfocus_infer.models.paged_cache import StepMetadata


def mixed_step(query_lens, context_lens, heads, kv_heads, head_dim, block_size, seed, host=True):
    """Random q and a scrambled paged cache for sequences computing their last query_lens[b] positions of
    context_lens[b]; the cache's unused slots hold large values (a gather that read them unmasked would spoil the rows;
    not NaN, which the SDPA path's masked weighted sum cannot ignore: the engine's cache is zero-filled once)."""
    generator = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(widths) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, taken = [], 0
    for width in widths:
        tables.append(order[taken:taken + width])
        taken += width
    k_pool = torch.full((num_blocks, block_size, kv_heads, head_dim), 1e4)
    v_pool = torch.full_like(k_pool, -1e4)
    for table, n in zip(tables, context_lens):
        slots = torch.tensor(table)[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        k_pool.view(-1, kv_heads, head_dim)[slots] = torch.randn(n, kv_heads, head_dim, generator=generator)
        v_pool.view(-1, kv_heads, head_dim)[slots] = torch.randn(n, kv_heads, head_dim, generator=generator)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator)
    positions = torch.cat([torch.arange(c - n, c) for n, c in zip(query_lens, context_lens)])
    seq_index = torch.cat([torch.full((n,), b) for b, n in enumerate(query_lens)])
    block_tables = torch.zeros(len(tables), max(widths), dtype=torch.int32)
    for b, table in enumerate(tables):
        block_tables[b, :len(table)] = torch.tensor(table)
    cu_q = torch.tensor([0, *query_lens]).cumsum(0)
    meta = StepMetadata(positions, seq_index, positions, cu_q.to(torch.int32),
                        torch.tensor([0, *context_lens]).cumsum(0).to(torch.int32),
                        torch.tensor(context_lens, dtype=torch.int32), block_tables, cu_q[1:] - 1,
                        max(query_lens), max(context_lens),
                        tuple(query_lens) if host else None, tuple(context_lens) if host else None)
    return q, k_pool, v_pool, meta, tables


def reference(q, k_pool, v_pool, meta, tables, query_lens, context_lens):
    """Plain causal attention, one sequence and one head at a time, over the rows its block table names."""
    heads, kv_heads, head_dim = q.shape[1], k_pool.shape[2], q.shape[2]
    block_size = k_pool.shape[1]
    out, row = torch.empty_like(q), 0
    for table, n_q, n_ctx in zip(tables, query_lens, context_lens):
        slots = torch.tensor(table)[torch.arange(n_ctx) // block_size] * block_size + torch.arange(n_ctx) % block_size
        keys, values = k_pool.view(-1, kv_heads, head_dim)[slots], v_pool.view(-1, kv_heads, head_dim)[slots]
        for i in range(n_q):
            position = n_ctx - n_q + i
            for h in range(heads):
                kv = h // (heads // kv_heads)
                scores = keys[:position + 1, kv] @ q[row + i, h] / math.sqrt(head_dim)
                out[row + i, h] = torch.softmax(scores, 0) @ values[:position + 1, kv]
        row += n_q
    return out


@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 7, 1, 1, 13], [9, 7, 30, 1, 21]),     # decodes around two prefill chunks, one starting mid-sequence
    ([5, 1], [5, 40]),                          # a chunk first, a long decode after it
    ([1, 1, 1], [3, 17, 8]),                    # decodes only: one batch
    ([6, 11], [6, 19]),                         # chunks only: one batch
])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_mixed_steps_equal_attention_over_each_sequence(query_lens, context_lens, heads, kv_heads):
    q, k_pool, v_pool, meta, tables = mixed_step(query_lens, context_lens, heads, kv_heads, 8, 4, seed=len(query_lens))
    want = reference(q, k_pool, v_pool, meta, tables, query_lens, context_lens)
    split = sdpa_paged_attention(q, k_pool, v_pool, meta)
    mixed = any(n == 1 for n in query_lens) and any(n > 1 for n in query_lens)
    assert (meta.sdpa_groups() is not None) == mixed
    torch.testing.assert_close(split, want, atol=1e-5, rtol=1e-5)
    *_, plain_meta, _ = mixed_step(query_lens, context_lens, heads, kv_heads, 8, 4, seed=len(query_lens), host=False)
    assert plain_meta.sdpa_groups() is None
    torch.testing.assert_close(sdpa_paged_attention(q, k_pool, v_pool, plain_meta), want, atol=1e-5, rtol=1e-5)


def test_the_groups_partition_the_rows_and_gather_only_their_context():
    query_lens, context_lens = [1, 7, 1, 13, 1], [9, 7, 30, 21, 2]
    *_, meta, _ = mixed_step(query_lens, context_lens, 4, 2, 8, 4, seed=0)
    (decode_rows, decodes), (chunk_rows, chunks) = meta.sdpa_groups()
    assert decode_rows.tolist() == [0, 8, 22] and chunk_rows.tolist() == [*range(1, 8), *range(9, 22)]
    assert decodes.max_query_len == 1 and decodes.max_context_len == 30 and chunks.max_context_len == 21
    assert decodes.context_lens.tolist() == [9, 30, 2] and chunks.cu_seqlens_q.tolist() == [0, 7, 20]
    assert torch.equal(chunks.positions, meta.positions[chunk_rows])
    assert chunks.seq_index.tolist() == [0] * 7 + [1] * 13
    assert meta.sdpa_groups() is meta.sdpa_groups()     # built once per step, not per layer

"""The in-place paged decode kernel (dynfocus_infer/paged_decode.py) against plain attention over each sequence's
gathered cache: ragged lengths, shuffled block tables, GQA groups that do not fill a tile, odd head dims, several
splits (some empty), stale non-finite rows past every length, fp32 and bf16."""
import math

import pytest
import torch

from dynfocus_infer.paged_decode import paged_decode, supports


def reference(q, k_pool, v_pool, tables, lens, scale):
    """Each sequence alone: its blocks gathered in order, its live rows only, fp64."""
    block_size, groups = k_pool.shape[1], q.shape[1] // k_pool.shape[2]
    out = []
    for b, length in enumerate(lens.tolist()):
        blocks = tables[b, :math.ceil(length / block_size)].long()
        keys = k_pool[blocks].flatten(0, 1)[:length].double().repeat_interleave(groups, 1)    # [S, H, D]
        values = v_pool[blocks].flatten(0, 1)[:length].double().repeat_interleave(groups, 1)
        weights = torch.einsum("hd,shd->hs", q[b].double(), keys).mul(scale).softmax(-1)
        out.append(torch.einsum("hs,shd->hd", weights, values))
    return torch.stack(out)


def make_case(lens, heads, kv_heads, head_dim, block_size, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    widths = [math.ceil(n / block_size) for n in lens]
    pool_blocks = sum(widths) + 3
    k_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    v_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    order = torch.randperm(pool_blocks, generator=generator)
    tables = torch.zeros(len(lens), max(widths) + 2, dtype=torch.int32)
    used = 0
    for b, width in enumerate(widths):
        tables[b, :width] = order[used:used + width].to(torch.int32)
        tail = lens[b] % block_size
        if tail:      # rows past the length in the last block: stale, even non-finite, must not be read
            k_pool[tables[b, width - 1], tail:] = float("nan")
            v_pool[tables[b, width - 1], tail:] = float("inf")
        used += width
    for spare in order[used:]:
        k_pool[spare] = float("nan")
    q = torch.randn(len(lens), heads, head_dim, generator=generator).to(dtype)
    return q, k_pool, v_pool, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("lens,heads,kv_heads,head_dim,block_size,splits", [
    ([1, 17, 50, 128, 33], 4, 2, 32, 16, None),
    ([5, 64, 1], 15, 3, 80, 16, 3),          # GQA group of 5, head dim 80: tiles padded
    ([200, 31, 7, 96], 8, 8, 64, 32, 4),      # no GQA, block 32, a split with no blocks for the short ones
    ([257], 9, 1, 16, 16, 7),                 # one KV head for all (multi-query), splits of uneven size
])
def test_paged_decode_equals_attention_over_the_gathered_cache(lens, heads, kv_heads, head_dim, block_size, splits):
    q, k_pool, v_pool, tables, lengths = make_case(lens, heads, kv_heads, head_dim, block_size, torch.float32, 7)
    scale = head_dim ** -0.5
    got = paged_decode(q, k_pool, v_pool, tables, lengths, max(lens), num_splits=splits)
    want = reference(q, k_pool, v_pool, tables, lengths, scale)
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_bf16_tiles_accumulate_in_fp32():
    q, k_pool, v_pool, tables, lengths = make_case([40, 77], 8, 2, 64, 16, torch.bfloat16, 3)
    got = paged_decode(q, k_pool, v_pool, tables, lengths, 77, num_splits=2)
    want = reference(q, k_pool, v_pool, tables, lengths, 64 ** -0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_the_merge_of_splits_does_not_depend_on_their_count():
    q, k_pool, v_pool, tables, lengths = make_case([300, 45], 4, 4, 32, 16, torch.float32, 5)
    outs = [paged_decode(q, k_pool, v_pool, tables, lengths, 300, num_splits=s) for s in (1, 2, 5, 19, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


def test_the_engine_layer_uses_it_on_cuda_only_and_rejects_what_it_cannot_take():
    q = torch.zeros(1, 4, 32)
    assert supports(q, torch.zeros(2, 16, 2, 32)) and not supports(q, torch.zeros(2, 8, 2, 32))
    assert not supports(q, torch.zeros(2, 24, 2, 32)) and not supports(q.half(), torch.zeros(2, 16, 2, 32))
    with pytest.raises(ValueError, match="unsupported shapes"):
        paged_decode(q, torch.zeros(2, 8, 2, 32), torch.zeros(2, 8, 2, 32), torch.zeros(1, 1, dtype=torch.int32),
                     torch.ones(1, dtype=torch.int32), 1)


def test_the_engine_decodes_through_it_with_the_tokens_of_the_gathering_path(monkeypatch):
    """The tiny model's decode steps through paged_decode (as CUDA runs them without flash_attn) give the tokens
    of the SDPA path that gathers the blocks, batched and ragged, with prefill chunks still on SDPA."""
    from dynfocus_infer import attention
    from dynfocus_infer.engine import LLM
    from dynfocus_infer.sampling import SamplingParams

    calls = []
    from dynfocus_infer import paged_decode as module
    real = module.paged_decode

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    llm = LLM("tiny", num_frames=4, cluster_backend="reference", block_size=16)
    questions = ["Say hello.", "Count to three please, slowly and clearly.", "Why?"]
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=i, ignore_eos=True) for i, n in enumerate((9, 21, 14))]
    want = [o.token_ids for o in llm.generate(questions, params)]
    monkeypatch.setattr(module, "paged_decode", counted)
    monkeypatch.setattr(attention, "IN_PLACE_DECODE_OFF_CUDA", True)
    got = [o.token_ids for o in llm.generate(questions, params)]
    assert got == want
    assert calls and max(calls) == 3, calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_paged_decode_on_the_gpu_with_its_own_split_count(dtype, tolerance):
    q, k_pool, v_pool, tables, lengths = make_case([1, 17, 500, 128, 2049], 32, 8, 128, 16, dtype, 11)
    got = paged_decode(q.cuda(), k_pool.cuda(), v_pool.cuda(), tables.cuda(), lengths.cuda(), 2049)
    want = reference(q, k_pool, v_pool, tables, lengths, 128 ** -0.5)
    torch.testing.assert_close(got.cpu().double(), want, atol=tolerance, rtol=tolerance)

"""LLaMA decoder vs transformers' LlamaForCausalLM (identical random weights), cached decode vs recompute,
and the SDPA attention backends vs a naive softmax(QK^T)V reference."""
import math

import pytest
import torch
import transformers

from dynfocus_infer.attention import attention_backend, decode_with_cache, prefill_varlen
from dynfocus_infer.config import LlamaConfig
from dynfocus_infer.errors import ConfigError, RequestError
from dynfocus_infer.models.llama import KVCache, LlamaForCausalLM, greedy_generate
from dynfocus_infer.weights import load_into

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},  # puts head_dim 16's wavelengths in all three bands
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}
PROMPT_LENGTHS = (7, 23, 1)  # ragged; 23 > max_position_embeddings so "dynamic" scaling engages


def tiny_config(tied: bool, rope: str = "default") -> LlamaConfig:
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, rope_scaling=ROPE_SCALINGS[rope], rms_norm_eps=1e-5,
                       max_position_embeddings=16, tie_word_embeddings=tied)


def reference_and_model(config: LlamaConfig, seed: int = 0):
    """A transformers model with random weights (larger than its init, so logits are far from uniform) and ours
    built on meta and loaded from its state dict."""
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="eager")
    torch.manual_seed(seed)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    load_into(model, reference.state_dict(), source="transformers reference")
    return reference, model


def random_prompts(lengths, vocab_size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def packed(prompts):
    lengths = [len(p) for p in prompts]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return torch.tensor([t for p in prompts for t in p]), cu_seqlens, max(lengths)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", list(ROPE_SCALINGS))
def test_packed_prefill_logits_match_transformers(tied, rope):
    config = tiny_config(tied, rope)
    reference, model = reference_and_model(config)
    prompts = random_prompts(PROMPT_LENGTHS, config.vocab_size)
    input_ids, cu_seqlens, max_seqlen = packed(prompts)
    ours = model.prefill(cu_seqlens, max_seqlen, input_ids=input_ids, all_logits=True)
    with torch.no_grad():
        expected = torch.cat([reference(torch.tensor([p])).logits[0] for p in prompts])
    assert ours.shape == (sum(PROMPT_LENGTHS), config.vocab_size)
    assert (ours - expected).abs().max().item() < 1e-4
    last_only = model.prefill(cu_seqlens, max_seqlen, input_ids=input_ids)
    torch.testing.assert_close(last_only, expected[cu_seqlens[1:].long() - 1], atol=1e-5, rtol=0)
    if tied:
        assert "lm_head.weight" not in dict(model.named_parameters())


def test_cached_decode_matches_recompute_on_ragged_batch():
    config = tiny_config(tied=False, rope="linear")
    _, model = reference_and_model(config, seed=3)
    prompts = random_prompts((5, 12, 2), config.vocab_size, seed=4)
    slots = torch.tensor([3, 0, 2])  # sequences live in non-identity cache rows; row 1 stays unused
    cache = KVCache.for_model(config, max_batch=4, max_seq=24)
    input_ids, cu_seqlens, max_seqlen = packed(prompts)
    logits = model.prefill(cu_seqlens, max_seqlen, input_ids=input_ids, cache=cache, slots=slots)
    sequences = [list(p) for p in prompts]
    step_logits = [logits]
    for step in range(8):
        next_tokens = step_logits[-1].argmax(-1)
        for sequence, token in zip(sequences, next_tokens.tolist()):
            sequence.append(token)
        bound = None if step % 2 else max_seqlen + step + 1  # both SDPA spans: whole cache and host bound
        step_logits.append(model.decode(cache, input_ids=next_tokens, slots=slots, max_cache_len=bound))
    assert cache.lengths[slots].tolist() == [len(s) for s in sequences]
    full_ids, full_cu, full_max = packed(sequences)
    recomputed = model.prefill(full_cu, full_max, input_ids=full_ids, all_logits=True)
    for step, logits in enumerate(step_logits):
        rows = torch.tensor([full_cu[b] + len(prompts[b]) - 1 + step for b in range(3)])
        assert (logits - recomputed[rows]).abs().max().item() < 1e-4, f"decode step {step}"


def test_packed_prefill_equals_per_sequence_prefill_and_fills_cache():
    config = tiny_config(tied=True, rope="llama3")
    _, model = reference_and_model(config, seed=5)
    prompts = random_prompts((9, 1, 14, 4), config.vocab_size, seed=6)
    cache = KVCache.for_model(config, max_batch=4, max_seq=16)
    input_ids, cu_seqlens, max_seqlen = packed(prompts)
    together = model.prefill(cu_seqlens, max_seqlen, input_ids=input_ids, cache=cache)
    for b, prompt in enumerate(prompts):
        alone_cache = KVCache.for_model(config, max_batch=1, max_seq=16)
        alone = model.prefill(torch.tensor([0, len(prompt)], dtype=torch.int32), len(prompt),
                              input_ids=torch.tensor(prompt), cache=alone_cache)
        torch.testing.assert_close(together[b], alone[0], atol=1e-5, rtol=0)
        n = len(prompt)
        torch.testing.assert_close(cache.k[:, b, :n], alone_cache.k[:, 0, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.v[:, b, :n], alone_cache.v[:, 0, :n], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [len(p) for p in prompts]


def test_inputs_embeds_path_equals_input_ids_path():
    config = tiny_config(tied=False)
    _, model = reference_and_model(config, seed=7)
    input_ids, cu_seqlens, max_seqlen = packed(random_prompts((6, 3), config.vocab_size, seed=8))
    from_ids = model.prefill(cu_seqlens, max_seqlen, input_ids=input_ids, all_logits=True)
    from_embeds = model.prefill(cu_seqlens, max_seqlen, inputs_embeds=model.embed(input_ids), all_logits=True)
    assert torch.equal(from_ids, from_embeds)
    with pytest.raises(RequestError, match="exactly one"):
        model.prefill(cu_seqlens, max_seqlen)


def test_greedy_generate_matches_transformers_generate():
    config = tiny_config(tied=True)
    reference, model = reference_and_model(config, seed=9)
    prompts = random_prompts((3, 8, 5), config.vocab_size, seed=10)
    cache = KVCache.for_model(config, max_batch=3, max_seq=20)
    ours = greedy_generate(model, cache, prompts, max_new_tokens=10)
    for prompt, generated in zip(prompts, ours):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert generated == expected


def test_bf16_model_and_cache_track_fp32():
    config = tiny_config(tied=False, rope="linear")
    reference, model = reference_and_model(config, seed=11)
    with torch.device("meta"):
        half = LlamaForCausalLM(config)
    load_into(half, reference.state_dict(), dtype=torch.bfloat16)
    prompts = random_prompts((4, 9), config.vocab_size, seed=12)
    caches = [KVCache.for_model(config, 2, 12, dtype) for dtype in (torch.float32, torch.bfloat16)]
    outputs = []
    for net, cache in zip((model, half), caches):
        input_ids, cu_seqlens, max_seqlen = packed(prompts)
        net.prefill(cu_seqlens, max_seqlen, input_ids=input_ids, cache=cache)
        outputs.append(net.decode(cache, input_ids=torch.tensor([3, 5])))
    assert outputs[1].dtype == torch.bfloat16 and caches[1].lengths.tolist() == [5, 10]
    outputs = [logits.float() for logits in outputs]
    relative_rms = ((outputs[1] - outputs[0]).pow(2).mean() / outputs[0].pow(2).mean()).sqrt().item()
    assert relative_rms < 0.05


def test_model_rejects_unsupported_rope_and_overlong_prompt():
    with pytest.raises(ConfigError, match="yarn"):
        LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                     num_kv_heads=1, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    config = tiny_config(tied=True)
    _, model = reference_and_model(config)
    with pytest.raises(RequestError, match="does not fit the KV cache of 4"):
        model.prefill(torch.tensor([0, 6], dtype=torch.int32), 6, input_ids=torch.zeros(6, dtype=torch.long),
                      cache=KVCache.for_model(config, max_batch=1, max_seq=4))


# ---- attention backends ------------------------------------------------------------------------------------------

def naive_attention(q, k, v, causal, scale, valid_keys=None):
    """softmax(q k^T * scale) v for one sequence: q [Lq, H, D], k/v [Lk, Hkv, D]; the last query sits at the last key."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal:
        offset = k.shape[0] - q.shape[0]
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])
def test_prefill_varlen_sdpa_matches_naive(causal, num_kv_heads):
    lengths, num_heads, head_dim = [1, 7, 16, 3, 5], 6, 10
    total = sum(lengths)
    q, k, v = torch.randn(total, num_heads, head_dim), torch.randn(total, num_kv_heads, head_dim), \
        torch.randn(total, num_kv_heads, head_dim)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    scale = None if causal else 0.37
    out = prefill_varlen(q, k, v, cu_seqlens, max_seqlen=19, causal=causal, scale=scale)  # bound above max length
    for b in range(len(lengths)):
        rows = slice(cu_seqlens[b].item(), cu_seqlens[b + 1].item())
        expected = naive_attention(q[rows], k[rows], v[rows], causal, scale or 1 / math.sqrt(head_dim))
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_slots", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_decode_with_cache_sdpa_matches_naive(use_slots, num_kv_heads):
    num_heads, head_dim, max_seq = 9, 12, 19
    lengths = torch.tensor([1, 7, 19, 4])
    slots = torch.tensor([3, 0, 4, 1]) if use_slots else None
    rows = slots if use_slots else torch.arange(4)
    k_cache = torch.randn(5, max_seq, num_kv_heads, head_dim)
    v_cache = torch.randn(5, max_seq, num_kv_heads, head_dim)
    for row, n in zip(rows.tolist(), lengths.tolist()):  # garbage past each length must be masked out
        k_cache[row, n:], v_cache[row, n:] = 1e4, -1e4
    q = torch.randn(4, num_heads, head_dim)
    for bound in (None, 19):
        out = decode_with_cache(q, k_cache, v_cache, lengths, cache_slots=slots, max_cache_len=bound)
        for b, (row, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
            expected = naive_attention(q[b:b + 1], k_cache[row, :n], v_cache[row, :n], True, 1 / math.sqrt(head_dim))
            torch.testing.assert_close(out[b], expected[0], atol=1e-5, rtol=1e-5)


def test_attention_backend_is_sdpa_for_cpu_tensors():
    assert attention_backend(torch.device("cpu"), torch.float32) == "sdpa"
    assert attention_backend(torch.device("cuda"), torch.float32) == "sdpa"  # flash_attn has no fp32 kernels
    assert attention_backend() in ("sdpa", "flash_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_and_sdpa_backends_agree_on_cuda(dtype):
    pytest.importorskip("flash_attn")
    lengths, num_heads, num_kv_heads, head_dim = [1, 37, 128, 5], 8, 2, 64
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(lengths), num_heads, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lengths), num_kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    flash = prefill_varlen(q, k, v, cu_seqlens, 128)
    sdpa = prefill_varlen(q.float(), k.float(), v.float(), cu_seqlens, 128)
    torch.testing.assert_close(flash.float(), sdpa, atol=2e-2, rtol=2e-2)
    k_cache, v_cache = (torch.randn(6, 200, num_kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    lens, slots = torch.tensor([1, 50, 200, 9], device="cuda"), torch.tensor([5, 0, 2, 3], device="cuda")
    flash = decode_with_cache(q[:4], k_cache, v_cache, lens, cache_slots=slots)
    sdpa = decode_with_cache(q[:4].float(), k_cache.float(), v_cache.float(), lens, cache_slots=slots)
    torch.testing.assert_close(flash.float(), sdpa, atol=2e-2, rtol=2e-2)

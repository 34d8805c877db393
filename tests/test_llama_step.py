"""The engine's forward (LlamaForCausalLM.step over the paged KV cache) and the fast-path changes: fused q/k/v and
gate/up projections, the one-op RMSNorm and the precomputed RoPE table, each against transformers or the unfused
model."""
import pytest
import torch

from dynfocus_infer.models.llama import rope_cos_sin
from dynfocus_infer.models.paged_cache import PagedKVCache, StepMetadata
from test_llama import packed, random_prompts, reference_and_model, tiny_config


def step_metadata(chunks, block_size, tables):
    """chunks: (sequence, start, length) rows computed this step; tables: each sequence's block table."""
    positions = torch.cat([torch.arange(s, s + n) for _, s, n in chunks])
    seq_index = torch.cat([torch.full((n,), i) for i, (_, _, n) in enumerate(chunks)])
    table_rows = [torch.tensor(tables[seq]) for seq, _, _ in chunks]
    slots = torch.cat([t[p // block_size] * block_size + p % block_size
                       for t, p in zip(table_rows, positions.split([n for _, _, n in chunks]))])
    lengths = torch.tensor([n for _, _, n in chunks])
    context = torch.tensor([s + n for _, s, n in chunks])
    widest = max(len(t) for t in table_rows)
    block_tables = torch.zeros(len(chunks), widest, dtype=torch.int32)
    for i, t in enumerate(table_rows):
        block_tables[i, :len(t)] = t
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return StepMetadata(positions, seq_index, slots, cu_q.to(torch.int32),
                        torch.cat([torch.zeros(1, dtype=torch.int64), context.cumsum(0)]).to(torch.int32),
                        context.to(torch.int32), block_tables, cu_q[1:] - 1, int(lengths.max()), int(context.max()))


@pytest.mark.parametrize("rope", ["default", "llama3"])
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_mixed_steps_match_transformers(rope, fused):
    """Two prompts in chunks over scrambled blocks, a third decoding alongside: every sampled row's logits equal
    transformers' on the whole sequence."""
    config = tiny_config(tied=False, rope=rope)
    reference, model = reference_and_model(config)
    if fused:
        model.fuse_projections()
    prompts = random_prompts((11, 7, 5), config.vocab_size)
    block_size = 4
    cache = PagedKVCache(config, num_blocks=12, block_size=block_size, dtype=torch.float32, device="cpu")
    tables = {0: [7, 2, 9], 1: [0, 11], 2: [5, 3]}
    steps = [[(0, 0, 6), (1, 0, 7)], [(0, 6, 5), (2, 0, 4)], [(2, 4, 1)]]
    for chunks in steps:
        meta = step_metadata(chunks, block_size, tables)
        rows = torch.cat([torch.tensor(prompts[seq][s:s + n]) for seq, s, n in chunks])
        hidden = model.step(model.embed(rows), cache, meta)
        logits = model.logits(hidden[meta.logits_rows])
        for i, (seq, start, length) in enumerate(chunks):
            with torch.no_grad():
                expected = reference(torch.tensor([prompts[seq][:start + length]])).logits[0, -1]
            torch.testing.assert_close(logits[i], expected, atol=2e-4, rtol=2e-4)


def test_fused_projections_keep_the_state_dict_and_the_outputs():
    config = tiny_config(tied=True)
    _, model = reference_and_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, cu_seqlens, longest = packed(random_prompts((6, 9), config.vocab_size))
    unfused = model.prefill(cu_seqlens, longest, input_ids=ids, all_logits=True)
    model.fuse_projections()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()   # views: no second copy
    torch.testing.assert_close(model.prefill(cu_seqlens, longest, input_ids=ids, all_logits=True), unfused,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ["default", "linear", "llama3"])
def test_rope_table_equals_the_per_step_computation(rope):
    config = tiny_config(tied=True, rope=rope)
    _, model = reference_and_model(config)
    cos, sin = model.rope_table(torch.device("cpu"), torch.float32)
    positions = torch.arange(config.max_position_embeddings)
    expected = rope_cos_sin(config, positions, positions + 1, torch.float32)
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    assert model.rope_table(torch.device("cpu"), torch.float32)[0] is cos
    assert reference_and_model(tiny_config(tied=True, rope="dynamic"))[1].rope_table(torch.device("cpu"),
                                                                                      torch.float32) is None

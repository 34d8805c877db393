"""The model benchmark runs end to end in smoke mode (tiny configs, fp32), and its analytic FLOP and byte counts
match counts taken independently by walking the built modules' Linear / Conv2d layers."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_models  # noqa: E402
from dynfocus_infer.config import LlamaConfig, ViTConfig  # noqa: E402
from dynfocus_infer.models.eva_vit import EvaViT  # noqa: E402
from dynfocus_infer.models.llama import LlamaForCausalLM  # noqa: E402


def meta_model(build):
    with torch.device("meta"):
        return build()


def linear_weights(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def vit_flops_by_modules(config: ViTConfig) -> int:
    """Per frame: every Linear applied to each token, the patch conv at each patch, QK^T and AV per block."""
    vit = meta_model(lambda: EvaViT(config))
    tokens, patches = config.num_tokens, config.grid ** 2
    conv = vit.patch_embed.proj
    conv_flops = 2 * patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    attention = len(vit.blocks) * 2 * (2 * tokens * tokens * config.width)
    return conv_flops + 2 * tokens * linear_weights(vit.blocks) + attention


def causal_pairs(seq_len: int) -> int:
    return int(torch.ones(seq_len, seq_len).tril().sum())


@pytest.fixture(scope="module")
def smoke_rows():
    return {row["case"]: row for row in bench_models.main(["--smoke"])}


def test_smoke_run_reports_every_case_with_positive_times(smoke_rows):
    assert set(smoke_rows) == {"vit", "prefill", "decode"}  # no CUDA graph without CUDA
    for row in smoke_rows.values():
        assert row["ms"] > 0 and row["per_s"] > 0 and row["tflops"] > 0 and row["matmul_frac"] > 0
    decode = smoke_rows["decode"]
    assert decode["gbps"] > 0 and decode["bw_ratio"] > 0
    assert decode["per_s"] == pytest.approx(1e3 / decode["ms"])


def test_vit_flops_match_module_count(smoke_rows):
    expected = bench_models.SMOKE_VIT_BATCH * vit_flops_by_modules(bench_models.SMOKE_VIT)
    assert smoke_rows["vit"]["gflop"] * 1e9 == pytest.approx(expected, rel=1e-12)
    assert smoke_rows["vit"]["per_s"] == pytest.approx(bench_models.SMOKE_VIT_BATCH / smoke_rows["vit"]["ms"] * 1e3)


def test_vit_g_count_is_about_520_gflop_per_frame():
    flops = bench_models.vit_flops_per_frame(ViTConfig())
    assert flops == vit_flops_by_modules(ViTConfig())
    assert 515e9 < flops < 525e9


def test_prefill_flops_match_module_count(smoke_rows):
    config, seq_len = bench_models.SMOKE_LLAMA, bench_models.SMOKE_PROMPT_LEN
    model = meta_model(lambda: LlamaForCausalLM(config))
    attention = config.num_layers * 2 * 2 * causal_pairs(seq_len) * config.num_heads * config.head_dim
    expected = 2 * seq_len * linear_weights(model.model.layers) + attention + 2 * linear_weights(model.lm_head)
    assert smoke_rows["prefill"]["gflop"] * 1e9 == pytest.approx(expected, rel=1e-12)


def test_decode_bytes_and_flops_match_parameter_count(smoke_rows):
    config = bench_models.SMOKE_LLAMA
    model = meta_model(lambda: LlamaForCausalLM(config))
    # Every parameter once, except the embedding table, of which a step reads one row.
    weight_bytes = 4 * (sum(p.numel() for p in model.parameters()) - (config.vocab_size - 1) * config.hidden_size)
    mean_cache_len = bench_models.SMOKE_PROMPT_LEN + (1 + bench_models.SMOKE_DECODE_STEPS) / 2
    kv_bytes = 4 * config.num_layers * 2 * mean_cache_len * config.num_kv_heads * config.head_dim
    decode = smoke_rows["decode"]
    assert decode["gbps"] * decode["ms"] * 1e6 == pytest.approx(weight_bytes + kv_bytes, rel=1e-9)
    attention = config.num_layers * 4 * config.num_heads * config.head_dim * mean_cache_len
    assert decode["gflop"] * 1e9 == pytest.approx(2 * linear_weights(model) + attention, rel=1e-12)


def test_tied_embeddings_count_the_table_once():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    model = meta_model(lambda: LlamaForCausalLM(config))
    _, weight_bytes, kv_bytes = bench_models.llama_decode_work(config, 0, 2)
    assert kv_bytes == 0
    assert weight_bytes == 2 * sum(p.numel() for p in model.parameters())


def test_smoke_run_records_nothing(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("a smoke run must not append benchmark rows")

    monkeypatch.setattr(bench_models, "append_csv", fail)
    monkeypatch.setattr(bench_models, "measure_ceilings", lambda device: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    rows = bench_models.main(["--smoke", "--record"])
    assert len(rows) == 3
    assert "nothing recorded" in capsys.readouterr().out

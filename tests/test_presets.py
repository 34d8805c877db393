"""Presets: the random-weight 7B build's byte tokenizer, and configs that match the paper's sizes."""
import pytest

from dynfocus_infer.config import ModelConfig
from dynfocus_infer.presets import ByteTokenizer


def test_byte_tokenizer_round_trips_text_and_stays_in_range():
    tok = ByteTokenizer()
    text = "What happens in the vidéo? 42"
    ids = tok(text)["input_ids"]
    assert min(ids) >= 3 and max(ids) < 259 and tok.decode(ids) == text
    assert tok.decode([1] + ids + [2]) == text


def test_paper_config_sizes():
    config = ModelConfig()
    assert (config.vit.width, config.vit.depth, config.vit.num_tokens) == (1408, 39, 257)
    assert (config.llm.hidden_size, config.llm.num_layers, config.llm.vocab_size) == (4096, 32, 32000)
    assert config.connector.num_spatial_tokens == 22 and config.connector.num_pooled == 16


def test_random_weight_paper_build_runs_end_to_end_at_reduced_sizes(monkeypatch):
    # The dynfocus-7b random build (meta -> dtype -> device, N(0, 0.02) weights, unit norms, byte tokenizer,
    # vicuna_v1 prompt) at small sizes: the same code path the GPU benchmarks take at full size.
    import torch

    import dynfocus_infer.presets as presets
    from dynfocus_infer.config import ConnectorConfig, LlamaConfig, QFormerConfig, ViTConfig
    from dynfocus_infer.engine import LLM
    from dynfocus_infer.outputs import Request
    from dynfocus_infer.sampling import SamplingParams

    def small_config():
        vit = ViTConfig(image_size=56, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
        return ModelConfig(vit=vit, qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                          intermediate_size=64, encoder_width=32, output_width=32),
                           connector=ConnectorConfig(vision_width=32, llm_width=64, qformer_width=32, patch_grid=8),
                           llm=LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                                           num_heads=4, num_kv_heads=4, max_position_embeddings=1024))

    monkeypatch.setattr(presets, "ModelConfig", small_config)
    llm = LLM("dynfocus-7b", random_weights=True, num_frames=5, cluster_backend="reference")
    norms = [m.weight for m in llm.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    assert llm.loaded.template == "vicuna_v1" and "random" in llm.notice
    frames = torch.randint(0, 256, (9, 60, 80, 3), dtype=torch.uint8)
    out = llm.generate([Request("What happens?", frames)], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.ok and len(out.token_ids) == 4 and out.tokens.frames == 5


def test_the_random_7b_build_says_how_much_memory_it_needs(monkeypatch):
    from dynfocus_infer import presets
    from dynfocus_infer.errors import ConfigError

    monkeypatch.setattr(presets, "available_memory", lambda device: 2 * 2**30)
    with pytest.raises(ConfigError, match=r"needs (2[6-9]|3\d)\.\d GiB for its weights in torch.float32 on cpu, but "
                                          r"only 2.0 GiB is available"):
        presets.load_model("dynfocus-7b", random_weights=True, device="cpu")

"""EVA ViT-g/14 at tiny sizes against transformers' InstructBlipVisionModel, with both checkpoint layouts."""
import pytest
import torch

from dynfocus_infer.config import ViTConfig
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.eva_vit import EvaViT, convert_hf_vision, convert_lavis_eva_vit

transformers = pytest.importorskip("transformers")

TINY = ViTConfig(image_size=42, patch_size=14, width=64, depth=3, num_heads=4, mlp_dim=96)


def _hf_vision_model(config: ViTConfig, seed: int = 0):
    hf_config = transformers.InstructBlipVisionConfig(
        hidden_size=config.width, intermediate_size=config.mlp_dim, num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads, image_size=config.image_size, patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps, qkv_bias=True, hidden_act="gelu", attention_dropout=0.0)
    hf_config._attn_implementation = "eager"
    model = transformers.InstructBlipVisionModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            # LayerNorm weights near 1 keep the residual stream well scaled; everything else, the k part of the
            # fused qkv bias included, is random so that every weight is exercised.
            param.copy_(1.0 + 0.1 * noise if "layer_norm" in name and name.endswith("weight") else 0.1 * noise)
    return model


def _hf_reference(model, pixels):
    """The output of the last encoder layer, before post_layernorm."""
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    last_block = out.hidden_states[-1]
    # Pins which index is the last block: post_layernorm of it must be the model's last_hidden_state.
    torch.testing.assert_close(model.post_layernorm(last_block), out.last_hidden_state, atol=1e-6, rtol=0)
    return last_block


def _loaded(state_dict, config=TINY) -> EvaViT:
    vit = EvaViT(config).eval()
    vit.load_state_dict(state_dict, strict=True)
    return vit


def test_vit_matches_hf_instructblip_vision_and_chunks_agree():
    hf = _hf_vision_model(TINY)
    pixels = torch.randn(5, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    expected = _hf_reference(hf, pixels)
    vit = _loaded(convert_hf_vision({f"vision_model.{k}": v for k, v in hf.state_dict().items()}, TINY))
    with torch.no_grad():
        whole = vit(pixels)
        chunked = vit(pixels, chunk_size=2)
    assert whole.shape == (5, TINY.num_tokens, TINY.width)
    assert (whole - expected).abs().max().item() < 1e-4
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def _lavis_names_from_hf(hf_state: dict, extra_block: int) -> dict:
    """Writes the LAVIS eva_vit_g.pth layout from HF tensors, independently of the converters under test, plus
    one more block (the checkpoint's 40th, which LAVIS never builds)."""
    lavis = {"cls_token": hf_state["embeddings.class_embedding"],
             "pos_embed": hf_state["embeddings.position_embedding"],
             "patch_embed.proj.weight": hf_state["embeddings.patch_embedding.weight"],
             "patch_embed.proj.bias": hf_state["embeddings.patch_embedding.bias"]}
    for i in range(extra_block + 1):
        src = f"encoder.layers.{min(i, extra_block - 1)}."
        width = hf_state[src + "self_attn.qkv.weight"].shape[1]
        q_bias, _, v_bias = hf_state[src + "self_attn.qkv.bias"].split(width)
        lavis.update({f"blocks.{i}.norm1.weight": hf_state[src + "layer_norm1.weight"],
                      f"blocks.{i}.norm1.bias": hf_state[src + "layer_norm1.bias"],
                      f"blocks.{i}.attn.qkv.weight": hf_state[src + "self_attn.qkv.weight"],
                      f"blocks.{i}.attn.q_bias": q_bias,
                      f"blocks.{i}.attn.v_bias": v_bias,
                      f"blocks.{i}.attn.proj.weight": hf_state[src + "self_attn.projection.weight"],
                      f"blocks.{i}.attn.proj.bias": hf_state[src + "self_attn.projection.bias"],
                      f"blocks.{i}.norm2.weight": hf_state[src + "layer_norm2.weight"],
                      f"blocks.{i}.norm2.bias": hf_state[src + "layer_norm2.bias"]})
        for fc in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                lavis[f"blocks.{i}.mlp.{fc}.{kind}"] = hf_state[f"{src}mlp.{fc}.{kind}"] * (7.0 if i == extra_block
                                                                                          else 1.0)
    return lavis


def test_lavis_layout_drops_the_extra_block_and_matches_hf():
    hf = _hf_vision_model(TINY, seed=2)
    lavis = _lavis_names_from_hf(hf.state_dict(), extra_block=TINY.depth)
    assert f"blocks.{TINY.depth}.mlp.fc1.weight" in lavis
    converted = convert_lavis_eva_vit(lavis, TINY)
    assert not any(name.startswith(f"blocks.{TINY.depth}.") for name in converted)
    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = _loaded(converted)(pixels)
    assert (out - _hf_reference(hf, pixels)).abs().max().item() < 1e-4


def test_hf_converter_accepts_separate_q_and_v_biases():
    hf_state = _hf_vision_model(TINY, seed=4).state_dict()
    split = {}
    for name, tensor in hf_state.items():
        if name.endswith("self_attn.qkv.bias"):
            q_bias, _, v_bias = tensor.chunk(3)
            split[name.replace("qkv.bias", "q_bias")] = q_bias
            split[name.replace("qkv.bias", "v_bias")] = v_bias
        else:
            split[name] = tensor
    fused, unfused = convert_hf_vision(hf_state, TINY), convert_hf_vision(split, TINY)
    assert fused.keys() == unfused.keys()
    assert all(torch.equal(fused[k], unfused[k]) for k in fused)
    assert not any("post_layernorm" in k for k in fused)


def test_converters_name_missing_unexpected_and_wrong_shape_keys():
    lavis = _lavis_names_from_hf(_hf_vision_model(TINY).state_dict(), extra_block=TINY.depth)
    broken = dict(lavis)
    del broken["blocks.1.norm2.weight"]
    broken["blocks.0.attn.k_bias"] = torch.zeros(TINY.width)
    broken["pos_embed"] = torch.zeros(1, TINY.num_tokens + 1, TINY.width)
    with pytest.raises(CheckpointError) as error:
        convert_lavis_eva_vit(broken, TINY)
    message = str(error.value)
    assert "missing (1): blocks.1.norm2.weight" in message
    assert "unexpected (1): blocks.0.attn.k_bias" in message
    assert "wrong shape (1): pos_embed" in message
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.self_attn\.k_bias"):
        hf_state = dict(_hf_vision_model(TINY).state_dict())
        hf_state["encoder.layers.0.self_attn.k_bias"] = torch.zeros(TINY.width)
        convert_hf_vision(hf_state, TINY)


def test_vit_in_bfloat16_stays_close_to_float32():
    torch.manual_seed(5)
    vit = EvaViT(TINY).eval()
    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        reference = vit(pixels)
        low = vit.to(torch.bfloat16)(pixels)
    assert low.dtype == torch.bfloat16
    relative_rms = ((low.float() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative_rms < 2e-2


def test_vit_rejects_wrong_image_size_and_chunk_size():
    vit = EvaViT(TINY)
    with pytest.raises(ValueError, match="resize and centre-crop"):
        vit(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="chunk_size"):
        vit(torch.zeros(2, 3, 42, 42), chunk_size=0)


def test_full_size_vit_has_the_eva_vit_g_shapes():
    with torch.device("meta"):
        vit = EvaViT(ViTConfig())
    shapes = {name: tuple(t.shape) for name, t in vit.state_dict().items()}
    assert shapes["pos_embed"] == (1, 257, 1408)
    assert shapes["patch_embed.proj.weight"] == (1408, 3, 14, 14)
    assert shapes["blocks.38.attn.qkv.weight"] == (3 * 1408, 1408)
    assert shapes["blocks.38.mlp.fc1.weight"] == (6144, 1408)
    assert "blocks.39.norm1.weight" not in shapes
    assert "blocks.0.attn.k_bias" not in shapes
    assert round(sum(t.numel() for t in vit.state_dict().values()) / 1e6) == 986


def test_load_checkpoint_reads_a_safetensors_file_into_a_meta_module(tmp_path):
    from safetensors.torch import save_file

    from dynfocus_infer.weights import read_state_dict

    hf = _hf_vision_model(TINY, seed=6)
    whole = {f"vision_model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    whole["qformer.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)  # another part of InstructBLIP
    save_file(whole, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        vit = EvaViT(TINY)
    vit.load_checkpoint(read_state_dict(tmp_path), layout="hf")
    assert not any(t.is_meta for t in vit.state_dict().values())
    pixels = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (vit.eval()(pixels) - _hf_reference(hf, pixels)).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="layout"):
        vit.load_checkpoint({}, layout="timm")


@pytest.mark.gpu
def test_full_size_vit_in_bfloat16_on_cuda_tracks_float32():
    torch.manual_seed(8)
    with torch.device("cuda"):
        vit = EvaViT(ViTConfig()).eval()
    pixels = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        reference = vit(pixels)
        low = vit.to(torch.bfloat16)(pixels, chunk_size=2)
    assert low.shape == (3, 257, 1408) and low.dtype == torch.bfloat16
    relative_rms = ((low.float() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative_rms < 5e-2

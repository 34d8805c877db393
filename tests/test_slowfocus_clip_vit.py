"""SlowFocus's CLIP vision tower at tiny sizes against transformers' CLIPVisionModel on shared random weights."""
import pytest
import torch

from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.slowfocus import CLIPVisionTower, CLIPViTConfig

transformers = pytest.importorskip("transformers")

TINY = CLIPViTConfig(image_size=28, patch_size=7, width=32, depth=3, num_heads=4, mlp_dim=64)


def _hf_clip(config: CLIPViTConfig, seed: int = 0):
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=config.width, intermediate_size=config.mlp_dim, num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads, image_size=config.image_size, patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps, hidden_act=config.hidden_act, attention_dropout=0.0)
    hf_config._attn_implementation = "eager"
    model = transformers.CLIPVisionModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            # LayerNorm gains near 1 keep the residual stream well scaled; every other weight is random.
            is_gain = ("layer_norm" in name or "layrnorm" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_gain else 0.1 * noise)
    return model


def _tower(hf, config=TINY) -> CLIPVisionTower:
    return CLIPVisionTower(config).load_checkpoint(hf.state_dict()).eval()


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_tower_matches_hf_hidden_state_without_cls(select_layer):
    config = CLIPViTConfig(**{**TINY.__dict__, "select_layer": select_layer})
    hf = _hf_clip(config)
    pixels = torch.randn(3, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
        ours = _tower(hf, config)(pixels)
    assert ours.shape == (3, config.grid ** 2, config.width)
    assert (ours - expected).abs().max().item() < 1e-5


def test_penultimate_layer_differs_from_last_and_chunks_agree():
    hf = _hf_clip(TINY)
    pixels = torch.randn(5, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(2))
    tower = _tower(hf)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        whole, chunked = tower(pixels), tower(pixels, chunk_size=2)
    # Pins the layer: -2 is one layer short of the last, so the two must differ.
    assert (hidden[-1][:, 1:] - whole).abs().max().item() > 1e-2
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_clip_checkpoint_loads_tensor_for_tensor_and_strictly():
    hf = _hf_clip(TINY)
    tower = _tower(hf)
    hf_state = hf.state_dict()  # transformers 5 names: no `vision_model.` prefix
    ours = tower.state_dict()
    assert sorted(ours) == sorted(f"vision_model.{k}" for k in hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(ours[f"vision_model.{name}"], tensor), name
    # The CLIPModel / transformers 4 layout (prefixed, with a text tower and position_ids) loads the same tensors.
    clip_model_state = {f"vision_model.{k}": v for k, v in hf_state.items()}
    clip_model_state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
                             "vision_model.embeddings.position_ids": torch.arange(17)[None]})
    again = CLIPVisionTower(TINY).load_checkpoint(clip_model_state).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ours.items())
    broken = {k: v for k, v in hf_state.items() if "encoder.layers.2.mlp.fc1.bias" not in k}
    with pytest.raises(CheckpointError, match="encoder.layers.2.mlp.fc1.bias"):
        CLIPVisionTower(TINY).load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no CLIP vision tensors"):
        CLIPVisionTower(TINY).load_checkpoint({"text_model.x": torch.zeros(1)})


def test_wrong_pixel_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[N, 3, 28, 28\]"):
        CLIPVisionTower(TINY)(torch.zeros(1, 3, 32, 32))

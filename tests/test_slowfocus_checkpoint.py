"""A checkpoint directory in the SlowFocus authors' layout (LLaVA shards with model.vlm_att_*, model.mm_projector,
model.temporal_embedding, model.mix_attn_*, model.vision_tower.vision_tower.*) loads back tensor for tensor with
strict key checks; and the slowfocus-7b build has the paper's shapes and says its weights are random."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from dynfocus_infer.errors import CheckpointError, ConfigError
from dynfocus_infer.models.slowfocus import (build_slowfocus, export_slowfocus_state, load_slowfocus,
                                             tiny_slowfocus_config)
from dynfocus_infer.models.slowfocus.checkpoint import VISION_TOWER_PREFIX


def _write(directory, state, config, **extra):
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.safetensors": names[::2],
              "pytorch_model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous().clone() for k in keys}, str(directory / file))
        weight_map.update({k: file for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    llm = config.llm
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llava", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
        "rms_norm_eps": llm.rms_norm_eps, "max_position_embeddings": llm.max_position_embeddings,
        "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id,
        "mm_hidden_size": config.vit.width, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "bert_type": "qformer_pretrain_freeze_all", "num_query": config.qformer.num_query_tokens,
        "compress_type": f"grid:{config.connector.pool_grid}", "temporal_embedding": "v1", "mix_attn": "bi",
        "slowfocus": {"vit": dataclasses.asdict(config.vit), "qformer": dataclasses.asdict(config.qformer),
                      "connector": {"qformer_width": config.connector.qformer_width}},
        **extra}))


@pytest.fixture(scope="module")
def tiny():
    return build_slowfocus(tiny_slowfocus_config(), seed=5)


def _assert_same(original, loaded):
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_authors_layout_names_and_round_trip(tiny, tmp_path):
    state = export_slowfocus_state(tiny)
    for name in ("model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.vlm_att_key_projector.weight",
                 "model.vlm_att_val_projector.bias", "model.vlm_att_bert_proj.weight", "model.vlm_att_query",
                 "model.vlm_att_ln.weight", "model.vlm_att_projector.weight", "model.temporal_embedding.weight",
                 "model.mix_attn_lfreq_projector.weight", "model.mix_attn_hfreq_projector.bias",
                 "model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.key.weight",
                 VISION_TOWER_PREFIX + "vision_model.pre_layrnorm.weight", "model.layers.0.self_attn.q_proj.weight",
                 "lm_head.weight"):
        assert name in state, name
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # LLaVA-era buffer, recomputed
    _write(tmp_path / "ckpt", state, tiny.config)
    loaded = load_slowfocus(str(tmp_path / "ckpt"), device="cpu")
    assert loaded.notice is None and loaded.model.config == tiny.config
    _assert_same(tiny, loaded.model)


def test_vision_tower_from_a_separate_clip_checkpoint(tiny, tmp_path):
    state = export_slowfocus_state(tiny, with_vision_tower=False)
    _write(tmp_path / "ckpt", state, tiny.config)
    with pytest.raises(CheckpointError, match="holds no vision tower weights"):
        load_slowfocus(str(tmp_path / "ckpt"), device="cpu")
    clip = {k[len("vision_model."):]: v.contiguous() for k, v in tiny.vision_tower.state_dict().items()}
    save_file(clip, str(tmp_path / "clip.safetensors"))  # transformers 5 CLIPVisionModel names
    loaded = load_slowfocus(str(tmp_path / "ckpt"), device="cpu", vision_tower=str(tmp_path / "clip.safetensors"))
    _assert_same(tiny, loaded.model)


def test_missing_unknown_and_misshaped_tensors_are_named(tiny, tmp_path):
    state = export_slowfocus_state(tiny)
    missing = {k: v for k, v in state.items() if k != "model.temporal_embedding.weight"}
    _write(tmp_path / "missing", missing, tiny.config)
    with pytest.raises(CheckpointError, match=r"connector.*temporal_embedding\.weight"):
        load_slowfocus(str(tmp_path / "missing"), device="cpu")
    _write(tmp_path / "unknown", {**state, "model.extra_head.weight": torch.zeros(2)}, tiny.config)
    with pytest.raises(CheckpointError, match="belong to no part of SlowFocus: model.extra_head.weight"):
        load_slowfocus(str(tmp_path / "unknown"), device="cpu")
    # A checkpoint trained with another mix_attn holds q/k/v projectors the "bi" model does not have.
    qkv = {**state, "model.mix_attn_q_projector.weight": torch.zeros(32, 32)}
    _write(tmp_path / "qkv", qkv, tiny.config)
    with pytest.raises(CheckpointError, match="mix_attn_q_projector"):
        load_slowfocus(str(tmp_path / "qkv"), device="cpu")
    wrong = {**state, "model.mm_projector.0.weight": torch.zeros(3, 3)}
    _write(tmp_path / "wrong", wrong, tiny.config)
    with pytest.raises(CheckpointError, match="mm_projector.0.weight"):
        load_slowfocus(str(tmp_path / "wrong"), device="cpu")


def test_config_json_mix_attn_selects_the_parameters(tmp_path):
    config = tiny_slowfocus_config(mix_attn="qkv", temporal_buckets=0)
    model = build_slowfocus(config, seed=1)
    _write(tmp_path / "ckpt", export_slowfocus_state(model), config, mix_attn="v2", temporal_embedding=None)
    loaded = load_slowfocus(str(tmp_path / "ckpt"), device="cpu")
    assert loaded.model.config.connector.mix_attn == "qkv" and loaded.model.config.connector.temporal_buckets == 0
    _assert_same(model, loaded.model)


def test_slowfocus_7b_needs_weights_or_says_they_are_random():
    with pytest.raises(ConfigError, match="random_weights=True"):
        load_slowfocus("slowfocus-7b", device="meta")
    loaded = load_slowfocus("slowfocus-7b", device="meta", random_weights=True)
    assert "random" in loaded.notice
    model = loaded.model
    shapes = {k: tuple(v.shape) for k, v in export_slowfocus_state(model).items()}
    tower = VISION_TOWER_PREFIX + "vision_model."
    assert shapes[tower + "embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes[tower + "encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert tower + "encoder.layers.24.mlp.fc1.weight" not in shapes
    assert shapes["model.vlm_att_bert_proj.weight"] == (1408, 1024)
    assert shapes["model.vlm_att_ln.weight"] == (1408,)
    assert shapes["model.vlm_att_query"] == (1, 32, 768)
    assert shapes["model.vlm_att_projector.weight"] == (1024, 768)
    assert shapes["model.vlm_att_key_projector.weight"] == (1024, 1024)
    assert shapes["model.vlm_att_val_projector.weight"] == (4096, 1024)
    assert shapes["model.temporal_embedding.weight"] == (1000, 1024)
    assert shapes["model.mix_attn_hfreq_projector.weight"] == shapes["model.mix_attn_lfreq_projector.weight"] == (
        1024, 1024)
    assert shapes["model.mm_projector.0.weight"] == (4096, 1024)
    assert shapes["model.mm_projector.2.weight"] == (4096, 4096)
    assert shapes["model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert model.tokens_per_frame == 65 and model.config.vit.num_layers_run == 23


def test_unknown_model_name_is_refused():
    with pytest.raises(ConfigError, match="neither a SlowFocus preset"):
        load_slowfocus("slowfocus-13b", device="cpu")

"""Checkpoint readers (safetensors, torch, sharded, LAVIS-wrapped, GGUF), load_into and its errors."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynfocus_infer.config import LlamaConfig
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.llama import LlamaForCausalLM
from dynfocus_infer.weights import (load_into, read_gguf_llama_config, read_gguf_state_dict, read_official_config,
                                    read_state_dict)

CONFIG = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                     tie_word_embeddings=False)


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in LlamaForCausalLM(CONFIG).state_dict().items()}


def meta_model(config=CONFIG):
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def write_shards(directory, state, kind):
    """Split `state` over two shards plus an HF index (weight_map: tensor name -> shard file)."""
    keys = sorted(state)
    shards = {f"part-1.{kind}": keys[::2], f"part-2.{kind}": keys[1::2]}
    for name, shard_keys in shards.items():
        tensors = {k: state[k].clone() for k in shard_keys}
        save_file(tensors, directory / name) if kind == "safetensors" else torch.save(tensors, directory / name)
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory / index


@pytest.mark.parametrize("layout", ["safetensors", "bin", "lavis_pth", "dir_single", "shards_safetensors",
                                    "shards_bin"])
def test_every_layout_reads_back_the_same_tensors(tmp_path, state, layout):
    if layout == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, path)
    elif layout == "bin":
        path = tmp_path / "weights.bin"
        torch.save(state, path)
    elif layout == "lavis_pth":
        path = tmp_path / "eva_vit_g.pth"
        torch.save({"model": state, "config": {"note": "LAVIS wraps weights"}}, path)
    elif layout == "dir_single":
        save_file(state, tmp_path / "model.safetensors")
        path = tmp_path
    else:
        write_shards(tmp_path, state, layout.split("_")[1])
        path = tmp_path
    assert_same_tensors(read_state_dict(path), state)


def test_prefix_selects_and_strips(tmp_path, state):
    path = tmp_path / "blip2.safetensors"
    save_file({**{f"language_model.{k}": v for k, v in state.items()}, "vision_model.x": torch.ones(2)}, path)
    assert_same_tensors(read_state_dict(path, prefix="language_model."), state)
    with pytest.raises(CheckpointError, match="blip2.safetensors.*prefix 'qformer.'"):
        read_state_dict(path, prefix="qformer.")


def test_load_into_meta_module_assigns_without_copy(tmp_path, state):
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    loaded = read_state_dict(path)
    model = load_into(meta_model(), loaded, source=str(path))
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    for key, value in state.items():
        assert torch.equal(params[key], value)
        assert params[key].data_ptr() == loaded[key].data_ptr(), f"{key} was copied"
    half = load_into(meta_model(), loaded, dtype=torch.bfloat16)
    assert half.model.norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.lm_head.weight.float(), state["lm_head.weight"], atol=1e-2, rtol=1e-2)


def test_tied_model_ignores_checkpoint_lm_head(state):
    tied = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    model = load_into(meta_model(tied), state, source="hf-tied")  # HF state dicts carry lm_head.weight when tied
    logits = model.logits(torch.randn(3, CONFIG.hidden_size))
    assert logits.shape == (3, CONFIG.vocab_size)
    assert model.model.embed_tokens.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_missing_key_is_named_with_the_file(state):
    partial = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"ckpt_a\.safetensors.*missing keys: model\.layers\.1\.mlp\.up_proj"):
        load_into(meta_model(), partial, source="/x/ckpt_a.safetensors")
    with pytest.raises(CheckpointError, match="would stay uninitialised"):  # non-strict cannot leave meta tensors
        load_into(meta_model(), partial, strict=False, source="/x/ckpt_a.safetensors")


def test_unexpected_keys_are_counted(state):
    extra = {**state, **{f"vision_tower.block{i}.weight": torch.zeros(1) for i in range(7)}}
    with pytest.raises(CheckpointError, match=r"ckpt_b\.bin.*unexpected keys: vision_tower\.block0\.weight, .*"
                                              r"\(7 in all\)"):
        load_into(meta_model(), extra, source="ckpt_b.bin")
    model = load_into(meta_model(), extra, strict=False)  # tolerated when not strict
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"])


def test_wrong_shape_names_key_expected_and_got(state):
    bad = {**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 16)}
    with pytest.raises(CheckpointError, match=r"ckpt_c\.pt: wrong tensor shapes.*"
                                              r"model\.layers\.0\.self_attn\.k_proj\.weight \(expected \(8, 16\), "
                                              r"got \(16, 16\)\)"):
        load_into(meta_model(), bad, strict=False, source="ckpt_c.pt")


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.bin", "garbage.pth", "garbage.gguf"])
def test_garbage_file_raises_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=name):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_truncated_file_raises_naming_it(tmp_path, state, suffix):
    path = tmp_path / f"cut.{suffix}"
    save_file(state, path) if suffix == "safetensors" else torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cut.{suffix}"):
        read_state_dict(path)


def test_index_with_missing_shard_names_the_shard(tmp_path, state):
    index = write_shards(tmp_path, state, "safetensors")
    (tmp_path / "part-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard file\(s\) part-2\.safetensors"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="part-2.safetensors"):
        read_state_dict(index)


def test_index_listing_a_tensor_absent_from_its_shard(tmp_path, state):
    index = write_shards(tmp_path, state, "bin")
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["model.ghost.weight"] = "part-1.bin"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"part-1\.bin: tensors model\.ghost\.weight"):
        read_state_dict(tmp_path)


def test_directory_without_checkpoint_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(CheckpointError, match="found: none"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="nothere.safetensors: no such"):
        read_state_dict(tmp_path / "nothere.safetensors")


def test_read_official_llama_vid_config(tmp_path):
    config = {  # the fields of a LLaMA-VID / DynFocus Vicuna-7B v1.5 config.json
        "architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "mm_hidden_size": 1408,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
        "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "bert_type": "qformer_pretrain",
        "num_query": 32, "compress_type": "mean", "image_aspect_ratio": "pad", "use_cache": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llama, mm = read_official_config(tmp_path)
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == \
        (4096, 32, 32, 32, 128)
    assert (llama.rope_theta, llama.rms_norm_eps, llama.rope_scaling, llama.tie_word_embeddings) == \
        (10000.0, 1e-5, None, False)
    assert mm == {"mm_hidden_size": 1408, "mm_projector_type": "mlp2x_gelu",
                  "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth", "mm_vision_select_layer": -2,
                  "mm_use_im_start_end": False, "bert_type": "qformer_pretrain", "num_query": 32,
                  "compress_type": "mean", "image_aspect_ratio": "pad"}
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        read_official_config(tmp_path)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (the transform the reader must undo)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def test_gguf_reader_maps_names_unpermutes_qk_and_reads_config(tmp_path, state):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(CONFIG.num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_rope_freq_base(5e4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(CONFIG.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    blocks = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in state.items():
        array = value.numpy()
        if key.startswith("model.layers."):
            _, _, index, *module, suffix = key.split(".")
            name = f"blk.{index}.{blocks['.'.join(module)]}.{suffix}"
            if "q_proj" in key or "k_proj" in key:
                array = llama_cpp_permute(array, CONFIG.num_heads if "q_proj" in key else CONFIG.num_kv_heads)
        else:
            name = names[key]
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_tensors(read_state_dict(path), state)
    assert_same_tensors(read_gguf_state_dict(path), state)
    config = read_gguf_llama_config(path)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == \
        (2, 16, 4, 2, 4)
    assert (config.rope_theta, config.max_position_embeddings, config.tie_word_embeddings) == (5e4, 256, False)
    assert abs(config.rms_norm_eps - 1e-6) < 1e-12

"""An official-layout checkpoint directory (config.json + safetensors shards + index + tokenizer + Q-Former vocab)
written from a tiny model loads back through LLM(model=DIR) with every tensor equal, and bad shards fail clearly."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dynfocus_infer.engine import LLM
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.connector import export_official_connector
from dynfocus_infer.models.dynfocus import VISION_TOWER_PREFIX
from dynfocus_infer.models.qformer import export_official_qformer
from dynfocus_infer.outputs import Request
from dynfocus_infer.presets import load_model
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import write_test_video


def official_state(model):
    state = dict(model.llm.state_dict())
    state.update(export_official_qformer(model.qformer.state_dict()))
    state.update(export_official_connector(model.connector.state_dict()))
    state.update({VISION_TOWER_PREFIX + k: v for k, v in model.vit.state_dict().items()})
    return {k: v.contiguous().clone() for k, v in state.items()}


def write_checkpoint(directory, loaded, state):
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(directory / file))
        weight_map.update({k: file for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = loaded.model.config
    llm = cfg.llm
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llava_llama_vid", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "max_position_embeddings": llm.max_position_embeddings,
        "tie_word_embeddings": llm.tie_word_embeddings, "bos_token_id": llm.bos_token_id,
        "eos_token_id": llm.eos_token_id, "mm_hidden_size": cfg.vit.width, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth", "bert_type": "qformer_pretrain",
        "dynfocus": {"vit": dataclasses.asdict(cfg.vit), "qformer": dataclasses.asdict(cfg.qformer),
                     "connector": dataclasses.asdict(cfg.connector)}}))
    loaded.tokenizer.save_pretrained(str(directory))
    (directory / "bert-base-uncased").mkdir(exist_ok=True)
    shutil.copy(loaded.question_tokenizer.vocab_file, directory / "bert-base-uncased" / "vocab.txt")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", cluster_backend="reference", seed=3)


def test_checkpoint_directory_loads_every_tensor_and_answers(tiny, tmp_path):
    state = official_state(tiny.model)
    # transformers <= 4.31 checkpoints carry RoPE buffers per layer; they are recomputed, not loaded.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    write_checkpoint(tmp_path / "ckpt", tiny, state)
    llm = LLM(str(tmp_path / "ckpt"), num_frames=4, cluster_backend="reference")
    original = tiny.model.state_dict()
    loaded = llm.model.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key
    assert llm.notice is None and llm.loaded.template == "vicuna_v1"
    video = tmp_path / "clip.mp4"
    write_test_video(video, num_frames=16)
    out = llm.generate([Request("What happens?", str(video))], SamplingParams(max_tokens=3))[0]
    assert out.ok and len(out.token_ids) == 3 and out.tokens.frames == 4


def test_missing_and_unknown_tensors_are_named(tiny, tmp_path):
    state = official_state(tiny.model)
    missing_key = "model.vlm_att_key_projector.weight"
    write_checkpoint(tmp_path / "missing", tiny, {k: v for k, v in state.items() if k != missing_key})
    with pytest.raises(CheckpointError, match="vlm_att_key_projector.weight"):
        LLM(str(tmp_path / "missing"), cluster_backend="reference")
    write_checkpoint(tmp_path / "extra", tiny, {**state, "model.surprise.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"belong to no part of DynFocus: model\.surprise\.weight"):
        LLM(str(tmp_path / "extra"), cluster_backend="reference")


def test_seven_b_preset_without_weights_says_what_to_do():
    with pytest.raises(Exception, match="needs weights: pass the checkpoint directory"):
        LLM("dynfocus-7b")


def test_text_only_preset_refuses_videos_and_answers_text(tmp_path):
    llm = LLM("smollm2-135m-instruct")
    video = tmp_path / "clip.mp4"
    write_test_video(video, num_frames=8)
    text, with_video = llm.generate(["What is 2+2?", Request("What happens?", str(video))],
                                    SamplingParams(max_tokens=16))
    assert text.ok and "4" in text.text, text.text  # real weights: SmolLM2 knows this one
    assert not with_video.ok and "text-only" in with_video.error

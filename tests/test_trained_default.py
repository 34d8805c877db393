"""dynfocus-smol, the embedded default, is the visual path trained here (issue 17), shipped as package data: it loads
those weights exactly (every tensor, at the sizes its card records), says what it was trained on, samples 12 frames
as trained; the old random build stays selectable as dynfocus-smol-random; a missing weights file is a clear error."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dynfocus_infer import presets
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.presets import TRAINED_CARD, TRAINED_WEIGHTS, load_model


@pytest.fixture(scope="module")
def trained():
    return load_model("dynfocus-smol", device="cpu")


def test_the_default_loads_every_shipped_tensor(trained):
    shipped = load_file(str(TRAINED_WEIGHTS))
    assert TRAINED_WEIGHTS.stat().st_size <= 25 * 2 ** 20
    seen = 0
    for part in ("vit", "qformer", "connector"):
        for name, tensor in getattr(trained.model, part).state_dict().items():
            assert torch.equal(tensor, shipped[f"{part}.{name}"].to(tensor.dtype)), f"{part}.{name}"
            seen += 1
    assert seen == len(shipped)
    shapes = load_model("dynfocus-smol-shapes", device="cpu")  # the same sizes, random: the weights differ
    assert not torch.equal(shapes.model.connector.mm_projector[0].weight, trained.model.connector.mm_projector[0].weight)


def test_the_card_says_what_produced_the_weights_and_matches_the_preset(trained):
    card = json.loads(TRAINED_CARD.read_text())
    commands = card["command"].split(" && ")
    assert all(c.startswith(("dynfocus-infer train ", "dynfocus-infer pretrain-vit ")) for c in commands)
    assert all(f"--seed {card['training']['seed']}" in c for c in commands)
    assert commands[-1].startswith("dynfocus-infer train") and card["code_commit"]
    if card["training"].get("init_vit_training"):  # trained from a pretrained ViT: its command comes first
        assert commands[0].startswith("dynfocus-infer pretrain-vit") and "--init-vit" in commands[-1]
    assert len(card["code_commit"]) >= 7 and card["training"]["model"] == "dynfocus-smol-shapes"
    config = trained.model.config
    assert card["vit"] == json.loads(json.dumps(vars(config.vit)))
    assert card["connector"] == json.loads(json.dumps(vars(config.connector), default=list))
    assert card["qformer"] == json.loads(json.dumps(vars(config.qformer)))


def test_the_notice_frames_and_the_random_build(trained):
    assert "synthetic videos only" in trained.notice and trained.default_frames == 12
    card = json.loads(TRAINED_CARD.read_text())
    overall = next(r for r in card["evaluation"] if r["type"] == "all")
    assert f"answered {overall['accuracy']:.0%} of the questions about {overall['videos']} held-out" in trained.notice
    random_build = load_model("dynfocus-smol-random", device="cpu")
    assert "random weights" in random_build.notice and random_build.default_frames == 16
    assert random_build.model.config.vit.image_size == 224 and trained.model.config.vit.image_size == 112


def test_a_missing_weights_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "TRAINED_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="dynfocus-smol-random"):
        load_model("dynfocus-smol", device="cpu")

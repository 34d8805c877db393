"""The ViT's pretraining stage (training/vit_pretrain.py) on the tiny preset: the loss falls, a resumed run equals an
uninterrupted one, seeds repeat, bad settings and files get named errors, and `train --init-vit` starts the visual
path from exactly the exported ViT."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynfocus_infer.cli import main
from dynfocus_infer.errors import CheckpointError, ConfigError
from dynfocus_infer.synthetic.scene import COLOURS, SHAPES, sample_scene
from dynfocus_infer.training import TrainConfig, train
from dynfocus_infer.training.probe import frame_pairs
from dynfocus_infer.training.vit_pretrain import PretrainConfig, pretrain_batch, pretrain_vit

TINY = dict(model="tiny", frames=4, lr=1e-2, warmup_steps=0, checkpoint_every=50)


def pretrain_config(tmp_path, name, **overrides):
    return PretrainConfig(out=str(tmp_path / name), **{**TINY, **overrides})


def test_frame_pairs_mark_the_pairs_visible_in_that_frame():
    brief = next(sample_scene(0, i) for i in range(500) if sample_scene(0, i).brief_index is not None)
    shape = brief.shapes[brief.brief_index]
    pair = SHAPES.index(shape.kind) * len(COLOURS) + list(COLOURS).index(shape.colour)
    outside = 0 if shape.first > 0 else shape.last
    assert frame_pairs(brief, shape.first)[pair] == 1 and frame_pairs(brief, outside)[pair] == 0
    inside = frame_pairs(brief, shape.first)
    assert inside.sum() == len(brief.shapes) and set(inside.unique().tolist()) == {0.0, 1.0}


def test_batches_are_fixed_by_seed_and_step_and_never_repeat_a_video():
    a = pretrain_batch(0, 3, 5, 56, 8)
    b = pretrain_batch(0, 3, 5, 56, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, 3, 56, 56) and a[1].shape == a[2].shape == (5, 64) and a[3].shape == (5, 18)
    assert not torch.equal(a[0], pretrain_batch(0, 4, 5, 56, 8)[0])
    assert not torch.equal(a[0], pretrain_batch(1, 3, 5, 56, 8)[0])
    # every frame shows at least one shape's pair unless its only shapes are briefly visible elsewhere
    assert (a[3].sum(1) >= 1).float().mean() > 0.5 and (a[2] > 0).any() and (a[1] > 0).any()


def test_loss_falls_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole = pretrain_vit(pretrain_config(tmp_path, "whole", steps=30, checkpoint_every=30), progress=False)
    losses = [row["loss"] for row in whole["losses"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert all(abs(r["loss"] - r["patch"] - 5.0 * r["frame"]) < 1e-4 for r in whole["losses"])

    def interrupt(step, loss):
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_vit(pretrain_config(tmp_path, "parts", steps=30), progress=False, on_step=interrupt)
    assert torch.load(tmp_path / "parts" / "vit_checkpoint.pt", weights_only=False)["step"] == 17
    resumed = pretrain_vit(pretrain_config(tmp_path, "parts", steps=30), resume=True, progress=False)
    assert resumed["losses"] == whole["losses"] and resumed["steps_run"] == 13 and whole["steps_run"] == 30
    a, b = load_file(whole["weights"]), load_file(resumed["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "parts" / "vit_losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 31)) and logged[-1]["loss"] == losses[-1]
    other = pretrain_vit(pretrain_config(tmp_path, "other", steps=3, seed=1), progress=False)
    assert other["losses"] != whole["losses"][:3]


def test_resume_and_start_refuse_what_does_not_fit(tmp_path):
    pretrain_vit(pretrain_config(tmp_path, "r", steps=1), progress=False)
    with pytest.raises(ConfigError, match="frames 4 there, 3 here"):
        pretrain_vit(pretrain_config(tmp_path, "r", steps=2, frames=3), resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a ViT checkpoint"):
        pretrain_vit(pretrain_config(tmp_path, "r", steps=2), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrain_vit(pretrain_config(tmp_path, "none", steps=2), resume=True, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "vit_checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable ViT pretraining checkpoint"):
        pretrain_vit(pretrain_config(tmp_path, "junk", steps=2), resume=True, progress=False)
    torch.save({"format": 1, "step": 1}, tmp_path / "junk" / "vit_checkpoint.pt")  # no kind: not ours
    with pytest.raises(CheckpointError, match="is not a ViT pretraining checkpoint of format 1"):
        pretrain_vit(pretrain_config(tmp_path, "junk", steps=2), resume=True, progress=False)
    for bad in (dict(frames=0), dict(lr=2.0), dict(frame_weight=-1.0), dict(seed=-1)):
        with pytest.raises(ConfigError):
            pretrain_config(tmp_path, "bad", **bad)


def _train_config(tmp_path, name, **overrides):
    settings = dict(model="tiny", batch_size=1, num_frames=4, lr=1e-6, warmup_steps=0, cluster_backend="reference",
                    probe_videos=0, probe_weight=0.0, patch_weight=0.0, steps=1, checkpoint_every=1)
    return TrainConfig(out=str(tmp_path / name), **{**settings, **overrides})


def test_train_starts_from_the_pretrained_vit_and_records_it(tmp_path):
    weights = pretrain_vit(pretrain_config(tmp_path, "vit", steps=5), progress=False)["weights"]
    pretrained = load_file(weights)
    train(_train_config(tmp_path, "init", init_vit=weights), progress=False)
    train(_train_config(tmp_path, "scratch"), progress=False)
    init = load_file(str(tmp_path / "init" / "visual.safetensors"))
    scratch = load_file(str(tmp_path / "scratch" / "visual.safetensors"))
    # one AdamW step of lr 1e-6 moves each weight by about 1e-6: the ViT is the pretrained one, not the preset's
    for key, tensor in pretrained.items():
        assert (init[f"vit.{key}"] - tensor).abs().max() < 1e-4, key
    assert max((scratch[f"vit.{k}"] - t).abs().max().item() for k, t in pretrained.items()) > 1e-2
    recorded = json.loads((tmp_path / "init" / "visual_config.json").read_text())["training"]
    assert recorded["init_vit"] == weights and recorded["init_vit_training"]["steps"] == 5
    # a resume keeps the record and refuses another --init-vit
    train(_train_config(tmp_path, "init", init_vit=weights, steps=2), resume=True, progress=False)
    again = json.loads((tmp_path / "init" / "visual_config.json").read_text())["training"]
    assert again["init_vit_training"] == recorded["init_vit_training"]
    with pytest.raises(ConfigError, match="init_vit"):
        train(_train_config(tmp_path, "init", steps=3), resume=True, progress=False)


def test_init_vit_refuses_other_seeds_models_and_files(tmp_path):
    weights = pretrain_vit(pretrain_config(tmp_path, "vit", steps=1), progress=False)["weights"]
    with pytest.raises(ConfigError, match="seed 0; this run is --model 'tiny', --seed 1"):
        train(_train_config(tmp_path, "a", init_vit=weights, seed=1), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_train_config(tmp_path, "b", init_vit=str(tmp_path / "missing.safetensors")), progress=False)
    train(_train_config(tmp_path, "c"), progress=False)
    with pytest.raises(CheckpointError, match="not written by pretrain-vit"):
        train(_train_config(tmp_path, "d", init_vit=str(tmp_path / "c" / "visual.safetensors")), progress=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        train(_train_config(tmp_path, "e", init_vit=str(garbage)), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()  # refused before anything is written


def test_pretrain_vit_command(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["pretrain-vit", "--out", out, "--model", "tiny", "--steps", "2", "--frames", "3"]) == 0
    printed = capsys.readouterr().out
    assert "pretrained to step 2" in printed and "held out (256 frames of seed 1): patch colour" in printed
    written = json.loads((tmp_path / "cli" / "vit_config.json").read_text())
    assert written["frames"] == 3 and 0 <= written["held_out"]["patch_kind"] <= 1
    assert main(["pretrain-vit", "--out", out, "--model", "tiny", "--steps", "2", "--frames", "3"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["pretrain-vit", "--out", str(tmp_path / "x"), "--frames", "0"]) == 2
    assert "--frames 0" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "t"), "--model", "tiny", "--steps", "1", "--batch-size", "1",
                 "--frames", "4", "--init-vit", str(tmp_path / "cli" / "vit.safetensors")]) == 0


def test_held_out_accuracy_scores_oracle_and_constant_heads():
    from dynfocus_infer.config import ViTConfig
    from dynfocus_infer.models.eva_vit import EvaViT
    from dynfocus_infer.training.vit_pretrain import held_out_accuracy

    vit = EvaViT(ViTConfig(image_size=56, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64))
    _, colours, kinds, pairs = pretrain_batch(5, 0, 40, 56, 8)

    def one_hot(labels, classes):
        return torch.nn.functional.one_hot(labels.flatten(), classes).float()

    oracle_patch = lambda tokens: {"patch_colour": one_hot(colours, 7), "patch_kind": one_hot(kinds, 4)}  # noqa: E731
    oracle_frame = lambda tokens: pairs * 2 - 1  # noqa: E731
    scores = held_out_accuracy(vit, oracle_patch, oracle_frame, seed=5, frames=40)
    assert scores["patch_colour"] == scores["patch_kind"] == scores["frame_kind"] == 1.0
    shape = kinds.flatten() > 0
    assert scores["shape_patches"] == int(shape.sum()) > 0
    squares = (kinds.flatten()[shape] == 2).float().mean().item()
    always_square = lambda tokens: {"patch_colour": one_hot(colours, 7),  # noqa: E731
                                    "patch_kind": one_hot(torch.full_like(kinds, 2), 4)}
    # a frame probe that always scores the first kind (circle) highest is right where a circle of that colour shows
    always_circle = lambda tokens: torch.tensor([1.0] * 6 + [0.0] * 12).expand(40, 18)  # noqa: E731
    scores = held_out_accuracy(vit, always_square, always_circle, seed=5, frames=40)
    assert abs(scores["patch_kind"] - squares) < 1e-6 and scores["patch_colour"] == 1.0
    by_colour = pairs.view(40, 3, 6)
    shown = by_colour.any(dim=1)
    assert abs(scores["frame_kind"] - by_colour[:, 0][shown].float().mean().item()) < 1e-6
    assert abs(scores["patch_kind_majority"]
               - max((kinds.flatten()[shape] == k).float().mean().item() for k in (1, 2, 3))) < 1e-6

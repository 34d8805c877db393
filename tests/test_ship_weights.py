"""scripts/ship_weights.py's card command: it must reproduce the run, including settings the run predates and the
ViT's pretraining stage."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ship_weights.py"
spec = importlib.util.spec_from_file_location("ship_weights", SCRIPT)
ship_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ship_weights)

RUN = dict(batch_size=4, lr=0.001, seed=0, num_frames=12, probe_videos=8, probe_weight=1.0, norm_weight=0.0,
           patch_weight=1.0, steps=2000, segments=[{"from_step": 0, "steps": 1000}, {"from_step": 1000, "steps": 2000}])


def test_a_run_older_than_probe_norm_is_written_with_the_layer_norm_it_used():
    command = ship_weights.command_of(RUN)
    first, second = command.split(" && ")
    assert first.startswith("dynfocus-infer train --out RUN --steps 1000 --batch-size 4 --lr 0.001 --seed 0")
    assert second.startswith("dynfocus-infer train --out RUN --resume --steps 2000")
    assert first.endswith("--probe-norm layer") and "--init-vit" not in command and "--visual-encoder" not in command


def test_a_pretrained_vit_and_a_baseline_encoder_are_in_the_command():
    pretrain = dict(steps=2000, frames=64, lr=0.001, seed=0, frame_weight=5.0)
    run = {**RUN, "probe_norm": "batch", "init_vit_training": pretrain, "visual_encoder": "llama-vid",
           "segments": [{"from_step": 0, "steps": 1000}]}
    parts = ship_weights.command_of(run).split(" && ")
    assert parts[0] == ("dynfocus-infer pretrain-vit --out VIT --steps 2000 --frames 64 --lr 0.001 --seed 0 "
                        "--frame-weight 5")
    assert len(parts) == 2 and parts[1].endswith(
        "--probe-norm batch --visual-encoder llama-vid --init-vit VIT/vit.safetensors")


def test_the_answer_aligned_rods_are_in_the_command_only_when_used():
    run = {**RUN, "probe_norm": "batch", "align_weight": 1.0}
    parts = ship_weights.command_of(run).split(" && ")
    assert len(parts) == 2 and all(part.endswith("--probe-norm batch --align-weight 1") for part in parts)
    assert "--align-weight" not in ship_weights.command_of({**RUN, "align_weight": 0.0})


def test_the_kind_aligned_prototypes_are_in_the_command_only_when_used():
    run = {**RUN, "probe_norm": "batch", "align_weight": 1.0, "kind_weight": 0.5}
    parts = ship_weights.command_of(run).split(" && ")
    assert len(parts) == 2 and all(part.endswith("--align-weight 1 --kind-weight 0.5") for part in parts)
    assert "--kind-weight" not in ship_weights.command_of({**RUN, "kind_weight": 0.0})

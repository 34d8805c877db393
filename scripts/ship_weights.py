#!/usr/bin/env python3
"""Copies a training run's visual weights into the package as dynfocus-smol's (dynfocus_infer/trained/), with a card
saying what produced them: the training settings and command, the commit of the code that trained, the sizes, the
last losses, and (when given) the evaluation it reached.

    python scripts/ship_weights.py RUN_DIR --commit HASH [--eval EVAL_DIR]

The weights are stored in float32, as trained; the card is dynfocus_infer/trained/dynfocus-smol.json.
"""
import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "dynfocus_infer" / "trained"
MAX_BYTES = 25 * 2 ** 20


LOSS_PARTS = ("loss", "answer", "probe", "patch", "norm", "align", "kind")  # losses.jsonl's columns (align: run 7 on)


def command_of(training: dict) -> str:
    """The commands that trained the run: the ViT's pretraining when it started from one (`--init-vit`), then one
    `train` per segment (the first, then each --resume to a longer --steps). Settings a run predates are written as
    they were then (trainer._DEFAULT_BEFORE: a run without probe_norm trained with --probe-norm layer)."""
    flags = (f"--batch-size {training['batch_size']} --lr {training['lr']:g} --seed {training['seed']} "
             f"--frames {training['num_frames']} --probe-videos {training.get('probe_videos', 0)} "
             f"--probe-weight {training.get('probe_weight', 0):g} --norm-weight {training.get('norm_weight', 0):g} "
             f"--patch-weight {training.get('patch_weight', 0):g} --probe-norm {training.get('probe_norm', 'layer')}")
    if training.get("align_weight", 0):
        flags += f" --align-weight {training['align_weight']:g}"
    if training.get("kind_weight", 0):
        flags += f" --kind-weight {training['kind_weight']:g}"
    if training.get("visual_encoder", "dynfocus") != "dynfocus":
        flags += f" --visual-encoder {training['visual_encoder']}"
    commands = []
    pretrain = training.get("init_vit_training")
    if pretrain:
        commands.append(f"dynfocus-infer pretrain-vit --out VIT --steps {pretrain['steps']} --frames "
                        f"{pretrain['frames']} --lr {pretrain['lr']:g} --seed {pretrain['seed']} --frame-weight "
                        f"{pretrain['frame_weight']:g}")
        flags += " --init-vit VIT/vit.safetensors"
    segments = training.get("segments") or [{"from_step": 0, "steps": training["steps"]}]
    commands += [f"dynfocus-infer train --out RUN{' --resume' if i else ''} --steps {segment['steps']} {flags}"
                 for i, segment in enumerate(segments)]
    return " && ".join(commands)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `dynfocus-infer train --out` folder")
    parser.add_argument("--commit", required=True, help="the commit of the code the run trained with")
    parser.add_argument("--eval", default=None, help="a `dynfocus-infer eval --out` folder of these weights")
    parser.add_argument("--segments", default=None,
                        help="for a run trained before segments were recorded: the --steps of each command that "
                             "trained it, e.g. 1000,2000 (trained to 1000, then resumed to 2000)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    weights, config = run / "visual.safetensors", run / "visual_config.json"
    for path in (weights, config):
        if not path.is_file():
            print(f"ship_weights: {path} does not exist: give a finished training run", file=sys.stderr)
            return 1
    if weights.stat().st_size > MAX_BYTES:
        print(f"ship_weights: {weights} is {weights.stat().st_size} bytes, over {MAX_BYTES}", file=sys.stderr)
        return 1
    described = json.loads(config.read_text())
    training = described["training"]
    if args.segments:
        targets = [int(t) for t in args.segments.split(",")]
        if targets != sorted(set(targets)) or targets[-1] != training["steps"]:
            print(f"ship_weights: --segments {args.segments} must increase and end at the run's --steps "
                  f"({training['steps']})", file=sys.stderr)
            return 1
        training["segments"] = [{"from_step": ([0] + targets)[i], "steps": t} for i, t in enumerate(targets)]
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines() if line.strip()]
    tail = losses[-50:]
    card = {"model": "dynfocus-smol", "trained_on": "synthetic shape videos (dynfocus_infer/synthetic), seed "
            f"{training['seed']}; the LLM (SmolLM2-135M-Instruct) frozen",
            "command": command_of(training), "code_commit": args.commit, "training": training,
            "steps": len(losses), "last_50_steps_mean": {k: sum(r[k] for r in tail) / len(tail) for k in LOSS_PARTS
                                                        if k in tail[0]},
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "vit": described["vit"], "qformer": described["qformer"], "connector": described["connector"]}
    if args.eval:
        card["evaluation"] = json.loads((Path(args.eval) / "accuracy.json").read_text())
    TRAINED.mkdir(exist_ok=True)
    shutil.copyfile(weights, TRAINED / "dynfocus-smol.safetensors")
    (TRAINED / "dynfocus-smol.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"shipped {weights} ({weights.stat().st_size} bytes) as {TRAINED / 'dynfocus-smol.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

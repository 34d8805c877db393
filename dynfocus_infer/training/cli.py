"""`dynfocus-infer train`: train a small preset's visual path on synthetic shape videos (training/trainer.py)."""
from __future__ import annotations

import argparse


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train the visual path of dynfocus-smol-shapes on synthetic videos")
    train.add_argument("--out", required=True, help="folder for checkpoint.pt, losses.jsonl and the exported weights")
    train.add_argument("--model", default="dynfocus-smol-shapes",
                       help="preset whose visual path is trained (default dynfocus-smol-shapes; tiny for tests)")
    train.add_argument("--steps", type=int, default=1200,
                       help="total optimizer steps (default 1200: about an hour on 2 quiet CPU cores)")
    train.add_argument("--batch-size", type=int, default=4, help="videos per step (default 4)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default 1e-3)")
    train.add_argument("--seed", type=int, default=0, help="initialisation, data and noise seed (default 0)")
    train.add_argument("--frames", type=int, default=12, help="frames sampled per video (default 12)")
    train.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    train.add_argument("--num-videos", type=int, default=0,
                       help="cycle through this many videos (0, the default: a new video for every example)")
    train.add_argument("--probe-videos", type=int, default=8,
                       help="extra videos per step trained through the scene probe only (default 8)")
    train.add_argument("--probe-weight", type=float, default=1.0,
                       help="weight of the scene probe's loss (default 1; 0: the answer loss alone)")
    train.add_argument("--norm-weight", type=float, default=0.0,
                       help="weight of the visual-token scale penalty (default 0: off)")
    train.add_argument("--patch-weight", type=float, default=1.0,
                       help="weight of the patch probe's loss on the ViT's patch tokens (default 1; 0: none)")
    train.add_argument("--probe-norm", default="batch", choices=("batch", "layer"),
                       help="the scene probe's input normalisation: batch (default; centred per channel over the "
                            "step's tokens) or layer (per token, as runs 1-3 of the README, whose probe never left "
                            "its prior; to resume or reproduce them)")
    train.add_argument("--visual-encoder", default="dynfocus",
                       help="dynfocus (default) or a token-count baseline trained for its own token layout: full, "
                            "pool-GxG, llama-vid, uniform-K, dynfocus-L<events>-r<keep> (evaluate it with "
                            "`eval --weights RUN/visual.safetensors --encoders NAME`)")
    train.add_argument("--init-vit", default="",
                       help="start the ViT from a `pretrain-vit` run's OUT/vit.safetensors (same --model and --seed)")
    train.add_argument("--align-weight", type=float, default=0.0,
                       help="weight of the colour-aligned context rods: for a question that names a shape, each "
                            "frame's question-conditioned rod is pulled onto the LLM's embedding of that shape's "
                            "colour word (default 0)")
    train.add_argument("--kind-weight", type=float, default=0.0,
                       help="weight of the kind-aligned spatial prototypes: each spatial prototype whose patches are "
                            "mostly one shape is pulled, through the cones' projector, onto the LLM's embedding of "
                            "that shape's kind word (default 0)")
    train.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps (a larger --steps stretches the learning-rate schedule)")


def run_train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    config = TrainConfig(out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size,
                         lr=float(args.lr), seed=args.seed, num_frames=args.frames,
                         checkpoint_every=args.checkpoint_every, num_videos=args.num_videos, device=args.device,
                         probe_videos=args.probe_videos, probe_weight=float(args.probe_weight),
                         norm_weight=float(args.norm_weight), patch_weight=float(args.patch_weight),
                         visual_encoder=args.visual_encoder, probe_norm=args.probe_norm, init_vit=args.init_vit,
                         align_weight=args.align_weight, kind_weight=args.kind_weight)
    result = train(config, resume=args.resume)
    last = result["losses"][-1]
    print(f"trained to step {result['step']}: last loss {last['loss']:.4f} (answer {last['answer']:.4f}), "
          f"{result['steps_run']} steps run here at {result['seconds_per_step']:.2f} s/step; "
          f"checkpoint {result['checkpoint']}")
    return 0


def add_pretrain_vit_parser(commands) -> None:
    pretrain = commands.add_parser(
        "pretrain-vit", help="pretrain the ViT of dynfocus-smol-shapes on single synthetic frames (no LLM), for "
                             "`train --init-vit`")
    pretrain.add_argument("--out", required=True,
                          help="folder for vit_checkpoint.pt, vit_losses.jsonl and vit.safetensors")
    pretrain.add_argument("--model", default="dynfocus-smol-shapes", help="preset whose ViT is pretrained")
    pretrain.add_argument("--steps", type=int, default=1500, help="total optimizer steps (default 1500)")
    pretrain.add_argument("--frames", type=int, default=64, help="frames per step, each of a new video (default 64)")
    pretrain.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default 1e-3)")
    pretrain.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default 0; train's)")
    pretrain.add_argument("--frame-weight", type=float, default=5.0,
                          help="weight of the frame probe's loss (default 5; 0: the patch probe alone)")
    pretrain.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    pretrain.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    pretrain.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps")


def run_pretrain_vit(args: argparse.Namespace) -> int:
    from .vit_pretrain import PretrainConfig, pretrain_vit

    config = PretrainConfig(out=args.out, model=args.model, steps=args.steps, frames=args.frames, lr=float(args.lr),
                            seed=args.seed, frame_weight=float(args.frame_weight),
                            checkpoint_every=args.checkpoint_every, device=args.device)
    result = pretrain_vit(config, resume=args.resume)
    last = result["losses"][-1]
    print(f"pretrained to step {result['step']}: last loss {last['loss']:.4f} (patch {last['patch']:.4f}, frame "
          f"{last['frame']:.4f}), {result['steps_run']} steps run here at {result['seconds_per_step']:.2f} s/step; "
          f"weights {result['weights']}")
    held = result["held_out"]
    print(f"held out ({held['frames']} frames of seed {held['seed']}): patch colour {held['patch_colour']:.1%}, "
          f"patch kind {held['patch_kind']:.1%} (most frequent kind {held['patch_kind_majority']:.1%}), frame "
          f"kind {held['frame_kind']:.1%} (of {held['frame_colours']} colours shown)")
    return 0

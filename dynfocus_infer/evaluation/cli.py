"""`dynfocus-infer eval`: accuracy per question type on held-out synthetic videos, per visual encoder."""
from __future__ import annotations

import argparse


def add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="accuracy on held-out synthetic videos, per visual encoder")
    evaluate.add_argument("--out", required=True,
                          help="folder for predictions.jsonl, accuracy.csv, accuracy.json, confusion.csv")
    evaluate.add_argument("--model", default="dynfocus-smol",
                          help="preset (default dynfocus-smol, the shipped trained model; dynfocus-smol-shapes with "
                               "--weights for a training run's)")
    evaluate.add_argument("--weights", default=None, help="trained visual weights (train's visual.safetensors)")
    evaluate.add_argument("--data", default=None, help="a folder `generate` wrote (default: generate into OUT/data)")
    evaluate.add_argument("--count", type=int, default=500, help="videos to generate (default 500)")
    evaluate.add_argument("--seed", type=int, default=1, help="held-out data seed (default 1; training uses 0)")
    evaluate.add_argument("--encoders", default=None,
                          help="comma-separated: dynfocus and/or baselines (full, pool-4x4, llama-vid, uniform-4, "
                               "dynfocus-L<L>-r<K/L>, dynfocus-rods-off, dynfocus-cones-off, dynfocus-coarse); "
                               "default: the one the weights were trained for (train --visual-encoder), else "
                               "dynfocus")
    evaluate.add_argument("--frames", type=int, default=12, help="frames per video (default 12, as trained)")
    evaluate.add_argument("--max-tokens", type=int, default=48, help="tokens to generate at most (default 48)")
    evaluate.add_argument("--max-videos", type=int, default=0,
                          help="score only the questions of the first N videos (0: all)")
    evaluate.add_argument("--max-questions", type=int, default=0, help="score only the first N questions (0: all)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--no-prefix-caching", action="store_true",
                          help="compute every prompt in full instead of reusing the K/V blocks of a prefix already computed")


def run_eval(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..errors import RequestError
    from .run import evaluate, layout_mismatch

    for name in ("count", "frames", "max_tokens"):
        if getattr(args, name) < 1:
            raise RequestError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: expected >= 1")
    if args.seed < 0 or args.max_questions < 0 or args.max_videos < 0:
        raise RequestError("--seed, --max-videos and --max-questions must be >= 0")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise RequestError(f"--weights {args.weights!r} is not a file")
    encoders = None if args.encoders is None else [e.strip() for e in args.encoders.split(",") if e.strip()]
    table = evaluate(args.out, model=args.model, encoders=encoders, data=args.data, count=args.count, seed=args.seed,
                     weights=args.weights, num_frames=args.frames, max_tokens=args.max_tokens, device=args.device,
                     max_questions=args.max_questions, max_videos=args.max_videos,
                     prefix_caching=not args.no_prefix_caching)
    print(f"{'encoder':<22} {'type':<10} {'accuracy':>8} {'n':>6} {'tokens':>7}")
    for row in table:
        print(f"{row['encoder']:<22} {row['type']:<10} {row['accuracy']:>8.3f} {row['total']:>6} "
              f"{row['visual_tokens']:>7}")
    for row in table:
        encoder, trained_for = row["encoder"], row["trained_for"] or None
        if row["type"] == "all" and layout_mismatch(encoder, trained_for):
            print(f"note: {encoder} was scored with weights trained for {trained_for}'s token layout; its projectors "
                  f"never saw {encoder}'s, so it is not a fair baseline (train --visual-encoder {encoder})",
                  file=sys.stderr)
    return 0

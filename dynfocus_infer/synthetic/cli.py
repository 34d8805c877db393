"""`dynfocus-infer generate`: write a synthetic dataset (mp4 + question/answer JSONL) to a folder."""
from __future__ import annotations

import argparse


def add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="write synthetic shape videos with questions and answers")
    generate.add_argument("--out", required=True, help="folder for videos/, qa.jsonl and scenes.jsonl (new or empty)")
    generate.add_argument("--count", type=int, required=True, help="number of videos")
    generate.add_argument("--seed", type=int, default=0, help="dataset seed (default 0); video i depends only on it")


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .dataset import check_dataset_args, write_dataset

    check_dataset_args(args.out, args.count, args.seed)  # bad options exit 2 before anything is written
    with tqdm(total=args.count, unit="video", desc="generate", dynamic_ncols=True) as bar:
        summary = write_dataset(args.out, args.count, args.seed, progress=bar.update)
    print(f"wrote {summary['videos']} videos and {summary['questions']} questions to {summary['out']}")
    return 0

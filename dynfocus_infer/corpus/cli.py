"""`dynfocus-infer corpus`: the command line of run_corpus. Imports nothing of Ray until the command runs."""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def add_corpus_parser(commands, add_model_args) -> None:
    """Adds the `corpus` subcommand (model and sampling flags from the main CLI's add_model_args)."""
    corpus = commands.add_parser("corpus", help="answer a manifest of videos on Ray Data (a machine or a cluster)")
    corpus.add_argument("--input", required=True,
                        help="manifest: JSONL or .parquet with id, video, question (+ optional num_frames, fps, "
                             "max_frames, max_tokens, temperature, top_p, top_k, seed)")
    corpus.add_argument("--output", required=True, help="folder for the shards (one row per id)")
    corpus.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="shard format")
    corpus.add_argument("--address", default=None,
                        help="Ray cluster: auto or ray://host:port (default: a local Ray sized to this machine)")
    corpus.add_argument("--num-gpus", type=int, default=None,
                        help="GPUs to answer on, one engine each (default: all the cluster has; 0 = CPU engines)")
    corpus.add_argument("--concurrency", type=int, default=None,
                        help="engine actors (default: --num-gpus, or 1 on CPU; a multiple of --num-gpus)")
    corpus.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per video decode task (default 1)")
    corpus.add_argument("--batch-size", type=int, default=8, help="requests per engine batch (default 8)")
    corpus.add_argument("--resume", action="store_true", help="keep the rows already in --output, answer the rest")
    corpus.add_argument("--no-progress", action="store_true", help="no progress bars")
    corpus.add_argument("--focus", choices=("llm", "dpe"), default=None,
                        help="focus every row on the part of its video the question needs (the engines then decode "
                             "the videos themselves)")
    add_model_args(corpus)


def run_corpus_command(args: argparse.Namespace) -> int:
    try:
        from .job import CorpusJob
        from .pipeline import run_corpus
    except ImportError as error:
        print(f"dynfocus-infer: error: corpus needs Ray Data: pip install 'dynfocus-infer[distributed]' ({error})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from ..sampling import SamplingParams

    engine_kwargs = dict(device=args.device, random_weights=args.random_weights,
                         visual_encoder=args.visual_encoder, max_batch_size=args.batch_size,
                         enable_prefix_caching=not args.no_prefix_caching)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    job = CorpusJob(model=args.model, engine_kwargs=engine_kwargs, num_frames=args.frames, fps=args.fps,
                    max_frames=args.max_frames, sampling=sampling, output_format=args.format, focus=args.focus)
    summary = run_corpus(args.input, args.output, job=job, address=args.address, num_gpus=args.num_gpus,
                         concurrency=args.concurrency, decode_cpus=args.decode_cpus, resume=args.resume,
                         batch_size=args.batch_size, progress=not args.no_progress)
    print(summary.report(), file=sys.stderr)
    return EXIT_OK

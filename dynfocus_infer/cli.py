"""`dynfocus-infer`: answer one question about a video, or run a JSONL batch. Exit codes: 0 ok, 2 bad input,
1 internal error."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from . import __version__
from .corpus.cli import add_corpus_parser, run_corpus_command
from .errors import DynFocusError
from .interrupts import Interrupted, InterruptGuard
from .synthetic.cli import add_generate_parser, run_generate
from .training.cli import add_pretrain_vit_parser, add_train_parser, run_pretrain_vit, run_train
from .evaluation.cli import add_eval_parser, run_eval

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits with 2 too; keep our wording consistent
        self.print_usage(sys.stderr)
        print(f"dynfocus-infer: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dynfocus-smol",
                        help="preset (dynfocus-smol: trained on synthetic shapes; dynfocus-smol-random, dynfocus-7b, "
                             "tiny; the SlowFocus family: slowfocus-7b, slowfocus-tiny) or checkpoint directory "
                             "(default: dynfocus-smol)")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None,
                        help="uniformly sampled frames per video (default: the model's; 12 for dynfocus-smol, as "
                             "trained, else 16)")
    frames.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="cap on frames with --fps (default: the most whose tokens fit the context)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--random-weights", action="store_true", help="dynfocus-7b and slowfocus-7b only: random weights (benchmarks)")
    parser.add_argument("--visual-encoder", default="dynfocus",
                        help="dynfocus (default) or a token-count baseline: full, pool-4x4, llama-vid, uniform-8, ...")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in full instead of reusing the K/V blocks of a prefix already computed")


def _add_focus_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--focus", choices=("llm", "dpe"), default=None,
                        help=f"focus on the part of the video the question needs ({what}): llm = a grounding pass "
                             "then the answer over added dense frames (about 2x the LLM work); dpe = one pass, the "
                             "segment from DynFocus's own events, its dense frames as keyframes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynfocus-infer", description="Answer questions about videos with DynFocus.")
    parser.add_argument("--version", action="version", version=f"dynfocus-infer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    answer = commands.add_parser("answer", help="answer one question about one video")
    answer.add_argument("--video", help="video file (omit for a text-only question)")
    answer.add_argument("--question", required=True)
    answer.add_argument("--json", action="store_true", help="print the whole output as JSON")
    _add_focus_arg(answer, "default: none")
    _add_model_args(answer)
    batch = commands.add_parser("batch", help="answer a JSONL file of requests")
    batch.add_argument("--input", required=True,
                       help='JSONL, one request per line: {"id", "question", "video", "num_frames" | "fps"}; '
                            "a relative video path is read from the JSONL's folder")
    batch.add_argument("--output", required=True,
                       help="JSONL results, one line per request line, in order, each written as it finishes "
                            "(blank lines are skipped); '-' for standard output")
    batch.add_argument("--resume", action="store_true",
                       help="append to --output, skipping the requests whose ids it already holds")
    batch.add_argument("--batch-size", type=int, default=8)
    _add_focus_arg(batch, 'for every line without its own "focus" key; default: none')
    _add_model_args(batch)
    from .server.cli import add_serve_parser
    add_serve_parser(commands)
    add_corpus_parser(commands, _add_model_args)
    add_generate_parser(commands)
    add_train_parser(commands)
    add_pretrain_vit_parser(commands)
    add_eval_parser(commands)
    return parser


def _engine(args, max_batch_size: int = 8):
    from .engine import LLM

    return LLM(args.model, device=args.device, num_frames=args.frames if args.fps is None else None,
               fps=args.fps, max_frames=args.max_frames, max_batch_size=max_batch_size,
               random_weights=args.random_weights, visual_encoder=args.visual_encoder,
               enable_prefix_caching=not args.no_prefix_caching)


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _print_answer(output) -> None:
    print(output.text.strip())
    t = output.tokens
    saved = f" ({t.full_visual_tokens / t.visual_tokens:.1f}x fewer)" if t.visual_tokens else ""
    print(f"\ntokens: {t.frames} frames, {t.keyframes} keyframes, {t.visual_tokens} visual tokens vs "
          f"{t.full_visual_tokens} full{saved}; prompt {t.prompt_tokens}, generated {t.generated_tokens}")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in output.timings_ms.items()))
    if output.focus is not None:
        f = output.focus
        spans = ", ".join(f"{start:.3f}-{end:.3f}" for start, end in f.segments) or "none"
        print(f"focus ({f.mode}): {f.status}{f' ({f.reason})' if f.reason else ''}, segments {spans}, "
              f"{len(f.dense_frames)} dense frames; extra: {f.frames_decoded} decoded, {f.frames_encoded} encoded, "
              f"{f.extra_tokens} tokens")
    if output.notice:
        print(f"note: {output.notice}")


def _answer(args) -> int:
    from .outputs import Request
    from .request_checks import check_model_options, check_video_path

    sampling = _sampling(args)  # everything the model is not needed for is checked before it loads
    check_model_options(args)
    request = Request(question=args.question, video=None if args.video is None else check_video_path(args.video),
                      focus=args.focus)
    with InterruptGuard():
        output = _engine(args).generate([request], sampling)[0]
    if args.json:
        print(json.dumps(output.to_dict(), indent=2))
    elif output.ok:
        _print_answer(output)
    if not output.ok:
        print(f"dynfocus-infer: error: {output.error}", file=sys.stderr)
        return EXIT_INTERNAL if output.error.startswith("internal error") else EXIT_BAD_INPUT
    return EXIT_OK


def _batch(args) -> int:
    from .batch import run_batch
    from .request_checks import check_model_options

    if not os.path.isfile(args.input):
        why = "is not a regular file" if os.path.exists(args.input) else "does not exist"
        print(f"dynfocus-infer: error: input {args.input!r} {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.batch_size < 1:
        print("dynfocus-infer: error: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    sampling = _sampling(args)
    check_model_options(args)
    return run_batch(args, _engine, sampling)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from .server.cli import run_serve
            return run_serve(args)
        if args.command == "corpus":
            return run_corpus_command(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "pretrain-vit":
            return run_pretrain_vit(args)
        if args.command == "eval":
            return run_eval(args)
        return _answer(args) if args.command == "answer" else _batch(args)
    except Interrupted as stop:
        print(f"\ndynfocus-infer: interrupted by {stop}", file=sys.stderr)
        return stop.exit_code
    except DynFocusError as error:
        print(f"dynfocus-infer: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - the exit code tells scripts it was our fault, not theirs
        print(f"dynfocus-infer: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

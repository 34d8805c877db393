"""`dynfocus-infer`: answer one question about a video, or run a JSONL batch. Exit codes: 0 ok, 2 bad input,
1 internal error."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

from .corpus.cli import add_corpus_parser, run_corpus_command
from .errors import DynFocusError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits with 2 too; keep our wording consistent
        self.print_usage(sys.stderr)
        print(f"dynfocus-infer: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dynfocus-smol",
                        help="preset (dynfocus-smol, dynfocus-7b, tiny) or checkpoint directory (default: dynfocus-smol)")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="uniformly sampled frames per video (default 16)")
    frames.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="cap on frames with --fps (default: the most whose tokens fit the context)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--random-weights", action="store_true", help="dynfocus-7b only: random weights (benchmarks)")
    parser.add_argument("--visual-encoder", default="dynfocus",
                        help="dynfocus (default) or a token-count baseline: full, pool-4x4, llama-vid, uniform-8, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynfocus-infer", description="Answer questions about videos with DynFocus.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    answer = commands.add_parser("answer", help="answer one question about one video")
    answer.add_argument("--video", help="video file (omit for a text-only question)")
    answer.add_argument("--question", required=True)
    answer.add_argument("--json", action="store_true", help="print the whole output as JSON")
    _add_model_args(answer)
    batch = commands.add_parser("batch", help="answer a JSONL file of requests")
    batch.add_argument("--input", required=True, help='JSONL: {"question": ..., "video": ..., "id": ...} per line')
    batch.add_argument("--output", required=True,
                       help="JSONL results, one line per request line, in order (blank lines are skipped)")
    batch.add_argument("--batch-size", type=int, default=8)
    _add_model_args(batch)
    add_corpus_parser(commands, _add_model_args)
    return parser


def _engine(args, max_batch_size: int = 8):
    from .engine import LLM

    return LLM(args.model, device=args.device, num_frames=args.frames if args.fps is None else None,
               fps=args.fps, max_frames=args.max_frames, max_batch_size=max_batch_size,
               random_weights=args.random_weights, visual_encoder=args.visual_encoder)


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
    if output.notice:
        print(f"note: {output.notice}")


def _answer(args) -> int:
    if args.video is not None and not os.path.exists(args.video):
        print(f"dynfocus-infer: error: video {args.video!r} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    sampling = _sampling(args)
    llm = _engine(args)
    from .outputs import Request

    output = llm.generate([Request(question=args.question, video=args.video)], sampling)[0]
    if args.json:
        print(json.dumps(output.to_dict(), indent=2))
    elif output.ok:
        _print_answer(output)
    if not output.ok:
        print(f"dynfocus-infer: error: {output.error}", file=sys.stderr)
        return EXIT_INTERNAL if output.error.startswith("internal error") else EXIT_BAD_INPUT
    return EXIT_OK


def _read_requests(path: str) -> list:
    """(line number, request dict or the error that line gets as its result) for each non-blank line."""
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError("a line must hold a JSON object")
                items.append((number, value))
            except ValueError as error:
                items.append((number, DynFocusError(f"line {number}: not a JSON request object ({error})")))
    return items


def _answer_lines(args, lines: list, sampling) -> list:
    """One result dict per request line, in order; a request without an id is named by its line number."""
    from .outputs import RequestOutput

    results = [RequestOutput(str(number), error=str(item)).to_dict() for number, item in lines]
    good = [i for i, (_, item) in enumerate(lines) if isinstance(item, dict)]
    requests = [item if "id" in item or "request_id" in item else {"id": str(number), **item}
                for number, item in (lines[i] for i in good)]
    if good:
        llm = _engine(args, args.batch_size)
        for i, output in zip(good, llm.generate(requests, sampling, progress=True)):
            results[i] = output.to_dict()
    return results


def _output_problem(output: str, input_path: str) -> Optional[str]:
    """Why the results cannot go to `output`, or None; checked without creating or truncating anything."""
    directory = os.path.dirname(os.path.abspath(output))
    if os.path.exists(output) and os.path.samefile(output, input_path):
        return "it is the input file"
    if os.path.isdir(output):
        return "it is a directory"
    if not os.path.isdir(directory):
        return f"its directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return "no permission to write it"
    return None


def _write_lines_atomically(path: str, lines: list) -> None:
    """All lines or nothing: a temporary file beside `path`, renamed over it once complete."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(os.path.abspath(path)),
                                         prefix=".dynfocus-", suffix=".jsonl", delete=False)
    try:
        with handle:
            handle.writelines(line + "\n" for line in lines)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def _batch(args) -> int:
    if not os.path.isfile(args.input):
        print(f"dynfocus-infer: error: input {args.input!r} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.batch_size < 1:
        print("dynfocus-infer: error: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = _output_problem(args.output, args.input)
    if problem:  # found before any work, and an existing output is left as it is
        print(f"dynfocus-infer: error: --output {args.output!r}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        lines = _read_requests(args.input)
    except UnicodeDecodeError as error:
        print(f"dynfocus-infer: error: input {args.input!r} is not UTF-8 text ({error.reason})", file=sys.stderr)
        return EXIT_BAD_INPUT
    sampling = _sampling(args)
    from .presets import check_device

    check_device(args.device)
    results = _answer_lines(args, lines, sampling)
    _write_lines_atomically(args.output, [json.dumps(record) for record in results])
    failed = sum(r["error"] is not None for r in results)
    print(f"dynfocus-infer: {len(results) - failed} answered, {failed} failed -> {args.output}", file=sys.stderr)
    return EXIT_OK


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "corpus":
            return run_corpus_command(args)
        return _answer(args) if args.command == "answer" else _batch(args)
    except DynFocusError as error:
        print(f"dynfocus-infer: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - the exit code tells scripts it was our fault, not theirs
        print(f"dynfocus-infer: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

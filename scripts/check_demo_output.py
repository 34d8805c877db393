"""Checks what `bash scripts/demo.sh` printed: an answer, then its token accounting and timings (used by .ci/run and
tests/test_demo.py); with --expect assets/sample.json also that the answer is right (scored as the evaluation scores
it: a description must name every shape by colour and shape). Exits 1 naming what is wrong.

    python scripts/check_demo_output.py OUTPUT [--expect assets/sample.json]
"""
import argparse
import json
import re
import sys

ACCOUNTING = re.compile(r"^tokens: (\d+) frames, (\d+) keyframes, (\d+) visual tokens vs (\d+) full")


def problems(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    found = []
    accounting = [m for m in map(ACCOUNTING.match, lines) if m]
    if not accounting:
        return ["no token accounting line ('tokens: N frames, K keyframes, V visual tokens vs F full')"]
    frames, keyframes, visual, full = map(int, accounting[0].groups())
    if not (frames >= 1 and 0 <= keyframes <= frames and 1 <= visual < full):
        found.append(f"implausible accounting: {accounting[0].group(0)!r}")
    if lines.index(accounting[0].string) == 0:
        found.append("no answer before the token accounting")
    if not any(line.startswith("timings (ms): ") for line in lines):
        found.append("no timings line")
    return found


def answer_of(text: str) -> str:
    """The answer: what the demo printed before its token accounting, after the set-up's own lines ("setup: ...")."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if ACCOUNTING.match(line)), len(lines))
    start = max((i + 1 for i, line in enumerate(lines[:end]) if line.startswith("setup: ")), default=0)
    return "\n".join(lines[start:end]).strip()


def wrong_answer(text: str, expected: dict) -> list[str]:
    """[] when the answer is right for assets/sample.json's question (`expected`), else what is wrong."""
    from dynfocus_infer.evaluation.scoring import is_correct

    answer = answer_of(text)
    kind = "describe" if expected["question"] == "Describe the video." else "word"
    if is_correct(kind, answer, expected["answer"], expected["scene"]["shapes"]):
        return []
    return [f"wrong answer to {expected['question']!r}: {answer!r} (expected {expected['answer']!r})"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="what the demo printed")
    parser.add_argument("--expect", default=None, help="assets/sample.json: also check the answer")
    args = parser.parse_args(argv)
    with open(args.output, encoding="utf-8") as f:
        text = f.read()
    found = problems(text)
    if args.expect:
        with open(args.expect, encoding="utf-8") as f:
            found += wrong_answer(text, json.load(f))
    for problem in found:
        print(f"check_demo_output: {args.output}: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

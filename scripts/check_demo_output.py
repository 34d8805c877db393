"""Checks what `bash scripts/demo.sh` printed: an answer, then its token accounting and timings (used by .ci/run and
tests/test_demo.py). Exits 1 naming what is missing."""
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


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        found = problems(f.read())
    for problem in found:
        print(f"check_demo_output: {path}: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

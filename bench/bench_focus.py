"""The cost of focus inference (DESIGN.md 13): one question about one video, plain vs focus="llm" (SlowFocus's two
passes) vs focus="dpe" (one pass, DynFocus's events as the grounding), with the extra frames decoded and encoded, the
extra tokens and the latency each mode adds; for the DynFocus model and for the SlowFocus model (plain and llm: its
own tokens, 65 a frame, its pass 2 mixing the sparse and dense frames).

The weights are random (no DynFocus or SlowFocus checkpoint is published), so a grounding answer would be noise: the
llm rows force pass 1's answer to GROUNDING (its decode still runs, GROUNDING_TOKENS tokens), and every row says so.

    python bench/bench_focus.py --record      # GPU: dynfocus-7b and slowfocus-7b, random weights, bf16 (focus.csv)
    python bench/bench_focus.py --smoke       # tiny and slowfocus-tiny, quick, records nothing (default on a CPU)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import append_csv, device_name, format_table, git_commit, record_allowed, utc_date  # noqa: E402

GROUNDING = "from 40 to 60"
MODES = {"dynfocus": ("plain", "llm", "dpe"), "slowfocus": ("plain", "llm")}   # dpe needs DynFocus's events
COLUMNS = ["model", "mode", "frames", "dense", "status", "extra_decoded", "extra_encoded", "extra_tokens", "prompt_tokens",
           "ttft_ms", "total_ms", "total_vs_plain"]


def run(llm, mode: str, video: np.ndarray, num_frames: int, answer_tokens: int, repeats: int) -> dict:
    from dynfocus_infer.outputs import Request
    from dynfocus_infer.sampling import SamplingParams

    request = Request("What happens in the middle of this video?", video, num_frames=num_frames,
                      focus=None if mode == "plain" else mode)
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
    llm.generate([request], params)                          # warm-up: kernels compiled, caches allocated
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([request], params)[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e3
        if not out.ok:
            raise RuntimeError(f"{mode}: {out.error}")
        if best is None or total < best[0]:
            best = (total, out)
    total, out = best
    focus = out.focus
    return dict(model=llm.loaded.name, mode=mode, frames=num_frames, dense=len(focus.dense_frames) if focus else 0,
                status=(focus.status if focus else "-"), extra_decoded=focus.frames_decoded if focus else 0,
                extra_encoded=focus.frames_encoded if focus else 0, extra_tokens=focus.extra_tokens if focus else 0,
                prompt_tokens=out.tokens.prompt_tokens, ttft_ms=round(out.timings_ms["time_to_first_token"], 2),
                total_ms=round(total, 2))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, quick (the default on a CPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/focus.csv")
    parser.add_argument("--frames", type=int, default=64, help="sparse frames of the video (GPU run)")
    parser.add_argument("--dense", type=int, default=20, help="dense frames of the segment (SlowFocus: 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", choices=tuple(MODES), default=list(MODES))
    args = parser.parse_args(argv)

    from dynfocus_infer.core.focus_stage import FocusStage

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    real_grounding = FocusStage.__dict__["_grounding_text"]
    FocusStage._grounding_text = staticmethod(lambda state: GROUNDING)      # random weights: see the docstring
    try:
        return _measure(args, device, smoke)
    finally:
        FocusStage._grounding_text = real_grounding


def _measure(args, device: torch.device, smoke: bool) -> list[dict]:
    from dynfocus_infer.engine import LLM

    frames, answer, repeats = (8, 4, 1) if smoke else (args.frames, 32, args.repeats)
    # A source video 4x longer than the sparse sampling, so the segment's dense frames are new frames.
    video = np.random.default_rng(0).integers(0, 256, (4 * frames, 240, 320, 3), dtype=np.uint8)
    rows = []
    for family in args.families:
        # Prefix caching off: each run repeats the warm-up's request, and is to be measured cold.
        if smoke:
            llm = LLM("tiny" if family == "dynfocus" else "slowfocus-tiny", cluster_backend="reference",
                      focus_config={"dense_frames": 4}, enable_prefix_caching=False)
        else:
            llm = LLM(f"{family}-7b", random_weights=True, focus_config={"dense_frames": args.dense},
                      enable_prefix_caching=False)
        mine = [run(llm, mode, video, frames, answer, repeats) for mode in MODES[family]]
        for row in mine:
            row["total_vs_plain"] = round(row["total_ms"] / mine[0]["total_ms"], 2)
        rows += mine
        print(f"device: {device_name(device)}; model: {llm.loaded.name} (random weights); llm rows: pass 1's "
              f"answer forced to {GROUNDING!r}; note: {llm.notice}")
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()   # one 7B model at a time
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(), grounding=GROUNDING)
        print(f"appended {len(rows)} rows to {append_csv('focus', [{**meta, **row} for row in rows])}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

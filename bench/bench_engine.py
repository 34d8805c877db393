"""The whole engine, end to end: per-stage latency of one question about a 200-frame and a 16-frame video, time to
first token against its floors, and videos/s over many videos with decoding overlapped (DESIGN.md 8, issue 6).

    python bench/bench_engine.py               # GPU: dynfocus-7b shapes with random weights (bf16)
    python bench/bench_engine.py --record      # also appends rows to bench/results/engine.csv
    python bench/bench_engine.py --smoke       # tiny preset (the default on a CPU), records nothing

Floors: the ViT floor is frames x FLOPs per frame / the measured bf16 matmul rate; the prefill floor is the prompt's
FLOPs / that rate; TTFT is compared with their sum (file decoding excluded: the latency cases pass decoded frames).
The throughput case writes real video files (PyAV) when it can and decodes them on the engine's thread pool;
without PyAV it passes frames in memory and says so in its row.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_models import llama_prefill_flops, vit_flops_per_frame  # noqa: E402
from ceilings import measure_ceilings  # noqa: E402
from common import append_csv, device_name, format_table, git_commit, record_allowed, utc_date  # noqa: E402
from dynfocus_infer.engine import LLM  # noqa: E402
from dynfocus_infer.outputs import Request  # noqa: E402
from dynfocus_infer.sampling import SamplingParams  # noqa: E402

STAGES = ["preprocess", "vit", "qformer", "connector", "prefill", "time_to_first_token", "decode_steps"]
COLUMNS = ["case", "frames", "videos", "source", *STAGES, "ttft_floor_ms", "ttft_over_floor", "videos_per_s"]
QUESTION = "What happens in this video?"


def random_frames(num_frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 240, 320, 3), dtype=np.uint8)


def video_files(count: int, num_frames: int, directory: str):
    """Paths of `count` synthetic videos, or None when PyAV is missing (the device image has none)."""
    try:
        from dynfocus_infer.video import write_test_video
        paths = [os.path.join(directory, f"v{i}.mp4") for i in range(count)]
        for i, path in enumerate(paths):
            write_test_video(path, num_frames=num_frames, fps=8, num_scenes=2 + i % 3)
        return paths
    except ImportError:
        return None


def latency_row(llm: LLM, num_frames: int, ceilings: dict, answer_tokens: int) -> dict:
    request = Request(QUESTION, random_frames(num_frames, seed=num_frames), num_frames=num_frames)
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
    llm.generate([request], params)                     # warm-up: kernels compiled, caches allocated
    out = llm.generate([request], params)[0]
    if not out.ok:
        raise RuntimeError(out.error)
    config = llm.model.config
    rate = ceilings["matmul_tflops"] * 1e12
    floor_ms = 1e3 * (num_frames * vit_flops_per_frame(config.vit)
                      + llama_prefill_flops(config.llm, out.tokens.prompt_tokens)) / rate
    row = dict(case="latency", frames=num_frames, videos=1, source="memory",
               **{stage: out.timings_ms.get(stage, float("nan")) for stage in STAGES})
    row.update(ttft_floor_ms=floor_ms, ttft_over_floor=out.timings_ms["time_to_first_token"] / floor_ms,
               videos_per_s=float("nan"))
    return row


def throughput_row(llm: LLM, count: int, num_frames: int, answer_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        paths = video_files(count, num_frames, directory)
        sources = paths or [random_frames(num_frames, seed=i) for i in range(count)]
        requests = [Request(QUESTION, source, num_frames=num_frames) for source in sources]
        params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
        llm.features.capacity = 0                      # every video decoded and encoded, no cache hits
        start = time.perf_counter()
        outputs = llm.generate(requests, params)
        seconds = time.perf_counter() - start
    failed = [o.error for o in outputs if not o.ok]
    if failed:
        raise RuntimeError(failed[0])
    row = dict(case="throughput", frames=num_frames, videos=count, source="files" if paths else "memory",
               **{stage: float("nan") for stage in STAGES})
    row.update(ttft_floor_ms=float("nan"), ttft_over_floor=float("nan"), videos_per_s=count / seconds)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, quick (the default on a CPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/engine.csv")
    parser.add_argument("--videos", type=int, default=64, help="videos in the throughput case")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    if smoke:
        llm = LLM("tiny", max_batch_size=4, cluster_backend="reference")
        frames, count, answer = (8, 4), 4, 4
    else:
        llm = LLM("dynfocus-7b", random_weights=True, max_batch_size=args.batch_size)
        frames, count, answer = (200, 16), args.videos, 32
    ceilings = measure_ceilings(device)
    rows = [latency_row(llm, t, ceilings, answer) for t in frames]
    rows.append(throughput_row(llm, count, 16 if not smoke else 6, answer))
    print(f"device: {device_name(device)}; model: {llm.loaded.name}; note: {llm.notice}")
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(),
                    ceiling_tflops=round(ceilings["matmul_tflops"], 1))
        print(f"appended {len(rows)} rows to {append_csv('engine', [{**meta, **row} for row in rows])}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

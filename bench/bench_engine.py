"""The whole engine, end to end: per-stage latency of one question about a 200-frame and a 16-frame video, time to
first token against its floors, and videos/s over many videos with decoding overlapped (DESIGN.md 8, issue 6);
continuous batching under Poisson arrivals with mixed video lengths (generated tokens/s, requests/s); n = 4
sampled answers per video with prefix caching on and off (the same tokens both ways); decode
ms/token at batch 1, 8, 32 against the weight-bandwidth floor, eager and CUDA-graph rows (DESIGN.md 10).

    python bench/bench_engine.py               # GPU: dynfocus-7b shapes with random weights (bf16)
    python bench/bench_engine.py --record      # also appends rows to bench/results/engine.csv
    python bench/bench_engine.py --smoke       # tiny preset, quick, records nothing
    python bench/bench_engine.py --cpu         # CPU: tiny for the video cases, real SmolLM2-135M for decode,
                                               # beside transformers' generate on the same weights

Decode floor: every weight byte and the batch's KV bytes read once per step at the measured copy bandwidth.

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
SERVING_COLUMNS = ["case", "model", "mode", "batch", "requests", "tokens_per_s", "requests_per_s",
                   "mean_ttft_ms", "ms_per_token", "floor_ms", "over_floor", "preemptions"]
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
    llm.engine.blocks.reset_prefix_cache()              # else the warm-up's K/V would be the measured prefill
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


def timed_generate(llm: LLM, requests: list, params: SamplingParams) -> tuple[list, float]:
    """llm.generate's outputs and its wall seconds; the first failed request's error raised."""
    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    seconds = time.perf_counter() - start
    failed = [o.error for o in outputs if not o.ok]
    if failed:
        raise RuntimeError(failed[0])
    return outputs, seconds


def throughput_row(llm: LLM, count: int, num_frames: int, answer_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        paths = video_files(count, num_frames, directory)
        sources = paths or [random_frames(num_frames, seed=i) for i in range(count)]
        requests = [Request(QUESTION, source, num_frames=num_frames) for source in sources]
        params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
        llm.features.capacity = 0                      # every video decoded and encoded, no cache hits
        _, seconds = timed_generate(llm, requests, params)
    row = dict(case="throughput", frames=num_frames, videos=count, source="files" if paths else "memory",
               **{stage: float("nan") for stage in STAGES})
    row.update(ttft_floor_ms=float("nan"), ttft_over_floor=float("nan"), videos_per_s=count / seconds)
    return row


def poisson_row(llm: LLM, count: int, rate_per_s: float, frame_choices: tuple, answer_tokens: int,
                seed: int = 0) -> dict:
    """Requests arrive as a Poisson process (exponential gaps at rate_per_s) with videos of mixed lengths; the
    engine admits each at the first step after its arrival. Throughput over the whole run, wall clock."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, count))
    requests = [Request(QUESTION, random_frames(int(f), seed=100 + i), num_frames=int(f))
                for i, f in enumerate(rng.choice(frame_choices, count))]
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
    engine, finals, added = llm.engine, {}, 0
    preemptions = engine.scheduler.num_preemptions
    start = time.perf_counter()
    while len(finals) < count:
        now = time.perf_counter() - start
        while added < count and arrivals[added] <= now:
            engine.add_request(f"poisson-{added}", requests[added], params)
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(arrivals[added] - now, 0.05)))
            continue
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    seconds = time.perf_counter() - start
    failed = [o.error for o in finals.values() if not o.ok]
    if failed:
        raise RuntimeError(failed[0])
    tokens = sum(len(o.token_ids) for o in finals.values())
    return dict(case="poisson", model=llm.loaded.name, mode="eager", batch=float("nan"), requests=count,
                tokens_per_s=tokens / seconds, requests_per_s=count / seconds,
                mean_ttft_ms=float(np.mean([o.timings_ms["time_to_first_token"] for o in finals.values()])),
                ms_per_token=float("nan"), floor_ms=float("nan"), over_floor=float("nan"),
                preemptions=engine.scheduler.num_preemptions - preemptions)


def shared_prefix_rows(llm: LLM, count: int, num_frames: int, samples: int, answer_tokens: int) -> list[dict]:
    """`count` videos, `samples` sampled answers each (n): with prefix caching the samples of a request compute their
    common prompt once; without it, each computes all of it. Same requests, same seeds, both ways (the feature cache
    off, so both decode and encode every video)."""
    requests = [Request(QUESTION, random_frames(num_frames, seed=300 + i), num_frames=num_frames) for i in range(count)]
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True, n=samples, temperature=0.8, seed=7)
    blocks, capacity = llm.engine.blocks, llm.features.capacity
    llm.features.capacity = 0
    rows, texts = [], []
    for mode in ("prefix-cache", "no-prefix-cache"):
        blocks.reset_prefix_cache()
        blocks.enable_prefix_caching = mode == "prefix-cache"
        outputs, seconds = timed_generate(llm, requests, params)
        texts.append([[c.token_ids for c in o.outputs] for o in outputs])
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        rows.append(dict(case="shared-prefix", model=llm.loaded.name, mode=mode, batch=samples, requests=count,
                         tokens_per_s=tokens / seconds, requests_per_s=count / seconds,
                         mean_ttft_ms=float(np.mean([o.timings_ms["time_to_first_token"] for o in outputs])),
                         ms_per_token=float("nan"), floor_ms=float("nan"), over_floor=float("nan"), preemptions=0))
    blocks.enable_prefix_caching, llm.features.capacity = True, capacity
    differ = sum(a != b for x, y in zip(*texts) for a, b in zip(x, y))
    if differ and llm.device.type == "cpu":   # fp32 here: the same tokens both ways, or a bug
        raise RuntimeError(f"shared-prefix: {differ} answers differ with and without prefix caching")
    if differ:   # bf16: the two ways run other GEMM shapes, which may flip a sampled token
        print(f"shared-prefix: {differ} of {count * samples} answers differ with and without prefix caching (bf16)")
    return rows


def weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.model.llm.parameters())


def decode_row(llm: LLM, batch: int, ceilings: dict, answer_tokens: int, mode: str) -> dict:
    """Median wall time of the decode-only steps of `batch` text requests decoding together."""
    engine = llm.engine
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"decode-{batch}-{i}", f"Question number {i}: say something long.", params)
    step_ms, prompt = [], 0
    while engine.has_unfinished_requests():
        decoding = all(s.num_computed > 0 for s in engine.scheduler.running) and not engine.scheduler.waiting
        start = time.perf_counter()
        outputs = engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        if decoding and len(engine.scheduler.running) == batch:
            step_ms.append((time.perf_counter() - start) * 1e3)
        prompt = max([prompt] + [o.tokens.prompt_tokens for o in outputs])
    ms = float(np.median(step_ms))
    kv = batch * (prompt + answer_tokens // 2) * engine.cache.nbytes // (engine.cache.num_blocks * engine.cache.block_size)
    floor_ms = (weight_bytes(llm) + kv) / (ceilings["copy_gbps"] * 1e9) * 1e3
    return dict(case="decode", model=llm.loaded.name, mode=mode, batch=batch, requests=batch,
                tokens_per_s=batch * 1e3 / ms, requests_per_s=float("nan"), mean_ttft_ms=float("nan"),
                ms_per_token=ms, floor_ms=floor_ms, over_floor=ms / floor_ms, preemptions=0)


def transformers_row(answer_tokens: int, ceilings: dict, batch: int = 1) -> dict:
    """transformers' generate (greedy, static batch) on the same SmolLM2 weights, for the side-by-side row."""
    from transformers import AutoModelForCausalLM

    from dynfocus_infer.models.smollm2 import load_smollm2_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    tokenizer = load_smollm2_tokenizer()
    ids = tokenizer(["Question number 0: say something long."] * batch, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    ms = (seconds - prefill) * 1e3 / (answer_tokens - 1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = weights / (ceilings["copy_gbps"] * 1e9) * 1e3
    return dict(case="decode", model="transformers-smollm2", mode="hf-generate", batch=batch, requests=batch,
                tokens_per_s=batch * 1e3 / ms, requests_per_s=float("nan"), mean_ttft_ms=float("nan"),
                ms_per_token=ms, floor_ms=floor_ms, over_floor=ms / floor_ms, preemptions=0)


def serving_rows(args, device: torch.device, smoke: bool, ceilings: dict, video_llm: LLM) -> list[dict]:
    if smoke:
        rows = [poisson_row(video_llm, 6, rate_per_s=20.0, frame_choices=(4, 8), answer_tokens=8)]
        rows += shared_prefix_rows(video_llm, 3, 6, 4, 4)
        return rows + [decode_row(video_llm, b, ceilings, 12, "eager") for b in (1, 4)]
    rows = [poisson_row(video_llm, args.poisson_requests, args.poisson_rate, (8, 16, 32) if args.cpu else
                        (16, 64, 200), 32)]
    rows += shared_prefix_rows(video_llm, 8 if args.cpu else 16, 16 if args.cpu else 64, 4, 32)
    batches = (1, 8, 32)
    if args.cpu:
        text_llm = LLM("smollm2-135m-instruct", cluster_backend="reference", max_num_seqs=32)
        rows += [decode_row(text_llm, b, ceilings, 32, "eager") for b in batches]
        rows.append(transformers_row(32, ceilings))
        return rows
    runner = video_llm.engine.runner
    graphs = runner.graphs
    for mode in ("eager", "graph"):  # one model: the eager rows run with its graphs set aside
        runner.graphs = graphs if mode == "graph" else None
        if mode == "graph" and graphs is None:
            continue
        rows += [decode_row(video_llm, b, ceilings, 64, mode) for b in batches]
    runner.graphs = graphs
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, quick (the default on a CPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/engine.csv")
    parser.add_argument("--videos", type=int, default=64, help="videos in the throughput case")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="CPU run with SmolLM2 decode rows beside transformers")
    parser.add_argument("--poisson-requests", type=int, default=24)
    parser.add_argument("--poisson-rate", type=float, default=4.0, help="mean arrivals per second")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or (device.type != "cuda" and not args.cpu)
    if smoke or args.cpu:
        llm = LLM("tiny", max_batch_size=4 if smoke else 32, cluster_backend="reference")
        frames, count, answer = (8, 4), 4, 4
    else:
        llm = LLM("dynfocus-7b", random_weights=True, max_batch_size=max(args.batch_size, 32))
        frames, count, answer = (200, 16), args.videos, 32
    ceilings = measure_ceilings(device)
    rows = [latency_row(llm, t, ceilings, answer) for t in frames]
    rows.append(throughput_row(llm, count, 16 if not smoke else 6, answer))
    serving = serving_rows(args, device, smoke, ceilings, llm)
    print(f"device: {device_name(device)}; model: {llm.loaded.name}; note: {llm.notice}")
    print(format_table(rows, COLUMNS))
    print(format_table(serving, SERVING_COLUMNS))
    if args.record and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(),
                    ceiling_tflops=round(ceilings["matmul_tflops"], 1))
        print(f"appended {len(rows)} rows to {append_csv('engine', [{**meta, **row} for row in rows])}")
        meta["copy_gbps"] = round(ceilings["copy_gbps"], 1)
        print(f"appended {len(serving)} rows to "
              f"{append_csv('engine_serving', [{**meta, **row} for row in serving])}")
    return rows + serving


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

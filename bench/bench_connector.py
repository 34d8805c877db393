"""DynFocus connector (DESIGN.md section 5): the fused ragged-batch forward vs the frame-by-frame reference connector.

    python bench/bench_connector.py              # GPU: paper widths (C = 1408, llm 4096), random weights
    python bench/bench_connector.py --record     # also appends rows to bench/results/connector.csv
    python bench/bench_connector.py --smoke      # tiny widths (CPU: the Triton interpreter), a smoke run

Cases: one 200-frame video, and 16 videos x 64 frames. Both implementations share one set of parameters and
run in the same process; before timing, token counts must agree exactly and keyframe agreement is reported
(near-tied scores may order differently under different rounding). Reported: median ms (fused; on CUDA also the
same call replayed from its CUDA graph, core/connector_graphs.py), the reference/fused ratio, frames/s, emitted
tokens, peak memory above the inputs (CUDA), and the fused call's Triton launches and other PyTorch operators
(bench/count_ops.py: all dispatcher calls, and work_ops, those that may launch device work; issue 12's target: at
most 12 launches and 60 work ops, whatever the batch).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from count_ops import count_calls  # noqa: E402
from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date  # noqa: E402
from dynfocus_infer.config import ConnectorConfig  # noqa: E402
from dynfocus_infer.core.connector_graphs import ConnectorGraphs  # noqa: E402
from dynfocus_infer.models.connector import DynFocusConnector  # noqa: E402
from dynfocus_infer.models.connector_reference import reference_connector  # noqa: E402

COLUMNS = ["case", "dtype", "ms_fused", "ms_graph", "ms_reference", "speedup", "frames_per_s", "tokens",
           "keyframes_match", "peak_mb", "launches", "ops", "work_ops"]
PAPER_CASES = (("1x200", [200]), ("16x64", [64] * 16))
SMOKE_CASES = (("1x6", [6]), ("2x3", [3, 3]))
SMOKE_WIDTHS = dict(vision_width=32, llm_width=48, qformer_width=16, patch_grid=8)


def make_inputs(frames, config, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(frames)
    patches = torch.randn(total, config.patch_grid ** 2, config.vision_width, generator=g)
    q_emb = torch.randn(total, config.num_queries, config.vision_width, generator=g)
    return patches.to(device, dtype), q_emb.to(device, dtype)


def keyframe_agreement(out, expected) -> float:
    same = sum(out.keyframes[b][out.keyframes[b] >= 0].tolist() == ref.keyframes for b, ref in enumerate(expected))
    return same / len(expected)


def peak_memory_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(name, frames, connector, dtype, device, repeats) -> dict:
    patches, q_emb = make_inputs(frames, connector.config, dtype, device)

    def fused():
        return connector(patches, q_emb, frames, check=False)

    def reference():
        return reference_connector(connector, patches, q_emb, frames)

    with torch.no_grad():
        out, expected = fused(), reference()
        counts = [ref.tokens.shape[0] for ref in expected]
        if list(out.num_tokens) != counts:
            raise AssertionError(f"{name}: token counts differ: fused {out.num_tokens}, reference {counts}")
        ms_fused = time_ms(fused, device, warmup=1, repeats=repeats, calls_per_repeat=1)
        ms_reference = time_ms(reference, device, warmup=0, repeats=max(1, repeats // 3), calls_per_repeat=1)
        peak = peak_memory_mb(fused, device)
        calls = count_calls(fused)[1]
        ms_graph = float("nan")
        if device.type == "cuda":  # the same call replayed from its (videos, frames) bucket's CUDA graph
            graphs = ConnectorGraphs(connector, max_videos=len(frames), max_frames=max(frames))

            def replay():
                return graphs(patches, q_emb, frames)

            replayed = replay()
            if replayed.num_tokens != out.num_tokens or graphs.disabled or graphs.replays != 1:
                raise AssertionError(f"{name}: the graph replay differs or failed: {graphs.disabled}")
            ms_graph = time_ms(replay, device, warmup=1, repeats=repeats, calls_per_repeat=1)
    return {
        "device": device_name(device), "commit": git_commit(), "date": utc_date(), "case": name,
        "shape": f"B{len(frames)}xT{max(frames)}xC{connector.config.vision_width}xD{connector.config.llm_width}",
        "dtype": str(dtype).replace("torch.", ""), "ms_fused": ms_fused, "ms_graph": ms_graph,
        "ms_reference": ms_reference,
        "speedup": ms_reference / ms_fused, "frames_per_s": sum(frames) / (ms_fused * 1e-3),
        "tokens": sum(out.num_tokens), "keyframes_match": keyframe_agreement(out, expected), "peak_mb": peak,
        "launches": calls.launches, "ops": calls.ops, "work_ops": calls.work_ops,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: float16 on CUDA (the official eval dtype), float32 on CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and videos (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/connector.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))

    torch.manual_seed(0)
    config = ConnectorConfig(**SMOKE_WIDTHS) if args.smoke else ConnectorConfig()
    connector = DynFocusConnector(config).to(device, dtype).eval()
    cases = SMOKE_CASES if args.smoke else PAPER_CASES
    rows = [run_case(name, frames, connector, dtype, device, args.repeats) for name, frames in cases]
    print(f"DynFocus connector on {device_name(device)} (commit {git_commit()})")
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, args.smoke):
        print(f"recorded to {append_csv('connector', rows)}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

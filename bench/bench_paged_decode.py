"""Decode attention over the paged KV cache: paged_decode (Triton, reads the blocks in place) against the SDPA
fallback (gathers each sequence's blocks into a padded batch, then SDPA), beside the floor of the bytes it must read.

Floor: live K/V rows + q + output, once, at the copy bandwidth measured in the same run (bench/ceilings.py).
Shapes: dynfocus-7b's heads (32 x 128, no GQA) and a GQA layout (32 query heads on 8 KV heads), bf16, blocks of 16,
batch 1 / 8 / 32, contexts 1,024 and 4,096 (every sequence at the full context: the worst case for the gather).

    python bench/bench_paged_decode.py --record          # GPU: appends rows to bench/results/paged_decode.csv
    python bench/bench_paged_decode.py --smoke           # CPU: tiny shapes through the Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ceilings import measure_ceilings  # noqa: E402
from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date  # noqa: E402

LAYOUTS = {"7b": (32, 32, 128), "gqa": (32, 8, 128)}
SMOKE_LAYOUTS = {"smoke": (4, 2, 32)}
COLUMNS = ["layout", "batch", "context", "paged_decode_ms", "sdpa_gather_ms", "floor_ms", "paged_vs_floor",
           "speedup_vs_gather"]


def make_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype,
                device):
    from dynfocus_infer.models.paged_cache import StepMetadata

    width = -(-context // block_size)
    pool = batch * width
    k_pool = torch.randn(pool, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_pool = torch.randn_like(k_pool)
    tables = torch.randperm(pool, device=device).to(torch.int32).view(batch, width)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
    rows = torch.arange(batch, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
    meta = StepMetadata(lens.to(torch.int64) - 1, rows, rows, cu, torch.cumsum(torch.cat([lens[:1] * 0, lens]), 0)
                        .to(torch.int32), lens, tables, rows, 1, context)
    return q, k_pool, v_pool, meta


def run_case(layout: str, batch: int, context: int, device, dtype, copy_gbps: float, repeats: int) -> dict:
    from dynfocus_infer.attention import sdpa_paged_attention
    from dynfocus_infer.paged_decode import paged_decode

    heads, kv_heads, head_dim = (LAYOUTS | SMOKE_LAYOUTS)[layout]
    q, k_pool, v_pool, meta = make_inputs(batch, context, heads, kv_heads, head_dim, 16, dtype, device)
    paged = lambda: paged_decode(q, k_pool, v_pool, meta.block_tables, meta.context_lens, context)  # noqa: E731
    gather = lambda: sdpa_paged_attention(q, k_pool, v_pool, meta)                                  # noqa: E731
    error = (paged().float() - gather().float()).abs().max().item()
    if error > 5e-2:
        raise AssertionError(f"{layout} B={batch} S={context}: paged_decode differs from SDPA by {error}")
    element = q.element_size()
    bytes_read = 2 * batch * context * kv_heads * head_dim * element + 2 * q.numel() * element
    floor = bytes_read / copy_gbps / 1e6
    paged_ms = time_ms(paged, device, repeats=repeats)
    gather_ms = time_ms(gather, device, repeats=repeats)
    return dict(layout=layout, batch=batch, context=context, paged_decode_ms=round(paged_ms, 4),
                sdpa_gather_ms=round(gather_ms, 4), floor_ms=round(floor, 4),
                paged_vs_floor=round(paged_ms / floor, 2), speedup_vs_gather=round(gather_ms / paged_ms, 2))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU through the Triton interpreter)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/paged_decode.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("a CPU run needs TRITON_INTERPRET=1 (set before Python starts) and --smoke")
        args.smoke = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_gbps = measure_ceilings(device)["copy_gbps"]
    cases = ([("smoke", b, s) for b in (1, 3) for s in (40, 100)] if args.smoke else
             [(layout, b, s) for layout in LAYOUTS for s in (1024, 4096) for b in (1, 8, 32)])
    rows = [run_case(layout, b, s, device, dtype, copy_gbps, 2 if args.smoke else args.repeats)
            for layout, b, s in cases]
    print(f"paged decode attention on {device_name(device)} (commit {git_commit()}), copy {copy_gbps:.0f} GB/s")
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, args.smoke):
        stamp = dict(device=device_name(device), commit=git_commit(), date=utc_date())
        print(f"recorded to {append_csv('paged_decode', [{**stamp, **row} for row in rows])}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

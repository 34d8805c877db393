"""Top-K mask builder (DESIGN.md section 7): the single csrc launch against the torch reference composition.

    python bench/bench_topk_mask.py                 # prints a table
    python bench/bench_topk_mask.py --record        # also appends rows to bench/results/topk_mask.csv

Each case is full-size and worst-case for its shape: every video has L prototypes with distinct centre frames
among T frames and keeps K = max(1, round(0.8 L)) (DESIGN.md section 5). Both paths run with check=False and
max_keep/max_frames given, as the connector calls them, so neither waits on the host. Outputs are compared
before timing. On a CPU this is a smoke run of the C++ twin; record GPU runs only.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date
from dynfocus_infer.ops import build_topk_mask, build_topk_mask_reference

DEFAULT_BATCH_SIZES = (1, 8, 64)
DEFAULT_SHAPES = ((25, 200), (200, 3600))  # (prototypes L, frames T)
TABLE_COLUMNS = ["shape", "ms_topk_mask", "ms_reference", "speedup", "gbps"]


def make_case(batch_size: int, num_protos: int, num_frames: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch_size, num_protos, generator=generator)
    centre_frames = torch.rand(batch_size, num_frames, generator=generator).argsort(dim=1)[:, :num_protos]
    counts = torch.full((batch_size,), num_protos, dtype=torch.int32)
    keep = torch.full((batch_size,), max(1, round(0.8 * num_protos)), dtype=torch.int32)
    frames = torch.full((batch_size,), num_frames, dtype=torch.int32)
    tensors = [scores, centre_frames.to(torch.int32), counts, keep, frames]
    return [t.to(device) for t in tensors]


def bytes_moved(batch_size: int, num_protos: int, num_keep: int, num_frames: int) -> int:
    """Compulsory global traffic of one call: inputs read once, outputs written once."""
    inputs = batch_size * (num_protos * (4 + 4) + 3 * 4)
    outputs = batch_size * (num_keep * 8 + num_frames * 1 + (num_frames + 1) * 8 + 8)
    return inputs + outputs


def run_case(batch_size: int, num_protos: int, num_frames: int, device: torch.device, repeats: int) -> dict:
    inputs = make_case(batch_size, num_protos, num_frames, device)
    num_keep = max(1, round(0.8 * num_protos))
    options = dict(max_keep=num_keep, max_frames=num_frames, check=False)
    built = build_topk_mask(*inputs, **options)
    expected = build_topk_mask_reference(*inputs, **options)
    for name, got, want in zip(expected._fields, built, expected):
        if not torch.equal(got, want):
            raise AssertionError(f"build_topk_mask disagrees with the reference on {name} for "
                                 f"B={batch_size} L={num_protos} T={num_frames}")
    ms_kernel = time_ms(lambda: build_topk_mask(*inputs, **options), device, repeats=repeats)
    ms_reference = time_ms(lambda: build_topk_mask_reference(*inputs, **options), device, repeats=repeats)
    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": utc_date(),
        "shape": f"B{batch_size}xL{num_protos}xT{num_frames}",
        "batch": batch_size,
        "protos": num_protos,
        "keep": num_keep,
        "frames": num_frames,
        "ms_topk_mask": ms_kernel,
        "ms_reference": ms_reference,
        "speedup": ms_reference / ms_kernel,
        "gbps": bytes_moved(batch_size, num_protos, num_keep, num_frames) / (ms_kernel * 1e-3) / 1e9,
    }


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        protos, frames = (int(v) for v in item.lower().split("x"))
        if not 1 <= protos <= frames:
            raise argparse.ArgumentTypeError(f"shape {item!r}: need 1 <= L <= T (distinct centre frames)")
        shapes.append((protos, frames))
    return shapes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="comma-separated batch sizes")
    parser.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                        help="comma-separated LxT pairs, e.g. 25x200,200x3600")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/topk_mask.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    rows = [run_case(B, L, T, device, args.repeats) for L, T in args.shapes for B in batch_sizes]
    print(f"top-K mask builder on {device_name(device)} (commit {git_commit()})")
    print(format_table(rows, TABLE_COLUMNS))
    if args.record and record_allowed(device):
        print(f"recorded to {append_csv('topk_mask', rows)}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""DPC-KNN kernel family (DESIGN.md section 4): fused Triton kernels vs the plain-PyTorch reference
(and vs torch.compile of the reference where it compiles) at the model's shapes.

    python bench/bench_dpc_knn.py                # GPU: the model's shapes, prints a table
    python bench/bench_dpc_knn.py --record       # also appends rows to bench/results/dpc_knn.csv
    python bench/bench_dpc_knn.py --smoke        # tiny shapes (CPU: the Triton interpreter), a correctness smoke

Cases: "spatial" = the two-layer merge of 200 frames (256 -> 16 centres, k = 8; then 16 -> 6, k = 3; C = 1408);
"temporal" = density + delta + centres over T frames, C = 16 * 1408 = 22,528, L = 25, k = 5. Inputs bf16.
Implementations: "fused" (v1: every pass streams its own distance tiles), "fused-v2" (kernels/gram.py: the distance
matrix once, in row panels past 256 MB, then light passes), "fused-spatial" (spatial case: kernels/spatial.py, both
layers, the modulation and G in one launch), "reference" (plain PyTorch), "reference+compile", and
"gram-floor": the Gram X X^T of the case's points by torch.matmul (cuBLAS on a GPU), the speed of light for computing
the distances once (the spatial case's first layer only: the second is 16 points).
Reported: median ms, speed-up over the reference, x_floor (ms over gram-floor's ms), x_mem (ms over the useful bytes
at the measured copy bandwidth: issue 12's spatial target is x_mem <= 2), TFLOP/s and GB/s of the useful
work (the Gram once, the inputs read once: what any implementation must do; v1 does about three times those FLOPs)
against the device's measured ceilings, peak memory above the inputs, and per call the Triton launches and the other PyTorch operators (bench/count_ops.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynfocus_kernels as K  # noqa: E402  (after TRITON_INTERPRET is settled)
from dynfocus_kernels import gram as G  # noqa: E402
from dynfocus_kernels import reference as R  # noqa: E402
from ceilings import measure_ceilings  # noqa: E402
from count_ops import count_calls  # noqa: E402
from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date  # noqa: E402

COLUMNS = ["case", "shape", "impl", "ms", "speedup", "x_floor", "x_mem", "tflops", "gbps", "peak_mb", "launches",
           "ops", "agree"]


def spatial(lib, x):
    first = lib.dpc_knn(x, 16, 8, check=False)
    second = lib.dpc_knn(first.prototypes, 6, 3, check=False)
    return first.rho, first.delta, first.assignment, second.assignment


def temporal(lib, x, L=25, k=5):
    rho = lib.knn_density(x, k, check=False)
    delta = lib.density_delta(x, rho, check=False)
    return rho, delta, lib.select_centers(rho * delta, L)


def spatial_v2(x):
    first = G.dpc_knn_gram(x, 16, 8, check=False)
    second = G.dpc_knn_gram(first.prototypes, 6, 3, check=False)
    return first.rho, first.delta, first.assignment, second.assignment


def temporal_v2(x, L=25, k=5):
    rho, delta = G.density_delta_gram(x, k, check=False)
    return rho, delta, K.select_centers(rho * delta, L)


def spatial_fused(x, weight, bias):
    """The whole spatial merger in one launch (kernels/spatial.py; also the modulation and G, which the others skip)."""
    out = K.spatial_merge(x, weight, bias, check=False)
    return out.rho, out.delta, out.first_assignment, out.second_assignment


def gram_floor(x):
    """The Gram of the points once (torch.matmul: cuBLAS on a GPU), in x's dtype."""
    return torch.matmul(x, x.transpose(1, 2))


def spatial_work(B, N, C):
    """(flops, bytes) that any implementation must do for the two-layer merge: each layer's Gram once and the
    assignment's dots, its input read once. Every row's TFLOP/s and GB/s are this useful work over its time."""
    flops = 0
    for n, l in ((N, 16), (16, 6)):
        flops += B * (2 * n * n * C + 2 * n * l * C)
    return flops, B * C * 2 * (N + 16)


def temporal_work(B, N, C):
    """The Gram once (density, delta and centres need no more), the points read once."""
    return B * 2 * N * N * C, B * N * C * 2


def peak_mb(fn, device, base_bytes):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


MIN_AGREEMENT = 0.9


def check_against_reference(name, got, want) -> float:
    """Densities and deltas must match closely; centre and cluster ids are compared as the fraction that agree,
    because in high dimension many densities differ by less than bf16-vs-fp32 rounding (random features concentrate)
    and a near-tie may legitimately flip. Under MIN_AGREEMENT is a bug, not rounding: main records the rows (the
    agree column shows it) and then fails."""
    agreements = []
    for g, w in zip(got, want):
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g.float(), w.float(), atol=1e-3, rtol=1e-3)
        else:
            agreements.append((g == w).float().mean().item())
    agree = min(agreements)
    if agree < MIN_AGREEMENT:
        print(f"{name}: fused and reference ids agree on only {agree:.1%}", file=sys.stderr)
    return agree


def bench_case(name, fn, fn_v2, x, work, device, repeats, compile_ref, extra=()):
    flops, bytes_ = work
    impls = [("fused", lambda: fn(K, x)), ("fused-v2", lambda: fn_v2(x)), *extra, ("reference", lambda: fn(R, x)),
             ("gram-floor", lambda: gram_floor(x))]
    if compile_ref and device.type == "cuda":
        compiled = torch.compile(lambda inp: fn(R, inp), dynamic=False)
        try:
            compiled(x)
            impls.append(("reference+compile", lambda: compiled(x)))
        except Exception as error:  # a reference that torch.compile cannot handle is reported, not fatal
            print(f"{name}: torch.compile of the reference failed: {type(error).__name__}: {error}", file=sys.stderr)
    want = fn(R, x)
    agree = {"fused": check_against_reference(name, fn(K, x), want),
             "fused-v2": check_against_reference(f"{name} v2", fn_v2(x), want)}
    for impl, call in extra:
        agree[impl] = check_against_reference(f"{name} {impl}", call(), want)
    rows = []
    for impl, call in impls:
        ms = time_ms(call, device, warmup=1 if device.type != "cuda" else 3, repeats=repeats, calls_per_repeat=1)
        counts = count_calls(call)[1]
        rows.append(dict(case=name, shape="x".join(map(str, x.shape)), impl=impl, ms=ms,
                         agree=agree.get(impl, float("nan")), tflops=flops / ms / 1e9, gbps=bytes_ / ms / 1e6,
                         peak_mb=peak_mb(call, device, 0), launches=counts.launches, ops=counts.ops))
    by_impl = {row["impl"]: row["ms"] for row in rows}
    for row in rows:
        row["speedup"] = by_impl["reference"] / row["ms"]
        row["x_floor"] = row["ms"] / by_impl["gram-floor"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default on a CPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/dpc_knn.csv")
    parser.add_argument("--frames", type=int, nargs="*", default=[200, 1000, 3600], help="temporal T values")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    if smoke:
        spatial_shape, temporal_shapes, repeats = (4, 64, 48), [(1, 40, 96)], 1
    else:
        spatial_shape, repeats = (200, 256, 1408), args.repeats
        temporal_shapes = [(1, t, 16 * 1408) for t in args.frames]
    g = torch.Generator().manual_seed(0)
    rows = []
    x = torch.randn(*spatial_shape, generator=g).to(device, torch.bfloat16)
    weight, bias = (torch.randn(*shape, generator=g).to(device, torch.bfloat16) for shape in ((6, 6), (6,)))
    rows += bench_case("spatial", spatial, spatial_v2, x, spatial_work(*spatial_shape), device, repeats,
                       not args.no_compile, extra=[("fused-spatial", lambda: spatial_fused(x, weight, bias))])
    for shape in temporal_shapes:
        x = torch.randn(*shape, generator=g).to(device, torch.bfloat16)
        rows += bench_case("temporal", temporal, temporal_v2, x, temporal_work(*shape), device, repeats, not args.no_compile)
    ceilings = measure_ceilings(device)
    for row in rows:  # the useful bytes at the measured copy bandwidth: the memory floor
        row["x_mem"] = ceilings["copy_gbps"] / row["gbps"]
    print(f"device: {device_name(device)}; measured ceilings: {ceilings['matmul_tflops']:.1f} TFLOP/s bf16 matmul, "
          f"{ceilings['copy_gbps']:.0f} GB/s copy")
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(),
                    ceiling_tflops=round(ceilings["matmul_tflops"], 1), ceiling_gbps=round(ceilings["copy_gbps"]))
        path = append_csv("dpc_knn", [{**meta, **row} for row in rows])
        print(f"appended {len(rows)} rows to {path}")
    disagreeing = sorted({f"{r['case']} {r['shape']} {r['impl']}" for r in rows if r["agree"] < MIN_AGREEMENT})
    if disagreeing:
        raise SystemExit(f"fused and reference ids agree on under {MIN_AGREEMENT:.0%} in: {', '.join(disagreeing)}")
    return rows


if __name__ == "__main__":
    main()

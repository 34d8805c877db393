"""PNG plots of the profiling results (matplotlib, Agg backend: no display needed).

    python bench/plots.py                                   # bench/results/*.csv -> bench/results/plots/*.png
    python bench/plots.py --results DIR --out DIR

From profile_tokens.csv (bench/profile_tokens.py): visual tokens vs T (with the LLM context), time to first token vs
T at the smallest batch, and videos/s vs batch per baseline (one panel per T). Where token_counts.csv
(profile_tokens.py --counts: exact, device-independent, more values of T) exists, the tokens plot comes from it.
From dpc_knn.csv (bench/bench_dpc_knn.py): a roofline of the DPC-KNN kernels, achieved TFLOP/s against arithmetic
intensity (FLOP per byte = flops / bytes = 1e3 * tflops / gbps, both recovered from the same ms) under the device's
measured copy-bandwidth and matmul ceilings. Each CSV may hold many runs; the plots use the latest (latest_run).
Every function also takes rows directly (e.g. a smoke run's), so tests render into a temporary directory.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import matplotlib.ticker  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAPER_BASELINE = "dynfocus-L25-r0.8"


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV with numbers parsed ("nan" becomes float nan)."""
    with Path(path).open(newline="") as handle:
        return [{key: _value(text) for key, text in row.items()} for row in csv.DictReader(handle)]


PROFILE_KEY = ("baseline", "frames", "batch")
DPC_KEY = ("case", "shape", "impl")


def latest_run(rows: list[dict], key: tuple = PROFILE_KEY) -> list[dict]:
    """The rows of the latest run: those of the last row's device and commit (a run split over several calls keeps
    its commit), and of a case (`key` columns) recorded more than once, its last row; in recording order."""
    if not rows:
        return rows
    last = rows[-1]
    mine = [row for row in rows if all(row.get(c) == last.get(c) for c in ("device", "commit"))]
    latest = {}
    for row in mine:
        case = tuple(row.get(c) for c in key)
        latest.pop(case, None)
        latest[case] = row
    return list(latest.values())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _baselines(rows: Iterable[Mapping]) -> list[str]:
    return list(dict.fromkeys(row["baseline"] for row in rows))


def _style(name: str, index: int) -> dict:
    """DynFocus variants in blues (the paper's setting bold), the other baselines in distinct colours."""
    if name.startswith("dynfocus"):
        if name == PAPER_BASELINE:
            return dict(color="tab:blue", linewidth=2.8, marker="o", zorder=5)
        return dict(color=plt.cm.Blues(0.35 + 0.1 * (index % 6)), linewidth=1.2, marker=".", linestyle="--")
    colours = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
    return dict(color=colours[index % len(colours)], linewidth=1.6, marker="s")


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _ticks_at(ax, values) -> None:
    """Log-scale x axis labelled at the measured values, in plain numbers."""
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _smallest_batch(rows: list[dict]) -> list[dict]:
    smallest = min(row["batch"] for row in rows)
    return [row for row in rows if row["batch"] == smallest]


def plot_tokens_vs_frames(rows: list[dict], out_dir: Path) -> Path:
    """Visual tokens per video vs T for every baseline; crosses mark prompts that exceed the context."""
    rows = _smallest_batch(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for index, name in enumerate(_baselines(rows)):
        mine = sorted((r for r in rows if r["baseline"] == name), key=lambda r: r["frames"])
        style = _style(name, index)
        ax.plot([r["frames"] for r in mine], [r["visual_tokens"] for r in mine], label=name, **style)
        over = [r for r in mine if r["status"] == "exceeds context"]
        ax.scatter([r["frames"] for r in over], [r["visual_tokens"] for r in over], marker="x", s=70,
                   color=style["color"], zorder=6)
    context = max(row["context"] for row in rows)
    ax.axhline(context, color="black", linestyle=":", linewidth=1.2)
    ax.annotate(f"LLM context ({context})", (0.01, context), xycoords=("axes fraction", "data"), va="bottom")
    ax.set(xscale="log", yscale="log", xlabel="frames T", ylabel="visual tokens per video",
           title="Visual tokens vs video length (x: prompt exceeds the context)")
    _ticks_at(ax, [row["frames"] for row in rows])
    _legend_outside(ax)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out_dir, "tokens_vs_frames.png")


def plot_ttft_vs_frames(rows: list[dict], out_dir: Path) -> Path:
    """Time to first token vs T at the smallest batch, for the baselines whose prompt fits."""
    rows = _smallest_batch(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for index, name in enumerate(_baselines(rows)):
        mine = sorted((r for r in rows if r["baseline"] == name and _finite(r["ttft_ms"])), key=lambda r: r["frames"])
        if mine:
            ax.plot([r["frames"] for r in mine], [r["ttft_ms"] for r in mine], label=name, **_style(name, index))
    ax.set(xscale="log", yscale="log", xlabel="frames T", ylabel="time to first token (ms)",
           title=f"Time to first token (batch {rows[0]['batch']}; missing points exceed the context)")
    _ticks_at(ax, [row["frames"] for row in rows])
    _legend_outside(ax)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out_dir, "ttft_vs_frames.png")


def plot_throughput_vs_batch(rows: list[dict], out_dir: Path) -> Path:
    """Videos/s vs batch size per baseline, one panel per T."""
    frames = sorted({row["frames"] for row in rows})
    columns = min(2, len(frames))
    lines = math.ceil(len(frames) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 4.5 * lines), squeeze=False)
    names = _baselines(rows)
    for ax, num_frames in zip(axes.flat, frames):
        for index, name in enumerate(names):
            mine = sorted((r for r in rows if r["baseline"] == name and r["frames"] == num_frames
                           and _finite(r["videos_per_s"])), key=lambda r: r["batch"])
            if mine:
                ax.plot([r["batch"] for r in mine], [r["videos_per_s"] for r in mine], label=name,
                        **_style(name, index))
        ax.set(xscale="log", yscale="log", xlabel="batch (videos)", ylabel="videos / s", title=f"T = {num_frames}")
        _ticks_at(ax, [row["batch"] for row in rows])
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(frames):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Throughput vs batch (missing points: context exceeded or out of memory)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, out_dir, "throughput_vs_batch.png")


def plot_roofline(rows: list[dict], out_dir: Path, ceilings: Optional[Mapping[str, float]] = None) -> Path:
    """DPC-KNN kernels on the roofline. Ceilings from the rows (ceiling_tflops, ceiling_gbps) or `ceilings`
    ({'matmul_tflops', 'copy_gbps'}, as bench/ceilings.measure_ceilings returns)."""
    if ceilings is not None:
        peak_tflops, peak_gbps = ceilings["matmul_tflops"], ceilings["copy_gbps"]
    elif rows and "ceiling_tflops" in rows[0]:
        peak_tflops, peak_gbps = rows[0]["ceiling_tflops"], rows[0]["ceiling_gbps"]
    else:
        raise ValueError("the DPC-KNN rows carry no ceiling_tflops / ceiling_gbps (a run without --record): pass "
                         "ceilings={'matmul_tflops': ..., 'copy_gbps': ...} from bench/ceilings.measure_ceilings")
    points = [r for r in rows if _finite(r["tflops"]) and _finite(r["gbps"]) and r["gbps"] > 0 and r["tflops"] > 0]
    if not points:
        raise ValueError("no DPC-KNN row has positive, finite tflops and gbps: nothing to place on the roofline")
    intensity = [1e3 * r["tflops"] / r["gbps"] for r in points]
    ridge = 1e3 * peak_tflops / peak_gbps
    low, high = min(intensity + [ridge]) / 10, max(intensity + [ridge]) * 10
    xs = [low * (high / low) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot(xs, [min(peak_tflops, x * peak_gbps / 1e3) for x in xs], color="black", linewidth=2,
            label=f"roofline: {peak_gbps:.4g} GB/s copy, {peak_tflops:.4g} TFLOP/s matmul")
    ax.axvline(ridge, color="gray", linestyle=":", linewidth=1)
    markers = {"fused": "o", "fused-v2": "P", "reference": "s", "reference+compile": "^", "gram-floor": "*"}
    cases = list(dict.fromkeys(r["case"] for r in points))
    for row, x in zip(points, intensity):
        colour = plt.cm.tab10(cases.index(row["case"]) % 10)
        ax.scatter(x, row["tflops"], marker=markers.get(row["impl"], "D"), s=60, color=colour, zorder=5,
                   label=f"{row['case']} {row.get('shape', '')} {row['impl']}")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="achieved TFLOP/s",
           title="DPC-KNN kernels vs the measured ceilings")
    _legend_outside(ax)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out_dir, "roofline_dpc_knn.png")


def render_profile(rows: list[dict], out_dir: Path) -> list[Path]:
    """The three profile plots from profile_tokens rows."""
    if not rows:
        raise ValueError("no profile rows to plot: run bench/profile_tokens.py first")
    return [plot_tokens_vs_frames(rows, out_dir), plot_ttft_vs_frames(rows, out_dir),
            plot_throughput_vs_batch(rows, out_dir)]


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the CSVs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plots", help="folder for the PNG files")
    args = parser.parse_args(argv)
    written = []
    profile_csv, dpc_csv = args.results / "profile_tokens.csv", args.results / "dpc_knn.csv"
    counts_csv = args.results / "token_counts.csv"
    if counts_csv.exists():
        written.append(plot_tokens_vs_frames(latest_run(read_rows(counts_csv)), args.out))
    rows = latest_run(read_rows(profile_csv)) if profile_csv.exists() else []
    if rows:
        if counts_csv.exists():
            written += [plot_ttft_vs_frames(rows, args.out), plot_throughput_vs_batch(rows, args.out)]
        else:
            written += render_profile(rows, args.out)
    else:
        print(f"{profile_csv} holds no rows: run bench/profile_tokens.py --record on a GPU first")
    if dpc_csv.exists():
        written.append(plot_roofline(latest_run(read_rows(dpc_csv), DPC_KEY), args.out))
    else:
        print(f"{dpc_csv} does not exist: run bench/bench_dpc_knn.py --record on a GPU first")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()

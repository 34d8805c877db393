"""Helpers shared by the benchmarks: what ran where (device, commit, date), timing, and result rows.

Every row a benchmark records carries device, commit and date (DESIGN.md section 9); `append_csv` adds them.
Benchmarks import this as `from common import ...` (they run as `python bench/<name>.py`).
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    """GPU model for CUDA devices, the processor for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def git_commit() -> str:
    """$DYNFOCUS_COMMIT where set (a copy of the tree without .git, such as a lent GPU machine's), else the short
    hash of HEAD with '+dirty' when tracked files have local changes; 'unknown' outside a checkout."""
    if os.environ.get("DYNFOCUS_COMMIT"):
        return os.environ["DYNFOCUS_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, repeats: int = 10,
            calls_per_repeat: int = 10) -> float:
    """Median milliseconds per call of `fn`.

    Each repeat times `calls_per_repeat` back-to-back calls, so that per-call timer overhead (CUDA event
    record, perf_counter) does not dominate microsecond-scale ops. CUDA: events on the current stream,
    synchronised once per repeat; CPU: perf_counter.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls_per_repeat):
                fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / calls_per_repeat)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls_per_repeat):
                fn()
            samples.append((time.perf_counter() - start) * 1e3 / calls_per_repeat)
    return statistics.median(samples)


def record_allowed(device: torch.device | str, smoke: bool = False) -> bool:
    """Whether --record may append this run's rows: full-size GPU runs only (a CPU or smoke run checks that the
    benchmark runs; its figures do not belong in bench/results)."""
    if torch.device(device).type == "cuda" and not smoke:
        return True
    print("smoke run: nothing recorded (--record keeps full-size GPU runs only; this is a CPU or smoke run)")
    return False


def append_csv(name: str, rows: Iterable[Mapping[str, object]], results_dir: Path = RESULTS_DIR) -> Path:
    """Appends rows to results_dir/<name>.csv (header written when the file is new); returns the path.

    All rows of one file must share the same columns: a mismatch with an existing header raises ValueError.
    """
    rows = list(rows)
    path = Path(results_dir) / f"{name}.csv"
    if not rows:
        return path
    columns = list(rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with path.open(newline="") as existing:
            header = next(csv.reader(existing), [])
        if header != columns:
            raise ValueError(f"{path} has columns {header}, these rows have {columns}; "
                             "write to a new benchmark name or move the old file aside")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if is_new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: Iterable[Mapping[str, object]], columns: list[str]) -> str:
    """Plain fixed-width table of the given columns (floats with 4 significant digits)."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    body = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)

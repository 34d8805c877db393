#!/usr/bin/env python3
"""Merges `dynfocus-infer eval` results (accuracy.csv of one or more --out folders) into one CSV and a markdown table:
one row per encoder and the weights it was scored with (the encoder they were trained for, their steps), its mean
visual tokens, the videos scored, and the accuracy per question type.

    python scripts/eval_table.py OUT_DIR [OUT_DIR ...] [--csv bench/results/accuracy_shapes.csv] [--plot FILE.png]
"""
import argparse
import csv
import sys
from pathlib import Path

TYPES = ("colour", "shape", "direction", "count", "brief", "describe", "all")


def read_rows(folders) -> list[dict]:
    rows = []
    for folder in folders:
        with open(Path(folder) / "accuracy.csv", newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _key(row: dict) -> tuple:
    """One table row per encoder and the weights it was scored with (rows of older runs have no trained_*)."""
    return row["encoder"], row.get("trained_for") or "", row.get("trained_steps") or ""


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(_key(r) for r in rows))
    lines = ["| encoder | trained for (steps) | visual tokens | videos | " + " | ".join(TYPES) + " |",
             "|---|---|---:|---:|" + "---:|" * len(TYPES)]
    for key in keys:
        encoder, trained_for, steps = key
        mine = {r["type"]: r for r in rows if _key(r) == key}
        first = next(iter(mine.values()))
        cells = [f"{float(mine[t]['accuracy']):.0%} ({mine[t]['correct']}/{mine[t]['total']})" if t in mine else "-"
                 for t in TYPES]
        trained = f"{trained_for} ({steps})" if trained_for and steps else trained_for or "-"
        lines.append(f"| {encoder} | {trained} | {float(first['visual_tokens']):g} | {first.get('videos', '?')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--csv", default=None, help="write the merged rows here")
    parser.add_argument("--plot", default=None, help="draw accuracy against visual tokens here")
    args = parser.parse_args(argv)
    rows = read_rows(args.folders)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # runs from before trained_* lack them
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        from dynfocus_infer.evaluation.run import plot_accuracy

        plot_accuracy([{**r, "visual_tokens": float(r["visual_tokens"]), "accuracy": float(r["accuracy"])}
                       for r in rows], Path(args.plot))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

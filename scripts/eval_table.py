#!/usr/bin/env python3
"""Merges `dynfocus-infer eval` results (accuracy.csv of one or more --out folders) into one CSV and a markdown table:
one row per encoder, its mean visual tokens, the videos scored, and the accuracy per question type.

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


def markdown(rows: list[dict]) -> str:
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    lines = ["| encoder | visual tokens | videos | " + " | ".join(TYPES) + " |",
             "|---|---:|---:|" + "---:|" * len(TYPES)]
    for encoder in encoders:
        mine = {r["type"]: r for r in rows if r["encoder"] == encoder}
        first = next(iter(mine.values()))
        cells = [f"{float(mine[t]['accuracy']):.0%} ({mine[t]['correct']}/{mine[t]['total']})" if t in mine else "-"
                 for t in TYPES]
        lines.append(f"| {encoder} | {float(first['visual_tokens']):g} | {first.get('videos', '?')} | "
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
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
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

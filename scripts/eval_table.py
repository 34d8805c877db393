#!/usr/bin/env python3
"""Merges `dynfocus-infer eval` results (accuracy.csv of one or more --out folders, or result CSVs such as
bench/results/shapes_eval_500.csv, whose `run` column names the weights) into one CSV and a markdown table:
one row per encoder, the weights it was scored with (the encoder they were trained for, their steps) and the videos
scored (a repeated result gets a row of its own: `groups`), with its mean visual tokens and the accuracy per question
type; then, per row, each type's accuracy beside
the accuracy of a predictor that ignores the video but answers as often as the model does ("blind": from
accuracy.csv, or computed from predictions.jsonl for runs older than that column).

    python scripts/eval_table.py OUT_DIR [OUT_DIR ...] [--csv bench/results/accuracy_shapes.csv] [--plot FILE.png]
    python scripts/eval_table.py bench/results/shapes_eval_500.csv --run "run 8 (shipped)" --plot FILE.png
"""
import argparse
import csv
import json
import sys
from pathlib import Path

TYPES = ("colour", "shape", "direction", "count", "brief", "describe", "all")


def read_rows(folders, runs=()) -> list[dict]:
    """The accuracy rows of eval --out folders and result CSVs (a path ending .csv); runs: keep only the rows of
    these `run` labels (rows without one are kept)."""
    rows = []
    for folder in folders:
        if str(folder).endswith(".csv"):
            with open(folder, newline="") as handle:
                rows += [r for r in csv.DictReader(handle) if not runs or not r.get("run") or r["run"] in runs]
            continue
        with open(Path(folder) / "accuracy.csv", newline="") as handle:
            mine = list(csv.DictReader(handle))
        predictions = Path(folder) / "predictions.jsonl"
        if any(not r.get("blind") for r in mine) and predictions.exists():
            _fill_blind(mine, [json.loads(line) for line in predictions.read_text().splitlines() if line])
        rows += mine
    return rows


def _fill_blind(rows: list[dict], predictions: list[dict]) -> None:
    """Sets each row's missing "blind" from its encoder's predictions (rows of types without one stay empty)."""
    from dynfocus_infer.evaluation import answer_blind

    for encoder in {r["encoder"] for r in rows}:
        blind = answer_blind([p for p in predictions if p["encoder"] == encoder])
        for row in rows:
            if row["encoder"] == encoder and not row.get("blind"):
                row["blind"] = f"{blind[row['type']]:.4f}" if row["type"] in blind else ""


def groups(rows: list[dict]) -> list[tuple[tuple, dict]]:
    """One table row per run label (result CSVs; "" for eval folders), encoder, the weights it was scored with (the
    encoder they were trained for and their steps; rows of older runs have neither) and the videos scored:
    [((run, encoder, trained_for, steps), {type: row})]. Folders
    that split one run's encoders merge; a second result for the same key and type (another run of older rows, or
    the same weights scored twice) starts a row of its own instead of replacing the first."""
    merged = []
    for row in rows:
        base = (row.get("run") or "", row["encoder"], row.get("trained_for") or "", row.get("trained_steps") or "",
                row.get("videos", ""))
        group = next((g for b, g in merged if b == base and row["type"] not in g), None)
        if group is None:
            group = {}
            merged.append((base, group))
        group[row["type"]] = row
    return [(base[:4], group) for base, group in merged]


def _run_cell(rows: list[dict], run: str) -> str:
    """The first column (the run label) when any row has one, else nothing."""
    return f"| {run} " if any(r.get("run") for r in rows) else ""


def _trained(trained_for: str, steps: str) -> str:
    return f"{trained_for} ({steps})" if trained_for and steps else trained_for or "-"


def markdown(rows: list[dict]) -> str:
    head = "| run " if any(r.get("run") for r in rows) else ""
    lines = [head + "| encoder | trained for (steps) | visual tokens | videos | " + " | ".join(TYPES) + " |",
             ("|---" if head else "") + "|---|---|---:|---:|" + "---:|" * len(TYPES)]
    for (run, encoder, trained_for, steps), mine in groups(rows):
        first = next(iter(mine.values()))
        cells = [f"{float(mine[t]['accuracy']):.0%} ({mine[t]['correct']}/{mine[t]['total']})" if t in mine else "-"
                 for t in TYPES]
        lines.append(_run_cell(rows, run) + f"| {encoder} | {_trained(trained_for, steps)} | "
                     f"{float(first['visual_tokens']):g} | "
                     f"{first.get('videos', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def blind_markdown(rows: list[dict]) -> str:
    """Accuracy / blind accuracy per type with one expected answer, one row per table row that has them ("" if
    none has)."""
    kinds = [t for t in TYPES if any(r["type"] == t and r.get("blind") for r in rows)]
    if not kinds:
        return ""
    head = "| run " if any(r.get("run") for r in rows) else ""
    lines = [head + "| encoder | trained for (steps) | " + " | ".join(f"{t}: model / blind" for t in kinds) + " |",
             ("|---" if head else "") + "|---|---|" + "---:|" * len(kinds)]
    for (run, encoder, trained_for, steps), mine in groups(rows):
        mine = {t: r for t, r in mine.items() if r.get("blind")}
        if mine:
            cells = [f"{float(mine[t]['accuracy']):.0%} / {float(mine[t]['blind']):.0%}" if t in mine else "-"
                     for t in kinds]
            lines.append(_run_cell(rows, run) + f"| {encoder} | {_trained(trained_for, steps)} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="eval --out folders and/or result CSVs")
    parser.add_argument("--run", action="append", default=[], help="result CSVs: keep this run label (repeatable)")
    parser.add_argument("--csv", default=None, help="write the merged rows here")
    parser.add_argument("--plot", default=None, help="draw accuracy against visual tokens here")
    args = parser.parse_args(argv)
    rows = read_rows(args.folders, args.run)
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
    blind = blind_markdown(rows)
    if blind:
        print("\n" + blind)
    return 0


if __name__ == "__main__":
    sys.exit(main())

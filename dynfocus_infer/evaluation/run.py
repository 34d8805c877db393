"""`evaluate(...)`: answer a held-out synthetic dataset with the engine (the `LLM` API, one run per visual encoder:
DynFocus or a token-count baseline of models/baselines.py) and score it per question type.

Writes, under `out`:
  predictions.jsonl   one line per (encoder, question): the answer, the prediction, correct, visual tokens
  accuracy.csv        encoder, question type, correct, total, accuracy, mean visual tokens per video, videos, the
                      encoder the weights were trained for and their training steps, and `blind`: the accuracy of
                      a predictor that ignores the video but answers as often as this one does (scoring.answer_blind)
  accuracy.json       the same as a list of rows
  confusion.csv       encoder, question type, answer, prediction, count (scoring.confusion)
Held-out data: the dataset is generated with a seed that must differ from the training seed (every video of a seed
is drawn from its own generator, so two seeds share no video), or read from a folder `generate` wrote.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, RequestError
from .scoring import accuracy_by_type, answer_blind, confusion, is_correct

ACCURACY_FIELDS = ("encoder", "type", "correct", "total", "accuracy", "visual_tokens", "videos", "trained_for",
                   "trained_steps", "blind")
CONFUSION_FIELDS = ("encoder", "type", "answer", "prediction", "count")


def read_dataset(folder: Path) -> tuple[list, dict]:
    """(qa rows, {video: scene}) of a folder `dynfocus-infer generate` wrote."""
    qa, scenes = folder / "qa.jsonl", folder / "scenes.jsonl"
    for path in (qa, scenes):
        if not path.is_file():
            raise RequestError(f"--data {str(folder)!r} holds no {path.name}: give a folder `dynfocus-infer generate` "
                               f"wrote")
    rows = [json.loads(line) for line in qa.read_text().splitlines() if line.strip()]
    by_video = {}
    for line in scenes.read_text().splitlines():
        if line.strip():
            scene = json.loads(line)
            by_video[scene["video"]] = scene
    return rows, by_video


def training_record(weights: Optional[str], model: str = "") -> dict:
    """The training settings recorded beside trained weights (visual_config.json's "training"), or in the shipped
    model's card for dynfocus-smol; {} when unknown (random weights, or weights without a config)."""
    if weights is None:
        if model != "dynfocus-smol":
            return {}
        from ..presets import TRAINED_CARD
        config = TRAINED_CARD
    else:
        config = Path(weights).with_name("visual_config.json")
    if not config.is_file():
        return {}
    return json.loads(config.read_text()).get("training", {})


def training_seed(weights: Optional[str], model: str = "") -> Optional[int]:
    """The data seed the weights were trained on (training_record); None when unknown."""
    return training_record(weights, model).get("seed")


def trained_encoder(record: dict) -> Optional[str]:
    """The visual encoder whose token layout a training record's weights were trained for (`train
    --visual-encoder`; runs from before that option, and the shipped card, trained DynFocus); None when unknown."""
    return record.get("visual_encoder", "dynfocus") if record else None


def layout_mismatch(encoder: str, trained_for: Optional[str]) -> bool:
    """Whether `encoder` is scored with projectors trained for another token layout (not a fair row). DynFocus's
    L / keep-ratio grid and Table 6's switches are run-time settings of the DynFocus connector: they count as
    DynFocus's layout."""
    if not trained_for or encoder == trained_for:
        return False
    return not (encoder.startswith("dynfocus") and trained_for.startswith("dynfocus"))


def load_trained_visual(llm, weights: str) -> None:
    """Trained ViT, Q-Former and connector weights (training/checkpoint.export_visual) into an engine's model."""
    from safetensors.torch import load_file

    from ..training.checkpoint import load_visual_state

    state = load_file(weights, device=str(llm.device))
    load_visual_state(llm.model, {k: v.to(llm.dtype) for k, v in state.items()}, weights)


def _answer_all(llm, rows: list, data: Path, max_tokens: int) -> list:
    from ..sampling import SamplingParams

    requests = [{"id": r["id"], "question": r["question"], "video": str(data / r["video"])} for r in rows]
    return llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0.0), progress=True)


def evaluate(out, *, model: str = "dynfocus-smol", encoders: Optional[Sequence[str]] = None,
             data: Optional[str] = None, count: int = 500, seed: int = 1, weights: Optional[str] = None,
             num_frames: int = 12, max_tokens: int = 48, device: Optional[str] = "cpu", max_questions: int = 0,
             max_videos: int = 0, llm_factory=None, prefix_caching: bool = True) -> list[dict]:
    """Scores `encoders` (default: the one the weights were trained for, else dynfocus) on the dataset in `data`
    (or one generated into out/data with `seed`); returns the accuracy rows, each with the encoder the weights were
    trained for and their training steps (`trained_for`, `trained_steps`; empty when unknown) and the blind
    accuracy of its type (`blind`). max_videos > 0 keeps the questions of the first that many videos, max_questions
    > 0 the first that many questions (smoke runs). llm_factory(encoder) builds the engine (tests); by default
    `LLM(model, visual_encoder=encoder, num_frames=num_frames, device=device, enable_prefix_caching=prefix_caching)`
    (the seven questions of a video share its prompt up to the question when the encoder ignores the question:
    prefix caching computes that part once). Also draws accuracy against visual
    tokens (out/accuracy.png) when matplotlib is installed."""
    from ..synthetic import write_dataset

    out = Path(out)
    record = training_record(weights, model)
    trained_on, trained_for = record.get("seed"), trained_encoder(record)
    if data is None and trained_on is not None and trained_on == seed:
        raise ConfigError(f"--seed {seed} is the seed {weights} was trained on: evaluate on another seed")
    if encoders is None:
        encoders = [trained_for or "dynfocus"]
    if not encoders:
        raise ConfigError("--encoders is empty: name dynfocus and/or baselines (full, pool-4x4, llama-vid, ...)")
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data_dir = out / "data"
        if not (data_dir / "qa.jsonl").exists():
            write_dataset(data_dir, count, seed)
    else:
        data_dir = Path(data)
    rows, scenes = read_dataset(data_dir)
    if max_videos:
        kept = list(dict.fromkeys(r["video"] for r in rows))[:max_videos]
        rows = [r for r in rows if r["video"] in set(kept)]
    if max_questions:
        rows = rows[:max_questions]
    predictions, table, confusions = [], [], []
    for encoder in encoders:
        if llm_factory is not None:
            llm = llm_factory(encoder)
        else:
            from ..engine import LLM
            llm = LLM(model, visual_encoder=encoder, num_frames=num_frames, device=device,
                      enable_prefix_caching=prefix_caching)
        if weights is not None:
            load_trained_visual(llm, weights)
        outputs = _answer_all(llm, rows, data_dir, max_tokens)
        scored, tokens = [], {}
        for row, output in zip(rows, outputs):
            prediction = output.text.strip() if output.ok else ""
            correct = output.ok and is_correct(row["type"], prediction, row["answer"],
                                               scenes[row["video"]]["shapes"])
            scored.append({"encoder": encoder, **row, "prediction": prediction, "correct": bool(correct),
                           "visual_tokens": output.tokens.visual_tokens, "error": output.error})
            tokens[row["video"]] = output.tokens.visual_tokens
        predictions += scored
        mean_tokens = sum(tokens.values()) / max(1, len(tokens))
        blind = answer_blind(scored)
        for kind, result in accuracy_by_type(scored).items():
            table.append({"encoder": encoder, "type": kind, **result, "visual_tokens": round(mean_tokens, 1),
                          "videos": len(tokens), "trained_for": trained_for or "",
                          "trained_steps": record.get("steps", ""),
                          "blind": round(blind[kind], 4) if kind in blind else ""})
        confusions += [{"encoder": encoder, **row} for row in confusion(scored)]
        _write_results(out, predictions, table, confusions)  # after every encoder: a cut-short run keeps the rest
    plot_accuracy(table, out / "accuracy.png")
    return table


def _replace(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _csv_text(fields: Sequence[str], rows: list) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_results(out: Path, predictions: list, table: list, confusions: list) -> None:
    """predictions.jsonl, accuracy.csv, accuracy.json and confusion.csv of the encoders scored so far."""
    _replace(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    _replace(out / "accuracy.csv", _csv_text(ACCURACY_FIELDS, table))
    _replace(out / "accuracy.json", json.dumps(table, indent=2) + "\n")
    _replace(out / "confusion.csv", _csv_text(CONFUSION_FIELDS, confusions))


def row_label(row: dict) -> str:
    """An accuracy row's encoder, with its weights' training steps when known, marked when its projectors were
    trained for another layout (layout_mismatch)."""
    trained_for, steps = row.get("trained_for") or None, row.get("trained_steps") or None
    label = row["encoder"] + (f", {steps} steps" if steps else "")
    if layout_mismatch(row["encoder"], trained_for):
        label += f" ({trained_for}'s projectors)"
    return label


def plot_accuracy(table: list, path: Path) -> Optional[Path]:
    """Overall accuracy against mean visual tokens per video, one labelled point per encoder (log x axis), coloured
    by `run` when the rows name one (a results CSV); None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    overall = [r for r in table if r["type"] == "all"]
    runs = list(dict.fromkeys(r.get("run") or "" for r in overall))
    figure, axes = plt.subplots(figsize=(8, 5) if runs != [""] else (7, 4.5))
    colours = plt.get_cmap("tab10")
    placed = []  # points already labelled, highest first: a label near one of them moves down a line
    for row in sorted(overall, key=lambda r: -r["accuracy"]):
        run = row.get("run") or ""
        label = row["encoder"] if run else row_label(row)
        if run:  # rows of a results CSV: one colour per run (the weights), the encoder beside each point
            colour = colours(runs.index(run) % 10)
        else:
            colour = "tab:red" if row["encoder"].startswith("dynfocus") else "tab:blue"
        axes.scatter([row["visual_tokens"]], [row["accuracy"]], color=colour, zorder=3)
        near = sum(abs(math.log(row["visual_tokens"] / x)) < 0.25 and abs(row["accuracy"] - y) < 0.03
                   for x, y in placed)
        placed.append((row["visual_tokens"], row["accuracy"]))
        axes.annotate(label, (row["visual_tokens"], row["accuracy"]), textcoords="offset points",
                      xytext=(4, 4 - 10 * near), fontsize=7)
    if runs != [""]:
        from matplotlib.lines import Line2D

        axes.legend([Line2D([], [], marker="o", linestyle="", color=colours(i % 10)) for i in range(len(runs))],
                    runs, fontsize=7, loc="lower right")
    axes.set_xscale("log")
    axes.set_xlabel("visual tokens per video (mean)")
    axes.set_ylabel("accuracy, all question types")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.set_title("Held-out synthetic videos: accuracy against visual tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

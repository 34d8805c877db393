"""Scoring answers to the synthetic questions (issue 17): normalised exact match for the one-word (and "it does not
move") answers; for "Describe the video.", whether the prediction names every shape by its colour and shape."""
from __future__ import annotations

import re
from collections import defaultdict

from ..synthetic.questions import QUESTION_TYPES


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: "Red." and " red" both read "red"."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def names_every_shape(prediction: str, shapes) -> bool:
    """Whether `prediction` names each shape as "<colour> <shape>" (shapes: dicts or objects with colour, kind)."""
    said = f" {normalise(prediction)} "
    pairs = [(s["colour"], s["kind"]) if isinstance(s, dict) else (s.colour, s.kind) for s in shapes]
    return all(f" {colour} {kind} " in said for colour, kind in pairs)


def is_correct(kind: str, prediction: str, answer: str, shapes=None) -> bool:
    if kind == "describe":
        if shapes is None:
            raise ValueError("scoring 'Describe the video.' needs the scene's shapes")
        return names_every_shape(prediction, shapes)
    return normalise(prediction) == normalise(answer)


def accuracy_by_type(rows) -> dict:
    """{type: {"correct", "total", "accuracy"}} over rows with "type" and "correct", in QUESTION_TYPES order, plus
    "all"."""
    counts = defaultdict(lambda: [0, 0])
    for row in rows:
        for key in (row["type"], "all"):
            counts[key][0] += bool(row["correct"])
            counts[key][1] += 1
    order = [k for k in QUESTION_TYPES if k in counts] + ["all"]
    return {k: {"correct": counts[k][0], "total": counts[k][1], "accuracy": counts[k][0] / counts[k][1]}
            for k in order if counts[k][1]}

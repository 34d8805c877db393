"""Scoring answers to the synthetic questions (issue 17): normalised exact match for the one-word (and "it does not
move") answers; for "Describe the video.", whether the prediction names every shape by its colour and shape."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

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


def answer_blind(rows) -> dict:
    """{type: accuracy} expected of a predictor that ignores the video but gives each answer as often as `rows`'
    predictions do: the sum over answers a of P(answer = a) * P(prediction = a), per question type with one
    expected answer (not "describe"). An accuracy near it means the type is not read from the video, however far
    above uniform chance it is (a model that always says "it does not move" scores that answer's share)."""
    answers, predictions, totals = defaultdict(Counter), defaultdict(Counter), Counter()
    for row in rows:
        if row["type"] != "describe":
            answers[row["type"]][normalise(row["answer"])] += 1
            predictions[row["type"]][normalise(row["prediction"])] += 1
            totals[row["type"]] += 1
    return {kind: sum(n * predictions[kind][answer] for answer, n in answers[kind].items()) / totals[kind] ** 2
            for kind in totals}


def confusion(rows) -> list[dict]:
    """{"type", "answer", "prediction", "count"} for the question types with one expected answer, in QUESTION_TYPES
    order, most frequent first; a prediction that is none of its type's answers counts as "(other)"."""
    answers = defaultdict(set)
    for row in rows:
        answers[row["type"]].add(normalise(row["answer"]))
    counts = Counter()
    for row in rows:
        if row["type"] != "describe":
            said = normalise(row["prediction"])
            counts[row["type"], normalise(row["answer"]), said if said in answers[row["type"]] else "(other)"] += 1
    order = {kind: i for i, kind in enumerate(QUESTION_TYPES)}
    ranked = sorted(counts.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0][1], -item[1]))
    return [{"type": kind, "answer": answer, "prediction": said, "count": n} for (kind, answer, said), n in ranked]

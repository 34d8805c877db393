"""Held-out accuracy on synthetic shape videos (issue 17): scoring.py (per-type scoring), run.py (`evaluate`: the
engine over a dataset, one run per visual encoder, accuracy against visual tokens), cli.py (`dynfocus-infer eval`)."""
from .run import evaluate
from .scoring import accuracy_by_type, answer_blind, confusion, is_correct, normalise

__all__ = ["accuracy_by_type", "answer_blind", "confusion", "evaluate", "is_correct", "normalise"]

"""The question templates of issue 17 and their answers, read off a scene.

Questions are asked only where the answer is defined: the colour of a shape kind that appears once, the shape of a
colour that appears once; every shape's direction (each video's (shape, colour) pairs are distinct).
"""
from __future__ import annotations

from collections import Counter

from .scene import STILL, Scene

QUESTION_TYPES = ("colour", "shape", "direction", "count", "brief", "describe")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def sentence(colour: str, kind: str, direction: str) -> str:
    """One shape's sentence of "Describe the video."."""
    motion = "does not move" if direction == STILL else f"moves {direction}"
    return f"A {colour} {kind} {motion}."


def questions_for(scene: Scene) -> list[dict]:
    """[{"type", "question", "answer"}] for every template that applies to `scene`, in QUESTION_TYPES order."""
    kinds = Counter(s.kind for s in scene.shapes)
    colours = Counter(s.colour for s in scene.shapes)
    items = []
    for shape in scene.shapes:
        if kinds[shape.kind] == 1:
            items.append(("colour", f"What colour is the {shape.kind}?", shape.colour))
    for shape in scene.shapes:
        if colours[shape.colour] == 1:
            items.append(("shape", f"What shape is the {shape.colour} object?", shape.kind))
    for shape in scene.shapes:
        items.append(("direction", f"Which way does the {shape.colour} {shape.kind} move?", shape.direction))
    items.append(("count", "How many shapes are there?", COUNT_WORDS[len(scene.shapes)]))
    if scene.brief_index is not None:
        items.append(("brief", "What colour was the shape that appeared only briefly?",
                      scene.shapes[scene.brief_index].colour))
    items.append(("describe", "Describe the video.",
                  " ".join(sentence(s.colour, s.kind, s.direction) for s in scene.shapes)))
    return [{"type": t, "question": q, "answer": a} for t, q, a in items]

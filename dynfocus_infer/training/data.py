"""Training batches drawn from the synthetic task family in memory: a new video for every example (the model must
generalise across the family, not memorise a set), its frames sampled as the engine samples an mp4, one question.

Example i of step s is video s * batch_size + i of the data seed, and its question is chosen by a generator seeded
with (seed, video, 1): a batch depends only on (seed, step, batch_size), so a resumed run sees the batches an
uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..preprocess import preprocess_frames
from ..synthetic import sample_clip
from .probe import scene_targets


@dataclass
class Example:
    """One training example: preprocessed frames [T, 3, S, S], the question and its answer."""

    pixels: torch.Tensor
    question: str
    answer: str
    kind: str
    targets: dict                  # the scene probe's labels (training/probe.scene_targets)
    named_colour: Optional[str] = None   # the colour of the shape the question names (colour, shape, direction)
    named_frames: Optional[torch.Tensor] = None  # bool [T]: the frames that show that shape


def choose_question(questions: list, rng: np.random.Generator) -> dict:
    """A question type uniformly among those the video has, then one question of it: each type is trained about
    equally often, however many questions of it a video holds."""
    kinds = sorted({q["type"] for q in questions})
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [q for q in questions if q["type"] == kind]
    return of_kind[int(rng.integers(len(of_kind)))]


def named_shape(scene, item: dict) -> Optional[int]:
    """The index of the shape a colour, shape or direction question names (by its unique kind, its unique colour, or
    both); None for the other question types."""
    templates = {"colour": "What colour is the {kind}?", "shape": "What shape is the {colour} object?",
                 "direction": "Which way does the {colour} {kind} move?"}
    if item["type"] not in templates:
        return None
    return next(i for i, s in enumerate(scene.shapes)
                if item["question"] == templates[item["type"]].format(kind=s.kind, colour=s.colour))


def example(seed: int, index: int, num_frames: int, image_size: int, patch_grid: int = 0) -> Example:
    """Video `index` of `seed` with one question; patch_grid > 0 adds the patch labels of the ViT's grid."""
    clip = sample_clip(seed, index, num_frames)
    item = choose_question(clip.questions, np.random.default_rng([seed, index, 1]))
    pixels = preprocess_frames(torch.from_numpy(clip.frames), image_size=image_size)
    named = named_shape(clip.scene, item)
    colour = frames = None
    if named is not None:
        colour = clip.scene.shapes[named].colour
        frames = torch.tensor([clip.scene.visible(named, int(f)) for f in clip.frame_indices], dtype=torch.bool)
    return Example(pixels, item["question"], item["answer"], item["type"],
                   scene_targets(clip.scene, clip.frame_indices, patch_grid), colour, frames)


def training_batch(seed: int, step: int, batch_size: int, num_frames: int, image_size: int,
                   num_videos: int = 0, probe_videos: int = 0, patch_grid: int = 0) -> list[Example]:
    """The examples of step `step` (module doc): batch_size answered by the LLM, then probe_videos more seen by the
    scene probe only (their indices follow every answered video of the run: the two sets never share a video).
    num_videos > 0 cycles through that many videos only (overfitting tests and ablations); 0 draws a new video every
    time."""
    first = step * batch_size
    indices = [first + i for i in range(batch_size)]
    indices += [(1 << 40) + step * probe_videos + i for i in range(probe_videos)]
    if num_videos:
        indices = [i % num_videos for i in indices]
    return [example(seed, i, num_frames, image_size, patch_grid) for i in indices]

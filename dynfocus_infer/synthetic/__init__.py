"""Synthetic videos of coloured shapes with questions and answers (issue 17): the training and evaluation data of
the default model. scene.py samples what a video shows, render.py draws it, questions.py asks about it, dataset.py
writes mp4 + JSONL or hands frames to the trainer in memory."""
from .dataset import SyntheticClip, encode_mp4, sample_clip, write_dataset
from .questions import QUESTION_TYPES, questions_for
from .render import render_frames
from .scene import COLOURS, SHAPES, STILL, Scene, Shape, sample_scene

__all__ = ["COLOURS", "QUESTION_TYPES", "SHAPES", "STILL", "Scene", "Shape", "SyntheticClip", "encode_mp4",
           "questions_for", "render_frames", "sample_clip", "sample_scene", "write_dataset"]

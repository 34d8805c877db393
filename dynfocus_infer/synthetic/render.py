"""Scenes to pixels: uint8 RGB frames drawn with numpy masks (one vectorised mask per shape and frame, over the
shape's bounding box only), as a whole array for chosen frames or frame by frame for the encoder."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .scene import COLOURS, Scene, Shape


def shape_mask(shape: Shape, frame: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` at `frame` over pixel centres xs [1, W'] and ys [H', 1] (pixel i covers [i, i+1)).
    A triangle points up: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)."""
    cx, cy = shape.centre(frame)
    r = shape.radius
    dx, dy = xs - cx, ys - cy
    if shape.kind == "circle":
        return dx * dx + dy * dy <= r * r
    if shape.kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def draw_frame(scene: Scene, frame: int, out: np.ndarray) -> np.ndarray:
    """Draws frame `frame` of `scene` into out [H, W, 3] uint8 and returns it."""
    out[:] = scene.background
    for i, shape in enumerate(scene.shapes):
        if not scene.visible(i, frame):
            continue
        cx, cy = shape.centre(frame)
        r = shape.radius
        x0, x1 = max(0, int(cx - r) - 1), min(scene.width, int(cx + r) + 2)
        y0, y1 = max(0, int(cy - r) - 1), min(scene.height, int(cy + r) + 2)
        xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
        ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
        box = out[y0:y1, x0:x1]
        box[shape_mask(shape, frame, xs, ys)] = COLOURS[shape.colour]
    return out


def render_frames(scene: Scene, frames: Iterable[int]) -> np.ndarray:
    """Frames [n, H, W, 3] uint8 at the given indices (the in-memory path: only the frames a model samples)."""
    frames = list(frames)
    out = np.empty((len(frames), scene.height, scene.width, 3), dtype=np.uint8)
    for row, frame in enumerate(frames):
        draw_frame(scene, int(frame), out[row])
    return out


def iter_frames(scene: Scene) -> Iterator[np.ndarray]:
    """Every frame in order, one buffer reused (the encoder copies each frame before the next is drawn)."""
    buffer = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    for frame in range(scene.num_frames):
        yield draw_frame(scene, frame, buffer)

"""Seeded scenes of the synthetic task family (issue 17): what a video shows, before any pixel is drawn.

A scene is a plain background and one to three solid shapes (circle, square, triangle) in six colours, each still or
moving in a straight line left, right, up or down; some scenes hold a shape visible for only 10-25% of the frames.
Video `index` of seed `seed` depends on nothing else (`numpy.random.default_rng([seed, index])`), so a dataset of N
videos is a prefix of one of N + 1, and two seeds give unrelated videos.

Every shape stays, for the whole video, inside the centred square of side min(width, height): the engine centre-crops
frames to a square (CLIP preprocessing), so what the answers talk about is always what the model sees. Shapes never
overlap, so each one's colour is what lies at its centre.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 30, 30), "green": (30, 190, 50), "blue": (30, 70, 230), "yellow": (240, 220, 30),
           "white": (250, 250, 250), "purple": (150, 40, 200)}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
STILL = "it does not move"

MIN_SIZE, MAX_SIZE = (160, 120), (640, 480)
MIN_SECONDS, MAX_SECONDS = 2.0, 15.0
MIN_FPS, MAX_FPS = 8, 30
BRIEF_FRACTION = (0.10, 0.25)
SHAPE_RADIUS = (0.08, 0.16)        # half-extent as a fraction of the visible square's side
TRAVEL = (0.30, 0.50)              # distance a moving shape covers over the video, same unit
MARGIN = 0.03                      # kept free at the square's border and between shapes
BACKGROUND_DISTANCE = 110.0        # least RGB distance of the background from every shape colour
STILL_PROBABILITY = 0.35
BRIEF_PROBABILITY = 0.3


@dataclass(frozen=True)
class Shape:
    """One shape: its centre at frame f is start + velocity * f (pixels), drawn in frames [first, last)."""

    kind: str
    colour: str
    radius: float
    start: tuple
    velocity: tuple
    direction: str                 # a key of DIRECTIONS, or STILL
    first: int
    last: int

    def centre(self, frame) -> tuple:
        return self.start[0] + self.velocity[0] * frame, self.start[1] + self.velocity[1] * frame


@dataclass(frozen=True)
class Scene:
    """A whole video: size, timing, background and shapes (`brief_index`: the briefly visible shape, or None)."""

    index: int
    width: int
    height: int
    fps: int
    num_frames: int
    background: tuple
    shapes: tuple
    brief_index: Optional[int]

    @property
    def square(self) -> tuple:
        """(left, top, side) of the centred square every shape stays in."""
        side = min(self.width, self.height)
        return (self.width - side) / 2, (self.height - side) / 2, side

    def visible(self, shape_index: int, frame: int) -> bool:
        shape = self.shapes[shape_index]
        return shape.first <= frame < shape.last

    def to_dict(self) -> dict:
        return asdict(self)


def _background(rng: np.random.Generator) -> tuple:
    colours = np.array(list(COLOURS.values()), dtype=np.float64)
    while True:
        rgb = rng.integers(0, 256, size=3)
        if np.sqrt(((colours - rgb) ** 2).sum(1)).min() >= BACKGROUND_DISTANCE:
            return tuple(int(c) for c in rgb)


def _kinds_and_colours(rng: np.random.Generator, count: int) -> list:
    """`count` distinct (shape, colour) pairs: a direction question names each shape by both."""
    pairs = [(k, c) for k in SHAPES for c in COLOURS]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return [pairs[i] for i in chosen]


def _path(rng, side: float, left: float, top: float, radius: float, direction: str, num_frames: int):
    """(start, velocity) of a shape whose whole path stays inside the square, MARGIN from its border."""
    low, high = MARGIN * side + radius, (1 - MARGIN) * side - radius
    if direction == STILL:
        return (left + rng.uniform(low, high), top + rng.uniform(low, high)), (0.0, 0.0)
    travel = rng.uniform(*TRAVEL) * side
    dx, dy = DIRECTIONS[direction]
    along_low = low + (travel if dx + dy < 0 else 0.0)
    along = rng.uniform(along_low, along_low + (high - low - travel))
    across = rng.uniform(low, high)
    x, y = (along, across) if dx else (across, along)
    step = travel / max(1, num_frames - 1)
    return (left + x, top + y), (dx * step, dy * step)


def _overlap(a: Shape, b: Shape, side: float) -> bool:
    """Whether the squares around a and b (plus the margin) meet in any frame both show; paths are straight lines,
    so checking a few frames of the common window is exact enough for squares that far apart."""
    first, last = max(a.first, b.first), min(a.last, b.last)
    if first >= last:
        return False
    gap = a.radius + b.radius + MARGIN * side
    for frame in np.linspace(first, last - 1, 9):
        (ax, ay), (bx, by) = a.centre(frame), b.centre(frame)
        if abs(ax - bx) < gap and abs(ay - by) < gap:
            return True
    return False


def sample_scene(seed: int, index: int) -> Scene:
    """Video `index` of the dataset of seed `seed` (see the module doc)."""
    rng = np.random.default_rng([seed, index])
    width = int(rng.integers(MIN_SIZE[0] // 2, MAX_SIZE[0] // 2 + 1)) * 2    # H.264 4:2:0 needs even sizes
    height = int(rng.integers(MIN_SIZE[1] // 2, MAX_SIZE[1] // 2 + 1)) * 2
    fps = int(rng.integers(MIN_FPS, MAX_FPS + 1))
    num_frames = max(2, round(rng.uniform(MIN_SECONDS, MAX_SECONDS) * fps))
    background = _background(rng)
    count = int(rng.integers(1, 4))
    brief_index = int(rng.integers(0, count)) if count >= 2 and rng.random() < BRIEF_PROBABILITY else None
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    while True:  # rejection sampling of non-overlapping placements: a few tries at most for three shapes
        shapes = []
        for i, (kind, colour) in enumerate(_kinds_and_colours(rng, count)):
            radius = rng.uniform(*SHAPE_RADIUS) * side
            first, last = 0, num_frames
            direction = STILL if rng.random() < STILL_PROBABILITY else str(rng.choice(list(DIRECTIONS)))
            if i == brief_index:  # a brief shape stays still: in 10-25% of the frames no direction is visible
                direction = STILL
                shown = round(rng.uniform(*BRIEF_FRACTION) * num_frames)
                shown = int(min(max(shown, np.ceil(BRIEF_FRACTION[0] * num_frames)),
                                np.floor(BRIEF_FRACTION[1] * num_frames)))
                first = int(rng.integers(0, num_frames - shown + 1))
                last = first + shown
            start, velocity = _path(rng, side, left, top, radius, direction, num_frames)
            shapes.append(Shape(kind, colour, float(radius), tuple(map(float, start)), tuple(map(float, velocity)),
                                direction, first, last))
        if not any(_overlap(a, b, side) for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            return Scene(index, width, height, fps, num_frames, background, tuple(shapes), brief_index)

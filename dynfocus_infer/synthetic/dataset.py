"""Synthetic videos on disk (H.264 mp4 through PyAV + question/answer JSONL) and in memory (the frames a model
samples + their questions), from the same seeded scenes.

On disk, `write_dataset(out, count, seed)` writes
  out/videos/NNNNNN.mp4   one video per scene
  out/qa.jsonl            one line per question: {"id", "video", "question", "answer", "type", "index"}; "video" is
                          relative to out/, so the file is also an input of `dynfocus-infer batch`
  out/scenes.jsonl        one line per video: the scene (ground truth for tests and analyses)
Every file is written to a temporary name and renamed, so an interrupted run leaves no half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import RequestError
from ..video_decode import uniform_frame_indices
from .questions import questions_for
from .render import iter_frames, render_frames
from .scene import Scene, sample_scene

CRF = 18  # visually lossless for flat colours; a 15 s 640x480 video stays well under 1 MB


@dataclass
class SyntheticClip:
    """One video as a model samples it: frames [T, H, W, 3] uint8 at the engine's uniform indices, and its QA."""

    scene: Scene
    frame_indices: np.ndarray
    frames: np.ndarray
    questions: list


def sample_clip(seed: int, index: int, num_frames: int) -> SyntheticClip:
    """Video `index` of seed `seed` without encoding it: the `num_frames` frames the engine would sample uniformly
    from its mp4 (video_decode.uniform_frame_indices), drawn directly."""
    scene = sample_scene(seed, index)
    indices = uniform_frame_indices(scene.num_frames, num_frames)
    return SyntheticClip(scene, indices, render_frames(scene, indices), questions_for(scene))


def _readable_by_all(path: str) -> None:
    """mkstemp creates files 0600; a dataset's files get the mode a plain open() would give them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def encode_mp4(scene: Scene, path: Path, crf: int = CRF) -> None:
    """Every frame of `scene` as H.264 (yuv420p) at the scene's fps, written to a temporary file then renamed."""
    import av

    path = Path(path)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".mp4")
    os.close(handle)
    _readable_by_all(staging)
    try:
        with av.open(staging, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=scene.fps)
            stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for frame in iter_frames(scene):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _write_lines(path: Path, rows) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    _readable_by_all(staging)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    os.replace(staging, path)


def check_dataset_args(out, count: int, seed: int) -> Path:
    """The output folder, or a RequestError naming the bad option (judged before any video is drawn)."""
    if not isinstance(count, int) or count < 1:
        raise RequestError(f"--count {count!r} is invalid: expected an integer >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise RequestError(f"--seed {seed!r} is invalid: expected an integer >= 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RequestError(f"--out {str(out)!r} exists and is not a folder")
    if (out / "qa.jsonl").exists():
        raise RequestError(f"--out {str(out)!r} already holds a dataset (qa.jsonl): choose an empty folder")
    return out


def write_dataset(out, count: int, seed: int, *, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Writes videos 0..count-1 of seed `seed` to `out` (module doc); returns {"videos", "questions", "out"}."""
    out = check_dataset_args(out, count, seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    qa_rows, scene_rows = [], []
    for index in range(count):
        scene = sample_scene(seed, index)
        video = f"videos/{index:06d}.mp4"
        encode_mp4(scene, out / video)
        scene_rows.append({"video": video, "seed": seed, **scene.to_dict()})
        for item in questions_for(scene):
            qa_rows.append({"id": f"{index:06d}-{len(qa_rows):07d}", "video": video, "index": index, **item})
        if progress is not None:
            progress(1)
    _write_lines(out / "scenes.jsonl", scene_rows)
    _write_lines(out / "qa.jsonl", qa_rows)  # last: its presence marks a complete dataset
    return {"videos": count, "questions": len(qa_rows), "out": str(out)}

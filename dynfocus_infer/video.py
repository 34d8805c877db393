"""Video input: decoding and sampling (video_decode.py), a decode thread pool, GPU preprocessing
(preprocess.py), and a deterministic synthetic video for tests and the bundled sample.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .errors import ConfigError, RequestError, is_real
from .preprocess import CLIP_MEAN, CLIP_STD, preprocess_frames, resize_output_size
from .video_decode import (DEFAULT_NUM_FRAMES, DEFAULT_TIMEOUT_S, VideoFrames, VideoSource, available_backends,
                           SamplingSpec, decode_video, fps_frame_indices, uniform_frame_indices)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_NUM_FRAMES", "DEFAULT_TIMEOUT_S", "DecodeResult", "VideoFrames",
    "VideoLoader", "VideoSource", "available_backends", "decode_video", "fps_frame_indices",
    "preprocess_frames", "render_test_frames", "resize_output_size", "uniform_frame_indices",
    "write_test_video",
]


@dataclass
class DecodeResult:
    """One video's outcome: frames, or the error that stopped it (never both)."""
    index: int
    source: VideoSource
    frames: Optional[VideoFrames]
    error: Optional[Exception]

    @property
    def ok(self) -> bool:
        return self.error is None


class VideoLoader:
    """Decodes videos on a thread pool so decoding overlaps the caller's GPU work (DESIGN section 3).

    decord and PyAV release the GIL while decoding, so threads decode in parallel. Each video gets its own
    timeout (decode_video's timeout_s); a failure of one video is reported in its DecodeResult and never
    stops the others. Iterate `map(sources)` (submission order) or `results(ordered=False)` (as completed).
    With pin_memory=True and CUDA present, frames come back in pinned memory so the copy to the GPU in
    preprocess_frames is asynchronous. With image_size, frames are resized to it (on resize_device) while they
    decode (decode_video), so a long video is never held at its source resolution.
    """

    def __init__(self, *, num_workers: Optional[int] = None, num_frames: Optional[int] = None,
                 fps: Optional[float] = None, max_frames: Optional[int] = None, backend: str = "auto",
                 timeout_s: Optional[float] = DEFAULT_TIMEOUT_S, pin_memory: bool = False,
                 image_size: Optional[int] = None, resize_device: Optional[str] = None):
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if num_workers < 1:
            raise ConfigError(f"VideoLoader.num_workers must be >= 1, got {num_workers}")
        if timeout_s is not None and not (is_real(timeout_s) and timeout_s > 0):
            raise ConfigError(f"VideoLoader.timeout_s must be a number of seconds > 0 (None waits forever), "
                              f"got {timeout_s!r}")
        try:  # bad sampling arguments fail here, not per video
            SamplingSpec.from_args(num_frames, fps, max_frames, image_size, resize_device)
        except RequestError as error:
            raise ConfigError(str(error)) from error
        self._decode_kwargs = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, backend=backend,
                                   timeout_s=timeout_s, image_size=image_size, resize_device=resize_device)
        self._pin_memory = pin_memory and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="video-loader")
        self._pending: list[Future] = []
        self._num_submitted = 0

    def submit(self, source: VideoSource, **decode_overrides) -> int:
        """Queues one video (decode_overrides replace the loader's decode_video arguments); returns its index."""
        index = self._num_submitted
        self._num_submitted += 1
        kwargs = {**self._decode_kwargs, **decode_overrides}
        self._pending.append(self._pool.submit(self._decode_one, index, source, kwargs))
        return index

    def submit_future(self, source: VideoSource, **decode_overrides) -> Future:
        """Queues one video outside the results() bookkeeping: the caller polls or waits on the Future (a
        DecodeResult) itself, as the continuous-batching engine does, one request at a time."""
        kwargs = {**self._decode_kwargs, **decode_overrides}
        return self._pool.submit(self._decode_one, -1, source, kwargs)

    def results(self, ordered: bool = True) -> Iterator[DecodeResult]:
        """Yields the result of every video submitted so far, once: in submission order, or as each finishes.
        The videos are claimed now, not at the first next(), so a later submit() goes to a later call."""
        futures, self._pending = self._pending, []
        return (future.result() for future in (futures if ordered else as_completed(futures)))

    def map(self, sources: Iterable[VideoSource], ordered: bool = True) -> Iterator[DecodeResult]:
        """Submits every source at once, then yields results (see results())."""
        for source in sources:
            self.submit(source)
        return self.results(ordered)

    def close(self) -> None:
        """Drops queued work; decodes already running finish (or time out) on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "VideoLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _decode_one(self, index: int, source: VideoSource, kwargs: dict) -> DecodeResult:
        try:
            frames = decode_video(source, **kwargs)
            if self._pin_memory:
                frames.frames = frames.frames.pin_memory()
            return DecodeResult(index, source, frames, None)
        except Exception as error:  # any failure belongs to this video alone
            return DecodeResult(index, source, None, error)


# Background and shape colours of the synthetic scenes: far apart in RGB so scene changes are unmistakable.
_SCENE_BACKGROUNDS = np.array([[20, 30, 90], [200, 190, 60], [30, 140, 60], [150, 40, 120],
                               [230, 230, 230], [60, 60, 60]], dtype=np.float32)
_SCENE_SHAPES = np.array([[250, 80, 40], [40, 60, 220], [250, 250, 250], [90, 230, 220],
                          [200, 30, 30], [250, 200, 20]], dtype=np.float32)


def render_test_frames(num_frames: int = 64, height: int = 240, width: int = 320,
                       num_scenes: int = 4) -> np.ndarray:
    """Deterministic RGB frames uint8 [T, H, W, 3]: num_scenes equal-length scenes, each a distinct
    background with a vertical gradient and one moving shape (squares in even scenes, discs in odd ones),
    so temporal clustering has clear events to find. Built in one vectorised pass, no per-frame loop.
    """
    if num_frames < 1 or height < 8 or width < 8 or not 1 <= num_scenes <= len(_SCENE_BACKGROUNDS):
        raise ConfigError(f"render_test_frames: need num_frames >= 1, height and width >= 8, 1 <= num_scenes <= "
                          f"{len(_SCENE_BACKGROUNDS)}; got {num_frames}, {height}, {width}, {num_scenes}")
    t = np.arange(num_frames)
    scene = t * num_scenes // num_frames
    scene_start = (scene * num_frames + num_scenes - 1) // num_scenes
    scene_length = np.maximum(1, ((scene + 1) * num_frames + num_scenes - 1) // num_scenes - scene_start)
    progress = (t - scene_start) / scene_length                            # 0 -> 1 within each scene
    radius = max(3, min(height, width) // 6)
    # Even scenes move left to right, odd ones top-left to bottom-right.
    centre_x = radius + progress * (width - 2 * radius)
    centre_y = np.where(scene % 2 == 0, height / 2, radius + progress * (height - 2 * radius))
    ys = np.arange(height, dtype=np.float32)[None, :, None]
    xs = np.arange(width, dtype=np.float32)[None, None, :]
    dy = ys - centre_y[:, None, None]
    dx = xs - centre_x[:, None, None]
    in_square = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    in_disc = dx * dx + dy * dy <= radius * radius
    in_shape = np.where((scene % 2 == 0)[:, None, None], in_square, in_disc)
    gradient = 0.75 + 0.25 * (ys / (height - 1))[..., None]                # [1, H, 1, 1]
    background = _SCENE_BACKGROUNDS[scene][:, None, None, :] * gradient
    frames = np.where(in_shape[..., None], _SCENE_SHAPES[scene][:, None, None, :], background)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def write_test_video(path: Union[str, os.PathLike], *, num_frames: int = 64, fps: int = 8, height: int = 240,
                     width: int = 320, num_scenes: int = 4, codec: str = "libx264", faststart: bool = False,
                     crf: int = 23) -> np.ndarray:
    """Encodes render_test_frames(...) to `path` with PyAV (yuv420p, so height and width must be even);
    returns the frames written. faststart=True moves the index (moov) to the front, which makes a truncated
    copy still list every frame: the over-reporting case decoders must survive. Deterministic: one encoder
    thread, fixed settings.
    """
    import av

    if height % 2 or width % 2:
        raise ConfigError(f"write_test_video: yuv420p needs even height and width, got {height}x{width}")
    frames = render_test_frames(num_frames, height, width, num_scenes)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(os.fspath(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:  # the encoder takes one frame at a time
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return frames

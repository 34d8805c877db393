"""Video decoding (decord, PyAV, in-memory frames) and frame sampling (DESIGN section 3, first row).

Sampling follows the authors' evaluation scripts (`llamavid/eval/model_*.py` in Simon98-AI/DynFocus):
- fps sampling keeps every `round(source_fps / fps)`-th frame starting at frame 0 (index based, not time based);
- uniform sampling of K frames from n picks `round((i + 1) * n / K - 1)` for i = 0..K-1 with Python's
  round-half-to-even, so the last frame is always kept (the official 200-frame LV-Bench/VideoMME rule).
A video with fewer frames than asked gives all its frames.
"""
from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import RequestError, VideoDecodeError, is_integer, is_real
from .frame_collector import FrameCollector
from .native_logs import decoder_stderr_to_logging, quiet_decord

VideoSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]
DEFAULT_NUM_FRAMES = 16
DEFAULT_TIMEOUT_S = 120.0
_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


@dataclass
class VideoFrames:
    """Sampled frames of one video.

    frames: uint8 [T, H, W, 3] RGB on CPU (H = W = image_size when decoded with one);
    frame_indices: int64 [T], positions in the decoded stream;
    source_fps / duration_s: None when unknown (in-memory frames without a given fps);
    num_source_frames: frames the backend actually decoded or found; backend: "decord" | "pyav" | "memory".
    """
    frames: torch.Tensor
    frame_indices: torch.Tensor
    source_fps: Optional[float]
    duration_s: Optional[float]
    num_source_frames: int
    backend: str

    @property
    def timestamps_s(self) -> Optional[torch.Tensor]:
        """Presentation time of every sampled frame in seconds (constant frame rate assumed)."""
        if not self.source_fps:
            return None
        return self.frame_indices.double() / self.source_fps


def uniform_frame_indices(num_source_frames: int, num_frames: int) -> np.ndarray:
    """K = num_frames indices out of n: round((i + 1) * n / K - 1), all n frames when n <= K (module doc)."""
    if num_source_frames <= num_frames:
        return np.arange(num_source_frames, dtype=np.int64)
    scale = num_source_frames / num_frames
    # np.round is round-half-to-even like Python's round() in the official scripts.
    return np.round(np.arange(1, num_frames + 1, dtype=np.float64) * scale - 1).astype(np.int64)


def fps_frame_indices(num_source_frames: int, source_fps: float, fps: float,
                      max_frames: Optional[int] = None) -> np.ndarray:
    """Every round(source_fps / fps)-th frame from frame 0; then uniform down to max_frames if given."""
    stride = max(1, round(source_fps / fps))
    indices = np.arange(0, num_source_frames, stride, dtype=np.int64)
    if max_frames is not None and len(indices) > max_frames:
        indices = indices[uniform_frame_indices(len(indices), max_frames)]
    return indices


@dataclass(frozen=True)
class SamplingSpec:
    """Exactly one of num_frames (uniform), fps (fixed rate; max_frames caps the count uniformly) or frame_indices
    (these frames of the stream, increasing: random access, as focus inference's dense frames); image_size: frames
    resized and centre-cropped to it while decoding (frame_collector.py), on resize_device (default CPU); None keeps
    the source resolution."""
    num_frames: Optional[int] = None
    fps: Optional[float] = None
    max_frames: Optional[int] = None
    image_size: Optional[int] = None
    resize_device: Optional[str] = None
    frame_indices: Optional[tuple] = None

    @classmethod
    def from_args(cls, num_frames: Optional[int], fps: Optional[float], max_frames: Optional[int],
                  image_size: Optional[int] = None, resize_device: Optional[str] = None,
                  frame_indices=None) -> "SamplingSpec":
        if frame_indices is not None:
            return cls._by_index(num_frames, fps, max_frames, image_size, resize_device, frame_indices)
        if num_frames is not None and fps is not None:
            raise RequestError(f"give num_frames ({num_frames}) or fps ({fps}), not both")
        if num_frames is None and fps is None:
            num_frames = DEFAULT_NUM_FRAMES
        if num_frames is not None and (not is_integer(num_frames) or num_frames < 1):
            raise RequestError(f"num_frames must be a positive int, got {num_frames!r}")
        if fps is not None and not (is_real(fps) and 0 < fps < float("inf")):
            raise RequestError(f"fps must be a number > 0, got {fps!r}")
        if max_frames is not None and (fps is None or not is_integer(max_frames) or max_frames < 1):
            raise RequestError(f"max_frames ({max_frames!r}) must be a positive int and only goes with fps")
        if image_size is not None and (not is_integer(image_size) or image_size < 1):
            raise RequestError(f"image_size must be a positive int (or None for the source resolution), "
                               f"got {image_size!r}")
        return cls(None if num_frames is None else int(num_frames), None if fps is None else float(fps),
                   None if max_frames is None else int(max_frames), None if image_size is None else int(image_size),
                   None if resize_device is None else str(resize_device))

    @classmethod
    def _by_index(cls, num_frames, fps, max_frames, image_size, resize_device, frame_indices) -> "SamplingSpec":
        if num_frames is not None or fps is not None or max_frames is not None:
            raise RequestError("frame_indices choose the frames themselves: give them without num_frames, fps or "
                               "max_frames")
        indices = tuple(int(i) for i in frame_indices)
        if not indices or indices[0] < 0 or any(b <= a for a, b in zip(indices, indices[1:])):
            raise RequestError(f"frame_indices must be non-empty, >= 0 and strictly increasing, got "
                               f"{list(indices)[:20]}")
        base = cls.from_args(None, None, None, image_size, resize_device)
        return cls(None, None, None, base.image_size, base.resize_device, indices)

    def indices(self, num_source_frames: int, source_fps: Optional[float], what: str) -> np.ndarray:
        if self.frame_indices is not None:
            if self.frame_indices[-1] >= num_source_frames:
                raise VideoDecodeError(f"{what}: frame {self.frame_indices[-1]} asked for, but the video has "
                                       f"{num_source_frames} frames")
            return np.asarray(self.frame_indices, dtype=np.int64)
        if self.num_frames is not None:
            return uniform_frame_indices(num_source_frames, self.num_frames)
        if not source_fps or not np.isfinite(source_fps):
            raise VideoDecodeError(f"{what}: fps sampling asked for, but the source frame rate is unknown "
                                   f"({source_fps!r}); pass source_fps= or sample with num_frames=")
        return fps_frame_indices(num_source_frames, source_fps, self.fps, self.max_frames)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def video_path_problem(path: str) -> Optional[str]:
    """Why `path` cannot be a video file, or None: checked with stat only (a FIFO is never opened), so callers can
    reject a request before loading a model."""
    if _URL.match(path):
        return "is a URL; only local video files are read (download it first)"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)!r}, which does not exist)"
        return "does not exist (no such file); check the path"
    except OSError as error:  # a symlink loop (ELOOP), a component that is not a folder, no permission
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a video file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        return f"is not a regular file ({kind})"
    if info.st_size == 0:
        return "is empty (0 bytes); re-download or re-encode it"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def _check_file(path: str) -> None:
    problem = video_path_problem(path)
    if problem is not None:
        raise VideoDecodeError(f"{path}: {problem}")


def _decode_with_decord(path: str, spec: SamplingSpec) -> VideoFrames:
    import decord

    quiet_decord()
    try:
        # decord's C++ prints open failures to fd 2 itself; they go to the logging module (native_logs.py). Only
        # the open is wrapped: decoding logs through FFmpeg (silenced) and could hang, holding fd 2 captured.
        with decoder_stderr_to_logging():
            reader = decord.VideoReader(path, ctx=decord.cpu(0))
        num_source_frames = len(reader)
        source_fps = float(reader.get_avg_fps())
    # decord wraps open failures in RuntimeError, and decodes its C++ error text as strict UTF-8: a message quoting
    # bytes of a garbage file raises UnicodeDecodeError instead (seen on random bytes in CI).
    except (decord.DECORDError, RuntimeError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"{path}: not a readable video (decord: {_first_line(error)})") from error
    if num_source_frames == 0:
        raise VideoDecodeError(f"{path}: the container holds zero video frames")
    indices = spec.indices(num_source_frames, source_fps, path)
    collector = FrameCollector(len(indices), spec.image_size, device=spec.resize_device)
    try:
        start, step = 0, 1  # the first frame alone: its size sets the chunk length of the rest
        while start < len(indices):  # a chunk at source resolution at a time, never the whole video
            chunk = reader.get_batch(indices[start:start + step].tolist()).asnumpy()
            if spec.image_size is not None:
                # Left alone, decord keeps decoding ahead in the background while the chunk is resized and holds
                # every frame it decodes at full resolution (dmlc/decord#157, #208; measured: 1.6 GB for 600 frames
                # of 720p). A seek stops it; the next get_batch seeks where it needs anyway.
                reader.seek(0)
            collector.add(chunk)
            start += step
            step = collector.frames_per_chunk(chunk.shape[1], chunk.shape[2])
        frames = collector.result()
    except (decord.DECORDError, RuntimeError, UnicodeDecodeError) as error:
        # Typical of a truncated file whose header still promises every frame.
        raise VideoDecodeError(f"{path}: decord lists {num_source_frames} frames but could not decode "
                               f"the sampled ones ({_first_line(error)}); the file may be truncated") from error
    return VideoFrames(frames, torch.from_numpy(indices), source_fps,
                       num_source_frames / source_fps if source_fps > 0 else None, num_source_frames, "decord")


def _decode_with_pyav(path: str, spec: SamplingSpec) -> VideoFrames:
    """Takes the frame count from the container (or counts packets), samples, then decodes once keeping
    only the sampled frames. PyAV hands out frames one by one, so this fallback loops in Python; decord,
    the default, decodes a batch of indices in C++.

    If fewer frames decode than were listed (truncated or corrupt tail), sampling is redone over the
    frames that did decode and the file decoded again, so the result never points past the real end.
    """
    import av

    try:
        with av.open(path, metadata_errors="replace") as container:  # tags may not be UTF-8
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: the container has no video stream (streams: "
                                       f"{[s.type for s in container.streams]})")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
            # The container's count when it has one (mp4 indexes every frame); else count packets.
            num_listed = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"{path}: not a readable video (PyAV: {_first_line(error)})") from error
    if num_listed == 0:
        raise VideoDecodeError(f"{path}: the video stream holds zero frames; the file is truncated or empty")
    num_source_frames = num_listed
    indices = spec.indices(num_source_frames, source_fps, path)
    frames, num_decoded = _pyav_decode_indices(path, indices, spec)
    if frames is None:
        if num_decoded == 0:
            raise VideoDecodeError(f"{path}: zero frames could be decoded ({num_listed} listed); "
                                   "the file is truncated or corrupt")
        num_source_frames = num_decoded
        indices = spec.indices(num_source_frames, source_fps, path)
        frames, _ = _pyav_decode_indices(path, indices, spec)
        if frames is None:
            raise VideoDecodeError(f"{path}: decoding is not repeatable (frame count changed between passes)")
    duration = num_source_frames / source_fps if source_fps else None
    return VideoFrames(frames, torch.from_numpy(indices), source_fps, duration, num_source_frames, "pyav")


def _pyav_decode_indices(path: str, indices: np.ndarray, spec: SamplingSpec) -> tuple[Optional[torch.Tensor], int]:
    """Decodes in presentation order up to the last wanted index, handing the wanted frames to a FrameCollector a
    chunk at a time; returns (frames or None, frames decoded)."""
    import av

    wanted = set(indices.tolist())
    last_wanted = int(indices[-1])
    collector = FrameCollector(len(indices), spec.image_size, device=spec.resize_device)
    chunk: list[np.ndarray] = []
    num_decoded = 0
    try:
        with av.open(path, metadata_errors="replace") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if num_decoded in wanted:
                    chunk.append(frame.to_ndarray(format="rgb24"))
                    if len(chunk) >= collector.frames_per_chunk(frame.height, frame.width):
                        collector.add(np.stack(chunk))
                        chunk.clear()
                num_decoded += 1
                if num_decoded > last_wanted:
                    if chunk:
                        collector.add(np.stack(chunk))
                    return collector.result(), num_decoded
    except av.FFmpegError:
        pass  # A corrupt tail: keep what decoded; the caller resamples over num_decoded frames.
    return None, num_decoded


def _decode_in_memory(frames: Union[np.ndarray, torch.Tensor], spec: SamplingSpec,
                      source_fps: Optional[float]) -> VideoFrames:
    # A contiguous copy of a numpy view such as frames[..., ::-1] (BGR -> RGB): torch rejects negative strides.
    tensor = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[-1] != 3 or 0 in tensor.shape[1:3]:
        raise RequestError(f"in-memory frames must be uint8 [T, H, W, 3] with H, W >= 1, got {tensor.dtype} "
                           f"{list(tensor.shape)}")
    num_source_frames = tensor.shape[0]
    if num_source_frames == 0:
        raise VideoDecodeError("in-memory video: zero frames")
    indices = torch.from_numpy(spec.indices(num_source_frames, source_fps, "in-memory video"))
    duration = num_source_frames / source_fps if source_fps else None
    if spec.image_size is None:  # the caller's frames, sampled: no copy beyond the sampled ones
        return VideoFrames(tensor[indices.to(tensor.device)].cpu(), indices, source_fps, duration, num_source_frames,
                           "memory")
    collector = FrameCollector(len(indices), spec.image_size, device=spec.resize_device or str(tensor.device))
    step = collector.frames_per_chunk(tensor.shape[1], tensor.shape[2])
    for start in range(0, len(indices), step):
        collector.add(tensor[indices[start:start + step].to(tensor.device)])
    return VideoFrames(collector.result(), indices, source_fps, duration, num_source_frames, "memory")


_BACKENDS: dict[str, Callable[[str, SamplingSpec], VideoFrames]] = {
    "decord": _decode_with_decord,
    "pyav": _decode_with_pyav,
}


def available_backends() -> list[str]:
    """Installed backends in preference order (decord first: faster random access)."""
    found = []
    for name, module in (("decord", "decord"), ("pyav", "av")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def _backend_chain(backend: str) -> Sequence[str]:
    if backend == "auto":
        chain = available_backends()
        if not chain:
            raise VideoDecodeError("no video backend installed; pip install 'dynfocus-infer[video]' (av, decord)")
        return chain
    if backend not in _BACKENDS:
        raise RequestError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    return [backend]


def _decode_file(path: str, spec: SamplingSpec, backend: str) -> VideoFrames:
    """Tries the backends of the chain in order; "auto" falls back to PyAV when decord fails."""
    _check_file(path)
    errors = []
    for name in _backend_chain(backend):
        try:
            return _BACKENDS[name](path, spec)
        except ImportError as error:
            errors.append(VideoDecodeError(f"{path}: backend {name} is not installed ({error})"))
        except VideoDecodeError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    raise VideoDecodeError("; ".join(str(error) for error in errors)) from errors[-1]


def _run_with_timeout(work: Callable[[], VideoFrames], timeout_s: float, what: str) -> VideoFrames:
    """Runs `work` on a daemon thread and gives up after timeout_s.

    A hung decoder cannot be interrupted from Python; the daemon thread is abandoned (it never blocks
    interpreter exit, unlike a ThreadPoolExecutor worker would).
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller's thread, re-raised there
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"video-decode:{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise VideoDecodeError(f"{what}: decoding did not finish within {timeout_s:g} s (the container may "
                               "over-report its frame count); try backend='pyav' or re-encode the file")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def decode_video(source: VideoSource, *, num_frames: Optional[int] = None, fps: Optional[float] = None,
                 max_frames: Optional[int] = None, backend: str = "auto",
                 timeout_s: Optional[float] = DEFAULT_TIMEOUT_S,
                 source_fps: Optional[float] = None, image_size: Optional[int] = None,
                 resize_device: Optional[str] = None, frame_indices=None) -> VideoFrames:
    """Decodes and samples one video: a file path, or in-memory uint8 frames [T, H, W, 3].

    Exactly one of num_frames (uniform, default 16) or fps (e.g. 1.0; max_frames caps it uniformly, the
    authors' 200-frame long-video rule). backend: "auto" (decord if importable, PyAV on failure),
    "decord" or "pyav". source_fps only applies to in-memory frames. timeout_s=None waits forever.
    image_size: frames come back resized and centre-cropped to image_size x image_size, done chunk by chunk while
    decoding so memory grows with T x image_size^2, not with the source resolution (exactly what preprocess_frames
    would do to them; see frame_collector.py), on resize_device (default: the CPU); None keeps the source resolution.
    frame_indices: exactly these frames (increasing), instead of num_frames / fps: decord seeks to them; PyAV
    decodes up to the last one and keeps only them.
    Raises VideoDecodeError naming the file and the reason; RequestError for bad arguments.
    """
    spec = SamplingSpec.from_args(num_frames, fps, max_frames, image_size, resize_device, frame_indices)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _decode_in_memory(source, spec, source_fps)
    if not isinstance(source, (str, os.PathLike)):
        raise RequestError(f"video source must be a path or uint8 frames [T, H, W, 3], got {type(source).__name__}")
    path = os.fspath(source)
    _backend_chain(backend)  # argument errors surface here, not on the worker thread
    if timeout_s is None:
        return _decode_file(path, spec, backend)
    return _run_with_timeout(lambda: _decode_file(path, spec, backend), timeout_s, path)


def _first_line(error: BaseException) -> str:
    """The first line of a backend's message, without decord's "[hh:mm:ss] /src/file.cc:123: " prefixes; a message
    decord could not decode (not UTF-8) is its own bytes, decoded leniently."""
    message = error.object.decode("utf-8", "replace") if isinstance(error, UnicodeDecodeError) else str(error)
    text = _DECORD_LOG_PREFIX.sub("", message).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__

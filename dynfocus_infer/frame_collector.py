"""Where decoders put sampled frames: one preallocated uint8 tensor, filled chunk by chunk as frames decode.

With image_size set, each chunk is resized and centre-cropped (preprocess.resize_frames, exact) before it is stored,
so a request holds T x image_size^2 x 3 bytes plus one chunk at source resolution, whatever the source resolution:
600 frames of 720p take 90 MB instead of 1.6 GB. Without it, frames are stored as decoded.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .preprocess import resize_frames

# Float32 bytes of source frames resized at once (the resize works in float32; ~6 frames of 720p, 2 of 1080p).
RESIZE_CHUNK_BYTES = 64 << 20


class FrameCollector:
    """Collects num_frames frames [n, H, W, 3] in order, resizing them to image_size when given (see module doc),
    on `device` (default: where the frames are, the CPU)."""

    def __init__(self, num_frames: int, image_size: Optional[int] = None, chunk_bytes: Optional[int] = None,
                 device: Optional[str] = None):
        self.num_frames, self.image_size, self.device = num_frames, image_size, device
        self.chunk_bytes = RESIZE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self._frames: Optional[torch.Tensor] = None
        self._count = 0

    def frames_per_chunk(self, height: int, width: int) -> int:
        """How many source frames of this size a decoder should hand over at once."""
        if self.image_size is None:
            return max(1, self.num_frames)
        return max(1, self.chunk_bytes // (height * width * 3 * 4))

    def add(self, frames: Union[np.ndarray, torch.Tensor]) -> None:
        """Stores the next frames (uint8 [n, H, W, 3], any n), resized in chunks of frames_per_chunk."""
        frames = torch.as_tensor(frames)
        if self._count + frames.shape[0] > self.num_frames:
            raise ValueError(f"FrameCollector: {self._count + frames.shape[0]} frames for {self.num_frames} slots")
        step = self.frames_per_chunk(frames.shape[1], frames.shape[2])
        for start in range(0, frames.shape[0], step):
            chunk = frames[start:start + step]
            if self.image_size is not None:  # on `device` when given (a GPU resizes far faster), stored on the CPU
                chunk = resize_frames(chunk if self.device is None else chunk.to(self.device), self.image_size).cpu()
            if self._frames is None:
                self._frames = torch.empty((self.num_frames, *chunk.shape[1:]), dtype=torch.uint8)
            self._frames[self._count:self._count + chunk.shape[0]] = chunk
            self._count += chunk.shape[0]

    def result(self) -> torch.Tensor:
        """The frames [num_frames, h, w, 3]; every slot must have been filled."""
        if self._frames is None or self._count != self.num_frames:
            raise ValueError(f"FrameCollector: {self._count} of {self.num_frames} frames were added")
        return self._frames

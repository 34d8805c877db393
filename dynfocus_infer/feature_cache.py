"""An LRU cache of ViT features, so several questions about one video decode and encode it once."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import torch


def video_cache_key(video, num_frames: Optional[int], fps: Optional[float], max_frames: Optional[int]):
    """A key for a video file that changes when the file does; None for in-memory frames (not cached)."""
    if not isinstance(video, (str, os.PathLike)):
        return None
    try:
        stat = os.stat(video)
    except OSError:
        return None
    return (os.path.realpath(video), stat.st_mtime_ns, stat.st_size, num_frames, fps, max_frames)


class FeatureCache:
    """Up to `capacity` videos' ViT features [T, 257, C] (kept on their device) and their frame times, least recently
    used out first."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key) -> Optional[torch.Tensor]:
        if key is None or key not in self._entries:
            self.misses += key is not None
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def frame_times(self, key) -> Optional[tuple]:
        """The frame times stored with a video's features (SlowFocus's temporal embedding needs them), or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def __contains__(self, key) -> bool:
        return key is not None and key in self._entries

    def count_miss(self, key) -> None:
        """A lookup that found nothing, made without get (the engine checks `in` first and decodes on a miss)."""
        self.misses += key is not None

    def put(self, key, features: torch.Tensor, frame_times: Optional[tuple] = None) -> None:
        if key is None or self.capacity == 0:
            return
        self._entries[key] = (features, frame_times)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

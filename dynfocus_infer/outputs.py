"""What goes into and comes out of `LLM.generate`: requests, per-request outputs, token accounting, stream chunks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .errors import RequestError, is_integer, is_real
from .prompt import IMAGE_PLACEHOLDER

VideoInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, None]


@dataclass
class Request:
    """A question, about a video (a path, or uint8 frames [T, H, W, 3]) or about nothing (text only).

    num_frames / fps override the engine's frame sampling for this request (exactly one of them, or neither)."""

    question: str
    video: VideoInput = None
    request_id: Optional[str] = None
    num_frames: Optional[int] = None
    fps: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise RequestError(f"the question must be a non-empty string, got {self.question!r}")
        if IMAGE_PLACEHOLDER in self.question:
            raise RequestError(f"the question may not contain {IMAGE_PLACEHOLDER}: the engine places the video there "
                               f"itself; pass the video in the request's `video` field")
        if self.num_frames is not None and self.fps is not None:
            raise RequestError("a request takes num_frames or fps, not both")
        if self.num_frames is not None:
            if not is_integer(self.num_frames) or self.num_frames < 1:
                raise RequestError(f"num_frames = {self.num_frames!r}: expected an integer >= 1")
            self.num_frames = int(self.num_frames)
        if self.fps is not None:
            if not is_real(self.fps) or not 0 < self.fps < float("inf"):
                raise RequestError(f"fps = {self.fps!r}: expected a number > 0")
            self.fps = float(self.fps)

    @classmethod
    def coerce(cls, value) -> "Request":
        """A Request from a Request, a dict with the same fields, or a bare question string."""
        if isinstance(value, Request):
            return value
        if isinstance(value, str):
            return cls(question=value)
        if isinstance(value, dict):
            unknown = set(value) - {"question", "video", "request_id", "num_frames", "fps", "id"}
            if unknown:
                raise RequestError(f"unknown request fields {sorted(unknown)}: expected question, video, "
                                   f"request_id, num_frames, fps")
            data = dict(value)
            if "id" in data:
                data["request_id"] = str(data.pop("id"))
            if "question" not in data:
                raise RequestError("a request needs a 'question'")
            return cls(**data)
        raise RequestError(f"a request must be a Request, a dict or a question string, got {type(value).__name__}")


@dataclass
class TokenAccounting:
    """How many tokens the video cost, against what full tokens (every patch of every frame) would have cost."""

    frames: int = 0
    keyframes: int = 0
    visual_tokens: int = 0
    full_visual_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class RequestOutput:
    """One request's result. finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens
    reached, or the LLM context filled before it: then fewer tokens than max_tokens), or "error" (see `error`)."""

    request_id: str
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str = "error"
    error: Optional[str] = None
    tokens: TokenAccounting = field(default_factory=TokenAccounting)
    timings_ms: dict = field(default_factory=dict)
    notice: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "text": self.text, "token_ids": list(self.token_ids),
                "finish_reason": self.finish_reason, "error": self.error, "tokens": vars(self.tokens),
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}, "notice": self.notice}


@dataclass
class StreamChunk:
    """New text of one request since its previous chunk; `output` is set on the request's last chunk."""

    index: int
    request_id: str
    text: str
    finished: bool
    output: Optional[RequestOutput] = None

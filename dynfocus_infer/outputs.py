"""What goes into and comes out of `LLM.generate`: requests, per-request outputs, token accounting, stream chunks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .errors import RequestError, is_integer, is_real
from .prompt import IMAGE_PLACEHOLDER

VIDEO_PLACEHOLDER = "<video>"

VideoInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, None]
FOCUS_MODES = ("llm", "dpe")


@dataclass
class Request:
    """A question, about a video (a path, or uint8 frames [T, H, W, 3]) or about nothing (text only).

    num_frames / fps override the engine's frame sampling for this request (exactly one of them, or neither).
    Instead of a question, `prompt` is text given to the model as it is (vLLM's `{"prompt": ...}`: no chat template);
    with a video it holds `<image>` (or `<video>`) once, where the visual tokens go.

    focus: None (plain), "llm" (SlowFocus's two passes: a grounding answer picks a segment, its frames are added
    densely, the question is asked again) or "dpe" (one pass: DynFocus's events pick the segment, its dense frames
    become keyframes); DESIGN.md section 13. A focus request needs a video and a question: `question`, or with a
    `prompt` the `instruction`, written in the prompt as it is (a chat's last user text), which each pass rewrites
    there: at `instruction_at` (a character offset; chat.conversation_request sets it), else its last occurrence."""

    question: Optional[str] = None
    video: VideoInput = None
    request_id: Optional[str] = None
    num_frames: Optional[int] = None
    fps: Optional[float] = None
    prompt: Optional[str] = None
    instruction: Optional[str] = None    # what the Q-Former reads; default the question, or the prompt's text
    focus: Optional[str] = None
    instruction_at: Optional[int] = None

    def __post_init__(self):
        self._check_focus()
        if self.prompt is not None or self.question is None:
            self._check_prompt()
        elif not isinstance(self.question, str) or not self.question.strip():
            raise RequestError(f"the question must be a non-empty string, got {self.question!r}")
        elif IMAGE_PLACEHOLDER in self.question:
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

    def _check_focus(self) -> None:
        if self.focus is None:
            return
        if self.focus not in FOCUS_MODES:
            raise RequestError(f"focus = {self.focus!r} is invalid: expected None, 'llm' or 'dpe'")
        if self.video is None:
            raise RequestError(f"focus = {self.focus!r} needs a question and a video (it chooses the part of the "
                               f"video the question is about); this request has no video")
        if self.question is None and not self._instruction_in_prompt():
            raise RequestError(f"focus = {self.focus!r} needs a question and a video (it chooses the part of the "
                               f"video the question is about); a prompt request needs its question as `instruction`, "
                               f"written in the prompt as it is, in one piece (focus rewrites it there for each "
                               f"pass; a chat: the last user message's text, not split by the video)")

    def _instruction_in_prompt(self) -> bool:
        text, prompt, at = self.instruction, self.prompt, self.instruction_at
        if not isinstance(text, str) or not text.strip() or not isinstance(prompt, str):
            return False
        if at is None:
            return text in prompt
        return is_integer(at) and 0 <= at and prompt[at:at + len(text)] == text

    def _check_prompt(self) -> None:
        if self.question is not None:
            raise RequestError("a request takes a question or a prompt, not both")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError(f"the prompt must be a non-empty string, got {self.prompt!r:.80}")
        self.prompt = self.prompt.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)
        placeholders = self.prompt.count(IMAGE_PLACEHOLDER)
        if self.video is not None and placeholders != 1:
            raise RequestError(f"a prompt with a video must hold {IMAGE_PLACEHOLDER} (or {VIDEO_PLACEHOLDER}) exactly "
                               f"once, where the video's tokens go; found {placeholders}")
        if self.video is None and placeholders:
            raise RequestError(f"the prompt holds {IMAGE_PLACEHOLDER} but the request has no video: pass it in "
                               f"multi_modal_data={{'video': ...}}")

    @property
    def text(self) -> str:
        """The question the Q-Former reads: the instruction, the question, or the prompt without its placeholder."""
        if self.instruction is not None:
            return self.instruction
        return self.question if self.question is not None else self.prompt.replace(IMAGE_PLACEHOLDER, "").strip()

    @classmethod
    def coerce(cls, value) -> "Request":
        """A Request from a Request, a dict with the same fields, or a bare question string."""
        if isinstance(value, Request):
            return value
        if isinstance(value, str):
            return cls(question=value)
        if isinstance(value, dict):
            unknown = set(value) - {"question", "video", "request_id", "num_frames", "fps", "id", "prompt",
                                    "multi_modal_data", "focus"}
            if unknown:
                raise RequestError(f"unknown request fields {sorted(unknown)}: expected question or prompt, video "
                                   f"or multi_modal_data, request_id, num_frames, fps, focus")
            data = dict(value)
            if "id" in data:
                data["request_id"] = str(data.pop("id"))
            if "multi_modal_data" in data:
                data["video"] = cls._video_of(data.pop("multi_modal_data"), data.get("video"))
            if "question" not in data and "prompt" not in data:
                raise RequestError("a request needs a 'question' (or a vLLM-style 'prompt')")
            return cls(**data)
        raise RequestError(f"a request must be a Request, a dict or a question string, got {type(value).__name__}")

    @staticmethod
    def _video_of(multi_modal_data, video):
        if not isinstance(multi_modal_data, dict) or set(multi_modal_data) - {"video"}:
            raise RequestError(f"multi_modal_data must be {{'video': path or frames}}, got {multi_modal_data!r:.80}")
        if video is not None and "video" in multi_modal_data:
            raise RequestError("a request takes its video in 'video' or in multi_modal_data, not both")
        return multi_modal_data.get("video", video)


@dataclass
class TokenAccounting:
    """How many tokens the video cost, against what full tokens (every patch of every frame) would have cost;
    cached_tokens: of the prompt tokens, those whose K/V came from the prefix cache (first sample, first admission)."""

    frames: int = 0
    keyframes: int = 0
    visual_tokens: int = 0
    full_visual_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class FocusInfo:
    """What focus inference did for one request (DESIGN.md section 13).

    status: "parsed" / "repaired" (llm: the grounding answer gave segments, some swapped or clamped: `fixes`),
    "fallback" (llm: no usable segment, `reason` "missing" or "malformed"; the answer then comes from the sparse
    frames and the unchanged question) or "events" (dpe). segments: normalised (start, end) pairs.
    sparse_frames / dense_frames: frame indices of the video stream (dense: the segment's frames added to the sparse
    ones). Extra cost over a plain request: frames_decoded and frames_encoded (the ViT) beyond the sparse frames,
    pass1_prompt_tokens + pass1_generated_tokens (llm's grounding pass; 0 for dpe), extra_visual_tokens (visual
    tokens of the answer's pass beyond those of the sparse frames alone) and extra_tokens (all of them together)."""

    mode: str
    status: str = ""
    reason: Optional[str] = None
    fixes: list = field(default_factory=list)
    segments: list = field(default_factory=list)
    grounding_answer: Optional[str] = None
    sparse_frames: list = field(default_factory=list)
    dense_frames: list = field(default_factory=list)
    frames_decoded: int = 0
    frames_encoded: int = 0
    pass1_prompt_tokens: int = 0
    pass1_generated_tokens: int = 0
    extra_visual_tokens: int = 0

    @property
    def extra_tokens(self) -> int:
        return self.pass1_prompt_tokens + self.pass1_generated_tokens + self.extra_visual_tokens

    def to_dict(self) -> dict:
        return {**vars(self), "segments": [list(s) for s in self.segments], "extra_tokens": self.extra_tokens}


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's CompletionOutput). finish_reason None while it is generating.
    logprobs: per generated token {token id: Logprob} (the sampled token and the top-N) when asked.
    delta_text / delta_token_ids: what is new since this request's previous output (streaming)."""

    index: int
    text: str
    token_ids: list
    finish_reason: Optional[str]
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    delta_text: str = ""
    delta_token_ids: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's result. finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens
    reached, or the LLM context filled before it: then fewer tokens than max_tokens), "abort", or "error" (see
    `error`); None on a streamed output of a request still generating (finished False).

    vLLM's shape: `outputs` holds one CompletionOutput per completion (n); text / token_ids / finish_reason are
    those of outputs[0]. prompt_logprobs: per prompt position {token id: Logprob}, None at the first token and at
    visual rows. error_kind, for a failed request: "video_decode" (its video could not be read), "request" (the
    request itself, e.g. a bad value or a prompt over the context) or "internal" (a fault of the engine)."""

    request_id: str
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = "error"
    error: Optional[str] = None
    tokens: TokenAccounting = field(default_factory=TokenAccounting)
    timings_ms: dict = field(default_factory=dict)
    notice: Optional[str] = None
    outputs: list = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: Optional[list] = None
    focus: Optional[FocusInfo] = None
    error_kind: Optional[str] = None

    def __post_init__(self):
        if not self.outputs:
            self.outputs = [CompletionOutput(0, self.text, list(self.token_ids), self.finish_reason)]
        if self.error is not None and self.error_kind is None:
            self.error_kind = "internal" if self.error.startswith("internal error") else "request"

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        record = {"request_id": self.request_id, "text": self.text, "token_ids": list(self.token_ids),
                  "finish_reason": self.finish_reason, "error": self.error, "tokens": vars(self.tokens),
                  "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}, "notice": self.notice}
        if self.focus is not None:
            record["focus"] = self.focus.to_dict()
        if len(self.outputs) > 1:
            record["outputs"] = [{"index": o.index, "text": o.text, "token_ids": list(o.token_ids),
                                  "finish_reason": o.finish_reason} for o in self.outputs]
        return record


@dataclass
class StreamChunk:
    """New text of one request (of its completion `completion` when n > 1) since its previous chunk; `output` is
    set on the request's last chunk."""

    index: int
    request_id: str
    text: str
    finished: bool
    output: Optional[RequestOutput] = None
    completion: int = 0

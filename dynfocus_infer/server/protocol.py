"""Request bodies of /v1/chat/completions and /v1/completions, strict as OpenAI's API: a field it does not know,
or a value of the wrong type, is a 400 naming the field. `sampling_params()` maps them to the engine's
SamplingParams (whose own checks name a value out of range)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..errors import RequestError
from ..sampling import SamplingParams
from .api_errors import bad_request

Number = Union[StrictInt, StrictFloat]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class VideoURL(_Strict):
    url: StrictStr


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[Union[TextPart, VideoURLPart]]]
    name: Optional[StrictStr] = None


class _SamplingFields(_Strict):
    """Fields both endpoints share (OpenAI's, plus vLLM's top_k / min_tokens / repetition_penalty and the engine's
    per-request frame sampling num_frames / fps)."""

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    user: Optional[StrictStr] = None
    top_k: StrictInt = 0
    min_tokens: StrictInt = 0
    repetition_penalty: Number = 1.0
    num_frames: Optional[StrictInt] = None
    fps: Optional[Number] = None

    def _sampling(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
        try:
            return SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else 128,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, seed=self.seed,
                stop=self.stop, n=self.n, logprobs=logprobs, min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty)
        except RequestError as error:
            raise bad_request(str(error).replace("SamplingParams.", ""), code="invalid_value") from error


class ChatCompletionRequest(_SamplingFields):
    """`focus` (the engine's extension, DESIGN.md section 13): "llm" or "dpe" focuses on the part of the video the
    last user message's text asks about; the response then carries a `focus` object (segments, dense frames, cost)."""

    messages: list[Message] = Field(min_length=1)
    focus: Optional[Literal["llm", "dpe"]] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)

    def sampling_params(self) -> SamplingParams:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        most = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(most, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_SamplingFields):
    prompt: Union[StrictStr, list[StrictStr]]
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise bad_request(f"prompt: one prompt per request (got a list of {len(self.prompt)})",
                                  param="prompt")
            return self.prompt[0]
        return self.prompt

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)


def validation_message(errors: list) -> str:
    """One line per problem pydantic found, naming the field: 'messages.0.content: ...'."""
    lines = []
    for error in errors[:8]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            lines.append(f"unknown field {where!r}")
        elif kind == "json_invalid":
            lines.append(f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}")
        else:
            lines.append(f"{where or 'body'}: {error.get('msg')}")
    return "; ".join(lines) or "malformed request"

"""Engine outputs (RequestOutput) as OpenAI response objects: chat.completion / text_completion, their stream
chunks, usage, logprobs, plus `video` (the engine's token accounting), `notice` (what the weights are) and, for a
focus request, `focus` (what focus inference did: FocusInfo.to_dict())."""
from __future__ import annotations

import time
from typing import Callable, Optional

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}


def usage(output) -> dict:
    completion = sum(len(c.token_ids) for c in output.outputs) if output.outputs else len(output.token_ids)
    prompt = output.tokens.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": output.tokens.cached_tokens}}


def video_accounting(output) -> dict:
    t = output.tokens
    return {"frames": t.frames, "keyframes": t.keyframes, "visual_tokens": t.visual_tokens,
            "full_visual_tokens": t.full_visual_tokens}


class ResponseBuilder:
    """One request's response objects; `decode(token_id)` gives a token's text when the engine did not."""

    def __init__(self, kind: str, response_id: str, model: str, decode: Callable[[int], str], top_logprobs: int = 0):
        self.kind, self.id, self.model, self.decode = kind, response_id, model, decode
        self.top_logprobs = top_logprobs
        self.created = int(time.time())
        self.chat = kind == "chat"

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _token_text(self, token_id: int, logprob) -> str:
        return logprob.decoded_token if getattr(logprob, "decoded_token", None) is not None else self.decode(token_id)

    def logprobs(self, completion, start: int = 0) -> Optional[dict]:
        """The logprobs of completion's tokens from `start` on, in the endpoint's format (None when not asked)."""
        if completion.logprobs is None:
            return None
        tokens = completion.token_ids[start:]
        entries = completion.logprobs[start:start + len(tokens)]
        if self.chat:
            content = [{**self._token(token_id, entry[token_id]),
                        "top_logprobs": [self._token(t, lp) for t, lp in self._top(entry)]}
                       for token_id, entry in zip(tokens, entries)]
            return {"content": content}
        return {"tokens": [self._token_text(t, entry[t]) for t, entry in zip(tokens, entries)],
                "token_logprobs": [entry[t].logprob for t, entry in zip(tokens, entries)],
                "top_logprobs": [{self._token_text(t, lp): lp.logprob for t, lp in self._top(entry)}
                                 for entry in entries]}

    def _top(self, entry: dict) -> list:
        """The top_logprobs most likely tokens of one position (the sampled token is in `entry` even when not)."""
        return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= self.top_logprobs),
                      key=lambda item: item[1].rank)

    def _token(self, token_id: int, logprob) -> dict:
        text = self._token_text(token_id, logprob)
        return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode("utf-8"))}

    def final(self, output) -> dict:
        choices = []
        for completion in output.outputs:
            choice = {"index": completion.index, "logprobs": self.logprobs(completion),
                      "finish_reason": FINISH_REASONS.get(completion.finish_reason, completion.finish_reason)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
            else:
                choice["text"] = completion.text
            choices.append(choice)
        body = {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(output), "video": video_accounting(output)}
        if output.notice:
            body["notice"] = output.notice
        if output.focus is not None:
            body["focus"] = output.focus.to_dict()
        return body

    def chunk(self, choices: list, usage_of=None) -> dict:
        """A stream chunk; usage_of: the finished output whose usage, video accounting, notice and focus it carries
        (the usage chunk, choices empty, as OpenAI sends it)."""
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if usage_of is not None:
            body["usage"] = usage(usage_of)
            body["video"] = video_accounting(usage_of)
            if usage_of.notice:
                body["notice"] = usage_of.notice
            if usage_of.focus is not None:
                body["focus"] = usage_of.focus.to_dict()
        return body

    def first_chunks(self, n: int) -> list[dict]:
        """Chat streams open each choice with the assistant's role (OpenAI's first chunk)."""
        if not self.chat:
            return []
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(n)]

    def delta_chunks(self, output, sent: dict, *, with_focus: bool = False) -> list[dict]:
        """Chunks for what each completion gained since `sent` ({index: tokens already sent}), updated in place.
        with_focus: the finished output's focus rides on its last chunk (a stream without a usage chunk)."""
        chunks = []
        for completion in output.outputs:
            start = sent.get(completion.index, 0)
            finish = completion.finish_reason if completion.finished else None
            if not completion.delta_text and finish is None and len(completion.token_ids) == start:
                continue
            choice = {"index": completion.index, "logprobs": self.logprobs(completion, start),
                      "finish_reason": FINISH_REASONS.get(finish, finish)}
            if self.chat:
                choice["delta"] = {"content": completion.delta_text} if completion.delta_text else {}
            else:
                choice["text"] = completion.delta_text
            sent[completion.index] = len(completion.token_ids)
            chunks.append(self.chunk([choice]))
        if with_focus and output.focus is not None and chunks:
            chunks[-1]["focus"] = output.focus.to_dict()
        return chunks

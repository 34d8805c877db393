"""OpenAI-style chat messages -> one engine Request: the model's chat template applied, a video part placed where
the visual tokens go (`LLM.chat`, and the server's /v1/chat/completions)."""
from __future__ import annotations

from .errors import RequestError
from .outputs import Request
from .prompt import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM

ROLES = ("system", "user", "assistant")
# Stands for the last user text while the conversation is rendered, so its place in the prompt is known exactly.
_QUESTION_MARK = "\x1fdynfocus-question\x1f"


def _video_of_part(part: dict):
    if part["type"] == "video":
        return part.get("video")
    url = part.get("video_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise RequestError("a video_url part needs {'video_url': {'url': path or file:// URL}}")
    return url[len("file://"):] if url.startswith("file://") else url


def _flatten(content, video_seen: list) -> str:
    """A message's text, with `<image>` where its video part was; the video goes to video_seen."""
    if isinstance(content, str):
        if IMAGE_PLACEHOLDER in content:
            raise RequestError(f"message text may not contain {IMAGE_PLACEHOLDER}: send the video as a content part")
        return content
    if not isinstance(content, (list, tuple)):
        raise RequestError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_flatten(part.get("text", ""), video_seen))
        elif kind in ("video", "video_url"):
            video_seen.append(_video_of_part(part))
            pieces.append(IMAGE_PLACEHOLDER + "\n")
        else:
            raise RequestError(f"unknown content part {part!r:.80}: expected type text, video or video_url")
    return "".join(pieces)


def conversation_request(messages, template: str, tokenizer) -> Request:
    """The Request of one conversation (at most one video in it), rendered with the model's template and ending
    with the assistant's turn to speak."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    videos, turns = [], []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise RequestError(f"a message needs a role in {ROLES} and content, got {message!r:.80}")
        turns.append({"role": message["role"], "content": _flatten(message["content"], videos)})
    if len(videos) > 1:
        raise RequestError(f"a conversation may hold one video, found {len(videos)}")
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    instruction = turns[users[-1]]["content"].replace(IMAGE_PLACEHOLDER, "").strip() if users else ""
    marked = turns
    if instruction and instruction in turns[users[-1]]["content"]:
        last = turns[users[-1]]["content"]
        at = last.rfind(instruction)
        marked = [*turns[:users[-1]], {**turns[users[-1]], "content": last[:at] + _QUESTION_MARK +
                                       last[at + len(instruction):]}, *turns[users[-1] + 1:]]
    text = _render(marked, template, tokenizer)
    at = text.find(_QUESTION_MARK) if marked is not turns and text.count(_QUESTION_MARK) == 1 else None
    if at is None and marked is not turns:    # the template changed the mark: render the text itself
        text = _render(turns, template, tokenizer)
    elif at is not None:
        text = text.replace(_QUESTION_MARK, instruction)
    return Request(prompt=text, video=videos[0] if videos else None, instruction=instruction or None,
                   instruction_at=at)


def _render(turns: list, template: str, tokenizer) -> str:
    if template == "chat_template":
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    system = next((t["content"] for t in turns if t["role"] == "system"), VICUNA_V1_SYSTEM)
    said = [f"{'USER' if t['role'] == 'user' else 'ASSISTANT'}: {t['content']}" for t in turns
            if t["role"] != "system"]
    return " ".join([system, *said]) + " ASSISTANT:"

"""Prompt templates and their tokenisation around the `<image>` placeholder.

A prompt is rendered to text holding at most one `<image>`; the text before and after it is tokenised separately
so the engine can splice the visual tokens in between (LLaVA's convention: BOS once, at the very start).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGE_PLACEHOLDER = "<image>"

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class PromptParts:
    """Token ids before and after the visual tokens (after is empty for a text-only prompt)."""

    before: list
    after: list
    has_video: bool

    def __len__(self) -> int:
        return len(self.before) + len(self.after)


def render_prompt(template: str, question: str, has_video: bool, tokenizer=None) -> str:
    """The full prompt text. "vicuna_v1": DynFocus / LLaMA-VID's template; "chat_template": the tokenizer's own."""
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if has_video else question
    if template == "vicuna_v1":
        return f"{VICUNA_V1_SYSTEM} USER: {user} ASSISTANT:"
    if template == "chat_template":
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}: expected 'vicuna_v1' or 'chat_template'")


def tokenize_prompt(tokenizer, text: str, *, add_bos: bool) -> PromptParts:
    """Split at the single `<image>` and tokenise both sides; BOS (when the template wants it) only at the start."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) > 2:
        raise ValueError(f"a prompt may hold at most one {IMAGE_PLACEHOLDER}, found {len(pieces) - 1}")
    before = tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
    bos: Optional[int] = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        before = [bos] + before
    after = tokenizer(pieces[1], add_special_tokens=False)["input_ids"] if len(pieces) == 2 else []
    return PromptParts(list(before), list(after), len(pieces) == 2)

"""Incremental detokenisation: O(new tokens) per step, equal to decoding the whole token list at once.

Each step decodes only a short window: the tokens since `prefix_offset`, against the same window without the newest
tokens (`read_offset`); the difference is the new text. Decoding a window, not single tokens, keeps tokenizers whose
decode is not prefix-stable right (SentencePiece's leading spaces, byte-level BPE); a window whose text ends in an
unfinished UTF-8 character (U+FFFD) emits nothing until a later token completes it (vLLM's algorithm).
Stop strings are searched only in the tail the new text can have completed; streamed text holds back a tail that
could still grow into a stop string.
"""
from __future__ import annotations

from typing import Iterable

REPLACEMENT = "\ufffd"


def held_back(text: str, stops: Iterable[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (held back from streams)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class IncrementalDetokenizer:
    """The text of one sequence, grown token by token. skip_ids (EOS, stop tokens) never reach the text."""

    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop, self.skip_ids = list(stop), set(skip_ids)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.emitted = 0            # characters of text already streamed
        self.stopped = False        # a stop string was found; text is cut before it

    def _decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Feed one generated token; may complete characters and stop strings."""
        if self.stopped or token_id in self.skip_ids:
            return
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._append(new_text[len(prefix_text):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def finish(self) -> None:
        """End of the sequence: text still held for an unfinished character goes out as decode shows it."""
        if self.stopped or self.read_offset == len(self.ids):
            return
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self._append(new_text[len(prefix_text):])
        self.prefix_offset = self.read_offset = len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        if not self.stop:
            return
        cuts = [c for c in (self.text.find(s, start) for s in self.stop) if c >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def new_text(self, finished: bool) -> str:
        """Text not streamed yet; while unfinished, a tail that may become a stop string is held back."""
        end = len(self.text)
        if not finished and self.stop:
            tail = self.text[max(self.emitted, end - self.longest_stop):]   # only a tail can start a stop string
            end = max(self.emitted, end - held_back(tail, self.stop))
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta

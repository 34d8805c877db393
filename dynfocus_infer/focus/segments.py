"""SlowFocus pass 1 -> pass 2 text: the grounding question, parsing its answer into normalised segments, and the
suffix that tells pass 2 where to focus (the authors' `segment_search` and prompt strings, eval/model_*_tsearch.py).

The model answers with times discretised to digits, e.g. "from 023 to 045" (3 digits for the 1000-bucket
checkpoints). The authors read every `(\\d{2,4}) (to|and) (\\d{2,4})` in the answer, keep the pairs with start < end,
and normalise each number by the number of its digits: "045" -> 45 / 10**3 = 0.045, "45" -> 0.45.

Where the authors silently drop a pair, we repair it and say so:
- reversed (start > end) -> swapped, marked "swapped";
- with `discretization` D given, numbers are read as value / D instead, and values above D -> clamped to 1.0,
  marked "clamped" (the authors' digit rule cannot leave [0, 1));
- no number at all (or an empty answer) -> fallback "missing"; numbers but no usable pair (a pattern mismatch
  such as "5 to 9" or "0.2 to 0.4", a zero-length pair "040 to 040", more than 4 digits) -> fallback "malformed".
  A fallback has no segments: pass 2 then runs on the sparse frames with the unchanged question, as the authors'.
Numbers are matched whole: the authors' pattern would read "12345 to 67890" as "2345 to 6789"; ours does not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

GROUNDING_TEMPLATE = "Could you provide the time interval helpful to reason {question}"
FOCUS_PREFIX = " Additional temporal information to focus on:"
SEGMENT_PATTERN = re.compile(r"(?<!\d)(\d{2,4}) (to|and) (\d{2,4})(?!\d)")
_NUMBER = re.compile(r"\d")


@dataclass(frozen=True)
class Segment:
    """A normalised time interval 0 <= start <= end <= 1, the digits it was read from, and what was repaired."""

    start: float
    end: float
    start_text: str
    end_text: str
    fixes: tuple = ()


@dataclass(frozen=True)
class SegmentParse:
    """status: "parsed" (every segment as the model wrote it), "repaired" (some swapped or clamped: see each
    segment's fixes) or "fallback" (no segment; reason "missing" or "malformed")."""

    segments: tuple
    status: str
    reason: Optional[str]
    answer: str

    @property
    def fell_back(self) -> bool:
        return self.status == "fallback"


def grounding_question(question: str) -> str:
    """The pass-1 question: the authors' grounding request around the user's question."""
    return GROUNDING_TEMPLATE.format(question=question)


def _normalise(digits: str, discretization: Optional[int]) -> tuple[float, str, bool]:
    """-> (value in [0, 1], text to show in the pass-2 prompt, clamped?)."""
    if discretization is None:
        return int(digits) / 10 ** len(digits), digits, False
    value = int(digits) / discretization
    if value > 1.0:
        return 1.0, str(discretization - 1).zfill(len(str(discretization)) - 1), True
    return value, digits, False


def parse_segments(answer: str, *, discretization: Optional[int] = None) -> SegmentParse:
    """Every segment of a pass-1 answer, in the order written (see the module docstring for the rules)."""
    if discretization is not None and (not isinstance(discretization, int) or discretization < 2):
        raise ValueError(f"discretization = {discretization!r} is invalid: expected None or an integer >= 2")
    text = answer or ""
    segments = []
    for match in SEGMENT_PATTERN.finditer(text):
        start, start_text, start_clamped = _normalise(match.group(1), discretization)
        end, end_text, end_clamped = _normalise(match.group(3), discretization)
        if start == end:
            continue
        fixes = ("clamped",) if start_clamped or end_clamped else ()
        if start > end:
            start, end, start_text, end_text = end, start, end_text, start_text
            fixes = ("swapped",) + fixes
        segments.append(Segment(start, end, start_text, end_text, fixes))
    if segments:
        status = "repaired" if any(s.fixes for s in segments) else "parsed"
        return SegmentParse(tuple(segments), status, None, text)
    reason = "malformed" if _NUMBER.search(text) else "missing"
    return SegmentParse((), "fallback", reason, text)


def focus_prompt_suffix(segments: Sequence[Segment], *, space_after_colon: bool = False) -> str:
    """What pass 2 appends to the question: " Additional temporal information to focus on:from 023 to 045."
    (several segments joined by ", "); "" for no segment. The authors' string has no space after the colon
    (their f-string joins the two parts directly), and a checkpoint was evaluated with exactly those bytes;
    space_after_colon=True gives the spelling of the issue text."""
    if not segments:
        return ""
    spans = ", ".join(f"from {s.start_text} to {s.end_text}" for s in segments)
    return FOCUS_PREFIX + (" " if space_after_colon else "") + spans + "."

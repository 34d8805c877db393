"""Focus inference pieces that do not touch the scheduler: SlowFocus segment parsing, dense frame sampling and
the pass-2 prompt (the Focus section of DESIGN.md)."""
from .frame_sampling import (MergedFrames, dense_frame_indices, focus_frames, merge_frame_indices,
                             sparse_frame_indices)
from .segments import (FOCUS_PREFIX, GROUNDING_TEMPLATE, Segment, SegmentParse, focus_prompt_suffix,
                       grounding_question, parse_segments)

__all__ = ["FOCUS_PREFIX", "GROUNDING_TEMPLATE", "MergedFrames", "Segment", "SegmentParse", "dense_frame_indices",
           "focus_frames", "focus_prompt_suffix", "grounding_question", "merge_frame_indices", "parse_segments",
           "sparse_frame_indices"]

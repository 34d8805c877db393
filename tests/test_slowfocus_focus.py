"""SlowFocus focus pieces: segment parsing of pass-1 answers (authors' formats and bad answers), dense frame
indices, merging with the sparse frames into lfreq / hfreq lists, and the pass-2 prompt suffix."""
import random

import pytest

from dynfocus_infer.focus import (Segment, dense_frame_indices, focus_frames, focus_prompt_suffix,
                                  grounding_question, merge_frame_indices, parse_segments, sparse_frame_indices)


def test_authors_format_is_normalised_by_digit_count():
    parse = parse_segments("The action happens from 023 to 045.")
    assert parse.status == "parsed" and parse.reason is None and not parse.fell_back
    (segment,) = parse.segments
    assert (segment.start, segment.end) == (0.023, 0.045)
    assert (segment.start_text, segment.end_text, segment.fixes) == ("023", "045", ())
    two_digits = parse_segments("between 45 and 60").segments[0]
    assert (two_digits.start, two_digits.end) == (0.45, 0.60)


def test_every_segment_is_kept_in_order():
    parse = parse_segments("from 010 to 020, and again from 500 to 600")
    assert [(s.start, s.end) for s in parse.segments] == [(0.01, 0.02), (0.5, 0.6)]


def test_reversed_segment_is_swapped_and_says_so():
    parse = parse_segments("from 450 to 120")
    assert parse.status == "repaired"
    (segment,) = parse.segments
    assert (segment.start, segment.end, segment.start_text, segment.end_text) == (0.12, 0.45, "120", "450")
    assert segment.fixes == ("swapped",)


def test_out_of_range_is_clamped_with_a_discretization():
    parse = parse_segments("from 0900 to 1200", discretization=1000)
    (segment,) = parse.segments
    assert (segment.start, segment.end, segment.end_text, segment.fixes) == (0.9, 1.0, "999", ("clamped",))
    assert parse.status == "repaired"
    reversed_and_high = parse_segments("from 1500 to 0100", discretization=1000).segments[0]
    assert (reversed_and_high.start, reversed_and_high.end) == (0.1, 1.0)
    assert reversed_and_high.fixes == ("swapped", "clamped")


@pytest.mark.parametrize("answer", ["I cannot tell.", "", "no times here"])
def test_missing_segment_falls_back(answer):
    parse = parse_segments(answer)
    assert parse.fell_back and parse.reason == "missing" and parse.segments == ()


@pytest.mark.parametrize("answer", ["from 5 to 9", "from 0.2 to 0.4", "from 040 to 040", "12345 to 67890",
                                    "from 023 until 045"])
def test_malformed_segment_falls_back(answer):
    parse = parse_segments(answer)
    assert parse.fell_back and parse.reason == "malformed" and parse.segments == ()


def test_pass_two_prompt_suffix_and_grounding_question():
    segments = parse_segments("from 023 to 045 and from 500 to 600").segments
    assert focus_prompt_suffix(segments[:1]) == " Additional temporal information to focus on:from 023 to 045."
    assert focus_prompt_suffix(segments) == (" Additional temporal information to focus on:"
                                             "from 023 to 045, from 500 to 600.")
    assert focus_prompt_suffix(segments[:1], space_after_colon=True) == (
        " Additional temporal information to focus on: from 023 to 045.")
    assert focus_prompt_suffix(()) == ""
    assert grounding_question("what does he cut?") == (
        "Could you provide the time interval helpful to reason what does he cut?")


def test_dense_indices_are_linspace_inside_the_segment():
    indices = dense_frame_indices(Segment(0.1, 0.5, "100", "500"), 1000, 20)
    assert indices == [int(100 + k * 400 / 19) for k in range(20)]
    assert indices[0] == 100 and indices[1] == 121 and indices[-1] == 500


def test_dense_indices_of_short_videos_and_short_segments():
    assert dense_frame_indices((0.0, 1.0), 12, 20) == list(range(12))       # video shorter than the count
    assert dense_frame_indices((0.1, 0.3), 100, 20) == list(range(10, 31))  # exactly count steps: count + 1
    assert dense_frame_indices((0.42, 0.44), 10, 20) == [4]                 # one frame
    assert dense_frame_indices((0.97, 1.0), 10, 20) == [9]                  # start rounds past the last frame
    assert dense_frame_indices((0.25, 0.45), 10, 20) == [2, 3, 4]           # Python round: halves to even
    with pytest.raises(ValueError, match="segment"):
        dense_frame_indices((0.5, 0.2), 10, 20)


def test_sparse_indices_follow_fps_then_the_frame_cap():
    assert sparse_frame_indices(300, 30.0) == list(range(0, 300, 30))
    capped = sparse_frame_indices(9000, 30.0, max_frames=100)
    assert capped == list(range(0, 9000, 90)) and len(capped) == 100
    assert sparse_frame_indices(5, 30.0) == [0]


def test_merge_interleaves_by_index_with_sparse_first_on_ties():
    merged = merge_frame_indices([0, 30, 60, 90], [31, 25, 30], 100)
    assert merged.frame_indices == (0, 25, 30, 30, 31, 60, 90)
    assert merged.lfreq_ids == (0, 2, 5, 6) and merged.hfreq_ids == (1, 3, 4)
    assert merged.positions == tuple(i / 100 for i in merged.frame_indices) and merged.num_dense == 3


def test_merge_matches_a_stable_sort_on_random_lists():
    rng = random.Random(0)
    for _ in range(50):
        num_frames = rng.randint(1, 60)
        sparse = sorted(rng.sample(range(num_frames), rng.randint(1, min(8, num_frames))))
        dense = [rng.randrange(num_frames) for _ in range(rng.randint(1, 10))]
        tagged = sorted([(i, 0) for i in sparse] + [(i, 1) for i in dense])  # ties: sparse (0) first
        merged = merge_frame_indices(sparse, dense, num_frames)
        assert merged.frame_indices == tuple(i for i, _ in tagged)
        assert merged.lfreq_ids == tuple(p for p, (_, kind) in enumerate(tagged) if kind == 0)
        assert merged.hfreq_ids == tuple(p for p, (_, kind) in enumerate(tagged) if kind == 1)


def test_sparse_only_uses_the_authors_zero_lists():
    merged = merge_frame_indices([0, 10, 20], [], 30)
    assert merged.frame_indices == (0, 10, 20) and merged.lfreq_ids == (0,) and merged.hfreq_ids == (0,)
    fallback = focus_frames(300, 30.0, parse_segments("no idea").segments)
    assert fallback.frame_indices == tuple(range(0, 300, 30)) and fallback.num_dense == 0


def test_focus_frames_adds_twenty_dense_frames_per_segment():
    segments = parse_segments("from 100 to 500").segments
    plan = focus_frames(3000, 30.0, segments)
    sparse = list(range(0, 3000, 30))
    dense = dense_frame_indices(segments[0], 3000, 20)
    assert len(dense) == 20 and plan.num_dense == 20 and len(plan.frame_indices) == 120
    assert [plan.frame_indices[i] for i in plan.hfreq_ids] == dense
    assert [plan.frame_indices[i] for i in plan.lfreq_ids] == sparse

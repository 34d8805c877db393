"""Token-count baselines (dynfocus_infer.models.baselines): exact token accounting on ragged batches, values against
per-frame references written here from the definitions, and the ConnectorOutput layout fields."""
import pytest
import torch
import torch.nn.functional as F

from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.errors import RequestError
from dynfocus_infer.models.baselines import (DYNFOCUS_GRID, PAPER_DYNFOCUS, DynFocusEncoder, UniformFramesEncoder,
                                             build_baselines, dynfocus_name)
from dynfocus_infer.models.connector import DynFocusConnector
from dynfocus_infer.models.token_budget import count_visual_tokens

WIDTHS = dict(vision_width=24, llm_width=40, qformer_width=16, num_queries=5, patch_grid=8)
# Ragged: a single frame, T < K = 8 of uniform-8, T = K, T between L = 10 and 25, T > L = 50 of the widest grid.
FRAMES = [1, 5, 8, 17, 53]


@pytest.fixture(scope="module")
def connector():
    torch.manual_seed(0)
    return DynFocusConnector(ConnectorConfig(**WIDTHS), cluster_backend="reference").eval()


@pytest.fixture(scope="module")
def baselines(connector):
    return build_baselines(connector, uniform_frames=(8, 3))


def make_inputs(frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(frames)
    patches = torch.randn(total, WIDTHS["patch_grid"] ** 2, WIDTHS["vision_width"], generator=g)
    q_emb = torch.randn(total, WIDTHS["num_queries"], WIDTHS["vision_width"], generator=g)
    return patches, q_emb


def split_videos(x, frames):
    return list(torch.split(x, frames))


def test_every_baseline_is_built_with_the_paper_setting_first_among_dynfocus(baselines):
    expected = {"full", "pool-4x4", "llama-vid", "uniform-8", "uniform-3"} | {dynfocus_name(L, r)
                                                                             for L, r in DYNFOCUS_GRID}
    assert set(baselines) == expected
    assert PAPER_DYNFOCUS == "dynfocus-L25-r0.8"
    assert [n for n in baselines if n.startswith("dynfocus")][0] == PAPER_DYNFOCUS


@pytest.mark.parametrize("frames", [FRAMES, [2, 1], [30]])
def test_emitted_tokens_equal_count_tokens_on_ragged_batches(baselines, frames):
    patches, q_emb = make_inputs(frames)
    with torch.no_grad():
        for name, encoder in baselines.items():
            out = encoder(patches, q_emb, frames)
            counts = [encoder.count_tokens(t) for t in frames]
            assert list(out.num_tokens) == counts, name
            assert out.tokens.shape == (sum(counts), WIDTHS["llm_width"]), name
            assert torch.isfinite(out.tokens).all(), name
            assert out.token_offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist(), name
            # Per-frame offsets end at each video's total and never decrease (0 tokens in padding).
            assert out.frame_token_offsets[:, -1].tolist() == counts, name
            assert (out.frame_token_offsets.diff(dim=1) >= 0).all(), name
            for b, t in enumerate(frames):
                assert torch.equal(out.video_tokens(b), out.tokens[out.token_offsets[b]:out.token_offsets[b + 1]])


def test_token_counts_by_definition(baselines):
    g2 = WIDTHS["patch_grid"] ** 2
    for t in (1, 3, 5, 8, 17, 53, 200):
        assert baselines["full"].count_tokens(t) == t * g2
        assert baselines["pool-4x4"].count_tokens(t) == t * 16
        assert baselines["llama-vid"].count_tokens(t) == 2 * t
        assert baselines["uniform-8"].count_tokens(t) == min(8, t) * g2
        assert baselines["uniform-8"].frames_read(t) == min(8, t)
        assert baselines["full"].frames_read(t) == t
    # DynFocus: K = max(1, round(r * min(L, T))) keyframes at 40 tokens, 2 for every other frame (Eq. 11).
    assert baselines["dynfocus-L25-r0.8"].count_tokens(200) == 20 * 40 + 180 * 2
    assert baselines["dynfocus-L10-r0.4"].count_tokens(200) == 4 * 40 + 196 * 2
    assert baselines["dynfocus-L50-r0.8"].count_tokens(17) == 14 * 40 + 3 * 2
    assert baselines["dynfocus-L50-r0.4"].count_tokens(1) == 40
    with pytest.raises(ValueError, match="frames >= 1"):
        baselines["full"].count_tokens(0)


def test_full_and_pooled_tokens_match_per_frame_projection(connector, baselines):
    patches, q_emb = make_inputs(FRAMES)
    grid, width = WIDTHS["patch_grid"], WIDTHS["vision_width"]
    with torch.no_grad():
        full = baselines["full"](patches, None, FRAMES)
        pooled = baselines["pool-4x4"](patches, q_emb, FRAMES)
        for b, video in enumerate(split_videos(patches, FRAMES)):
            torch.testing.assert_close(full.video_tokens(b), connector.mm_projector(video).flatten(0, 1))
            image = video.reshape(-1, grid, grid, width).permute(0, 3, 1, 2)
            pool = F.avg_pool2d(image, kernel_size=grid // 4).flatten(2).transpose(1, 2)
            torch.testing.assert_close(pooled.video_tokens(b), connector.mm_projector(pool).flatten(0, 1))
    assert full.frame_mask.shape == (len(FRAMES), max(FRAMES)) and not full.frame_mask.any()
    assert full.keyframes.shape == (len(FRAMES), 0) and full.scores.shape == (len(FRAMES), 0)


def test_llama_vid_tokens_are_context_then_content(connector, baselines):
    patches, q_emb = make_inputs(FRAMES, seed=2)
    with torch.no_grad():
        out = baselines["llama-vid"](patches, q_emb, FRAMES)
        for b, (video, queries) in enumerate(zip(split_videos(patches, FRAMES), split_videos(q_emb, FRAMES))):
            expected = []
            for v, q in zip(video, queries):  # one frame at a time, from LLaMA-VID's definition
                key = connector.vlm_att_key_projector(v)
                attention = torch.softmax(q @ key.T / v.shape[-1] ** 0.5, dim=-1)
                context = connector.vlm_att_val_projector((attention @ v).mean(0))
                content = connector.mm_projector(v.mean(0))
                expected += [context, content]
            torch.testing.assert_close(out.video_tokens(b), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_uniform_frames_pick_segment_middles_and_all_frames_when_short(connector, baselines):
    patches, q_emb = make_inputs(FRAMES, seed=3)
    encoder = baselines["uniform-8"]
    with torch.no_grad():
        out = encoder(patches, q_emb, FRAMES)
        for b, (video, t) in enumerate(zip(split_videos(patches, FRAMES), FRAMES)):
            k = min(8, t)
            picked = [int((i + 0.5) * t / k) for i in range(k)]
            assert len(set(picked)) == k and (k < t or picked == list(range(t)))
            assert out.keyframes[b, :k].tolist() == picked and (out.keyframes[b, k:] == -1).all()
            assert out.frame_mask[b].nonzero().flatten().tolist() == picked
            per_frame = out.frame_token_offsets[b].diff()
            assert per_frame[picked].eq(64).all() and per_frame.sum() == 64 * k
            torch.testing.assert_close(out.video_tokens(b), connector.mm_projector(video[picked]).flatten(0, 1))


def test_uniform_frames_are_distinct_for_every_t_at_least_k():
    encoder = UniformFramesEncoder(DynFocusConnector(ConnectorConfig(**WIDTHS), cluster_backend="reference"), 7)
    frames = list(range(1, 60))
    video, slot, time = encoder.picked_frames(frames)
    for b, t in enumerate(frames):
        times = time[video == b].tolist()
        assert slot[video == b].tolist() == list(range(min(7, t)))
        assert len(times) == min(7, t) == len(set(times)) and times == sorted(times)
        assert 0 <= min(times) and max(times) < t


def test_dynfocus_variant_shares_parameters_and_matches_a_fresh_connector(connector, baselines):
    encoder = baselines["dynfocus-L10-r0.4"]
    assert encoder.connector.mm_projector[0].weight is connector.mm_projector[0].weight
    assert encoder.connector.config.num_events == 10 and encoder.connector.config.keep_ratio == 0.4
    assert connector.config.num_events == 25  # the model's own connector is untouched
    fresh = DynFocusConnector(ConnectorConfig(**WIDTHS, num_events=10, keep_ratio=0.4), cluster_backend="reference")
    fresh.load_state_dict(connector.state_dict())
    patches, q_emb = make_inputs(FRAMES, seed=4)
    with torch.no_grad():
        got, want = encoder(patches, q_emb, FRAMES), fresh.eval()(patches, q_emb, FRAMES)
    assert got.num_tokens == want.num_tokens == tuple(count_visual_tokens(t, fresh.config) for t in FRAMES)
    torch.testing.assert_close(got.tokens, want.tokens)
    assert torch.equal(got.keyframes, want.keyframes)


def test_batched_equals_each_video_alone(baselines):
    patches, q_emb = make_inputs(FRAMES, seed=5)
    with torch.no_grad():
        for name in ("full", "pool-4x4", "llama-vid", "uniform-3", PAPER_DYNFOCUS):
            encoder = baselines[name]
            batched = encoder(patches, q_emb, FRAMES)
            for b, (video, queries) in enumerate(zip(split_videos(patches, FRAMES), split_videos(q_emb, FRAMES))):
                alone = encoder(video, queries, [FRAMES[b]])
                where = f"{name} video {b}"
                torch.testing.assert_close(batched.video_tokens(b), alone.tokens, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, where=where: f"{where}: {m}")


def test_bad_inputs_raise_named_errors(baselines):
    patches, q_emb = make_inputs([3, 4])
    with pytest.raises(ValueError, match="run the Q-Former first"):
        baselines["llama-vid"](patches, None, [3, 4])
    with pytest.raises(ValueError, match="run the Q-Former first"):
        baselines[PAPER_DYNFOCUS](patches, None, [3, 4])
    with pytest.raises(ValueError, match="sums to 6"):
        baselines["full"](patches, q_emb, [3, 3])
    with pytest.raises(RequestError, match="at least one frame"):
        baselines["uniform-8"](patches, q_emb, [7, 0])
    with pytest.raises(ValueError, match="patch_tokens must be"):
        baselines["pool-4x4"](patches[:, :10], q_emb, [3, 4])
    poisoned = patches.clone()
    poisoned[5, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        baselines["full"](poisoned, q_emb, [3, 4])
    with pytest.raises(ValueError, match="frames >= 1"):
        DynFocusEncoder(baselines["full"].connector, 25, 0.8).count_tokens(0)


def test_encoders_by_name_equal_the_built_ones_and_table6_switches_equal_a_fresh_connector(connector, baselines):
    """encoder_by_name (what the engine and `dynfocus-infer eval` use) gives the built baselines' tokens for their
    names, any L / K/L and pool grid, and Table 6's switches equal a connector configured with them."""
    import dataclasses

    from dynfocus_infer.errors import ConfigError
    from dynfocus_infer.models.baselines import TABLE6_SWITCHES, encoder_by_name

    patches, q_emb = make_inputs(FRAMES, seed=6)
    with torch.no_grad():
        for name in ("full", "pool-4x4", "llama-vid", "uniform-3", "dynfocus-L10-r0.4"):
            got, want = encoder_by_name(connector, name)(patches, q_emb, FRAMES), baselines[name](patches, q_emb,
                                                                                                  FRAMES)
            assert got.num_tokens == want.num_tokens, name
            torch.testing.assert_close(got.tokens, want.tokens, msg=lambda m, name=name: f"{name}: {m}")
        pool2 = encoder_by_name(connector, "pool-2x2")
        assert pool2.count_tokens(5) == 20
        odd = encoder_by_name(connector, "dynfocus-L7-r0.3")
        assert odd.connector.config.num_events == 7 and odd.connector.config.keep_ratio == 0.3
        for name, switches in TABLE6_SWITCHES.items():
            encoder = encoder_by_name(connector, name)
            assert encoder.name == name and encoder.connector.mm_projector is connector.mm_projector
            fresh = DynFocusConnector(dataclasses.replace(connector.config, **switches), cluster_backend="reference")
            fresh.load_state_dict(connector.state_dict())
            got, want = encoder(patches, q_emb, FRAMES), fresh.eval()(patches, q_emb, FRAMES)
            assert got.num_tokens == want.num_tokens == tuple(count_visual_tokens(t, fresh.config) for t in FRAMES)
            torch.testing.assert_close(got.tokens, want.tokens, msg=lambda m, name=name: f"{name}: {m}")
        counts = {n: encoder_by_name(connector, n).count_tokens(17) for n in TABLE6_SWITCHES}
        paper = encoder_by_name(connector, PAPER_DYNFOCUS).count_tokens(17)
        assert counts["dynfocus-rods-off"] < paper and counts["dynfocus-cones-off"] < paper
        assert counts["dynfocus-coarse"] < paper < counts["dynfocus-uncompressed"]
    for bad in ("pool-3x3", "pool-4x2", "uniform-0", "dynfocus-L0-r0.5", "dynfocus-L5-r1.5", "bogus"):
        with pytest.raises(ConfigError, match="visual_encoder"):
            encoder_by_name(connector, bad)

"""SlowFocus per-frame tokens and mixing attention against plain-torch references written from the equations
(frame_tokens.py and mixing_attention.py docstrings), in float64 at tiny sizes."""
import math

import pytest
import torch

from dynfocus_infer.models.slowfocus import (SlowFocusConnector, SlowFocusConnectorConfig, build_slowfocus,
                                             mix_frequencies, temporal_buckets, tiny_slowfocus_config)

WIDTH, LLM, GRID, POOL = 8, 12, 4, 2


def _connector(mix_attn="bi", scale_low_to_high=False, seed=0):
    torch.manual_seed(seed)
    config = SlowFocusConnectorConfig(vision_width=WIDTH, llm_width=LLM, qformer_width=10, patch_grid=GRID,
                                      pool_grid=POOL, temporal_buckets=1000, mix_attn=mix_attn,
                                      scale_low_to_high=scale_low_to_high)
    connector = SlowFocusConnector(config).double()
    with torch.no_grad():
        connector.temporal_embedding.weight.normal_()  # visible next to the unit-scale features
    return connector


def _linear(layer, x):
    return x @ layer.weight.T + layer.bias


def _reference_mix(content, lfreq, hfreq, low_proj, high_proj, scale_low_to_high):
    """Row by row: each dense token softmax-reads the sparse tokens and vice versa; later writes win."""
    width = content.shape[-1]
    low = torch.cat([content[i] for i in lfreq])
    high = torch.cat([content[i] for i in hfreq])
    low_keys, high_keys = _linear(low_proj, low), _linear(high_proj, high)
    high_mix = torch.stack([torch.softmax(low_keys @ key / math.sqrt(width), 0) @ low for key in high_keys])
    divisor = math.sqrt(width) if scale_low_to_high else 1.0
    low_mix = torch.stack([torch.softmax(high_keys @ key / divisor, 0) @ high for key in low_keys])
    tokens = content.shape[1]
    mix = torch.zeros_like(content)
    for n, frame in enumerate(hfreq):
        mix[frame] = high_mix[n * tokens:(n + 1) * tokens]
    for n, frame in enumerate(lfreq):
        mix[frame] = low_mix[n * tokens:(n + 1) * tokens]
    return content + mix


def _reference_tokens(connector, patches, text_q, positions, lfreq, hfreq, scale_low_to_high=False):
    frames, _, width = patches.shape
    out = []
    contents = []
    for t in range(frames):
        keys = _linear(connector.vlm_att_key_projector, patches[t])
        attention = torch.softmax(text_q[t] @ keys.T / math.sqrt(width), dim=-1)
        context = _linear(connector.vlm_att_val_projector, (attention @ patches[t]).mean(0))
        grid = patches[t].reshape(GRID, GRID, width)
        stride = GRID // POOL
        pooled = torch.stack([grid[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean((0, 1))
                              for i in range(POOL) for j in range(POOL)])
        bucket = min(max(math.floor(1000 * positions[t]), 0), 999)
        contents.append(pooled + connector.temporal_embedding.weight[bucket])
        out.append(context)
    content = torch.stack(contents)
    if lfreq is not None:
        content = _reference_mix(content, lfreq, hfreq, connector.mix_attn_lfreq_projector,
                                 connector.mix_attn_hfreq_projector, scale_low_to_high)
    first, _, second = connector.mm_projector
    projected = _linear(second, torch.nn.functional.gelu(_linear(first, content)))
    return torch.cat([torch.stack(out)[:, None], projected], dim=1)


def _inputs(frames=5, queries=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(frames, GRID * GRID, WIDTH, generator=generator, dtype=torch.float64)
    text_q = torch.randn(frames, queries, WIDTH, generator=generator, dtype=torch.float64)
    positions = [0.0, 0.1234, 0.5, 0.77, 1.0][:frames]
    return patches, text_q, positions


@pytest.mark.parametrize("lfreq, hfreq", [([0, 2, 4], [1, 3]), ([0, 3], [1, 2, 4]), ([0], [0])])
@pytest.mark.parametrize("scale_low_to_high", [False, True])
def test_tokens_match_reference_with_mixing(lfreq, hfreq, scale_low_to_high):
    connector = _connector(scale_low_to_high=scale_low_to_high)
    patches, text_q, positions = _inputs()
    with torch.no_grad():
        ours = connector(patches, text_q, torch.tensor(positions, dtype=torch.float64),
                         torch.tensor(lfreq), torch.tensor(hfreq))
        expected = _reference_tokens(connector, patches, text_q, positions, lfreq, hfreq, scale_low_to_high)
    assert ours.shape == (5, 1 + POOL * POOL, LLM)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_unscaled_low_to_high_is_what_the_authors_trained():
    # The two settings must give different tokens for sparse frames, else the flag would test nothing.
    patches, text_q, positions = _inputs()
    args = (patches, text_q, torch.tensor(positions, dtype=torch.float64), torch.tensor([0, 2, 4]),
            torch.tensor([1, 3]))
    with torch.no_grad():
        unscaled = _connector(scale_low_to_high=False)(*args)
        scaled = _connector(scale_low_to_high=True)(*args)
    assert (unscaled[[0, 2, 4]] - scaled[[0, 2, 4]]).abs().max() > 1e-3
    torch.testing.assert_close(unscaled[[1, 3]], scaled[[1, 3]], atol=1e-12, rtol=0)  # dense rows: same scaling


@pytest.mark.parametrize("mix_attn", ["v1", "qkv", "none"])
def test_unapplied_mix_modes_match_the_reference_without_mixing(mix_attn):
    connector = _connector(mix_attn=mix_attn)
    patches, text_q, positions = _inputs()
    with torch.no_grad():
        ours = connector(patches, text_q, torch.tensor(positions, dtype=torch.float64))
        expected = _reference_tokens(connector, patches, text_q, positions, None, None)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)
    names = {name.split(".")[0] for name in connector.state_dict() if name.startswith("mix_attn_")}
    assert names == {"v1": {"mix_attn_hfreq_projector", "mix_attn_lfreq_projector"},
                     "qkv": {"mix_attn_q_projector", "mix_attn_k_projector", "mix_attn_v_projector"},
                     "none": set()}[mix_attn]


def test_temporal_buckets_truncate_and_clamp():
    positions = torch.tensor([0.0, 0.0004, 0.0015, 0.29, 0.4999, 0.5, 0.9995, 1.0, -0.1], dtype=torch.float64)
    assert temporal_buckets(positions).tolist() == [0, 0, 1, 290, 499, 500, 999, 999, 0]


@pytest.mark.parametrize("num_frames", [7, 100, 299, 1000, 2999])
def test_temporal_buckets_of_frame_positions_are_exact(num_frames):
    # positions i / n in fp64 (MergedFrames.positions) land in bucket floor(1000 i / n) for every frame; fp32 would
    # put e.g. 29 / 100 in bucket 289.
    positions = torch.tensor([i / num_frames for i in range(num_frames)], dtype=torch.float64)
    assert temporal_buckets(positions).tolist() == [1000 * i // num_frames for i in range(num_frames)]


def test_mixing_refuses_bad_frame_lists():
    connector = _connector()
    content = torch.zeros(3, 4, WIDTH, dtype=torch.float64)
    with pytest.raises(ValueError, match="hfreq_ids holds frame indices outside"):
        mix_frequencies(content, torch.tensor([0]), torch.tensor([3]), connector.mix_attn_lfreq_projector,
                        connector.mix_attn_hfreq_projector)
    with pytest.raises(ValueError, match="needs lfreq_ids and hfreq_ids"):
        patches, text_q, positions = _inputs()
        connector(patches, text_q, torch.tensor(positions, dtype=torch.float64))


def test_whole_model_feeds_the_qformer_through_bert_proj():
    model = build_slowfocus(tiny_slowfocus_config(), seed=0).double()
    config = model.config
    frames = 4
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(frames, 3, config.vit.image_size, config.vit.image_size, generator=generator,
                         dtype=torch.float64)
    question = torch.randint(0, config.qformer.vocab_size, (1, 6), generator=generator)
    positions = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    lfreq, hfreq = torch.tensor([0, 2]), torch.tensor([1, 3])
    tokens = model.encode_video(pixels, question, positions, lfreq_ids=lfreq, hfreq_ids=hfreq)
    with torch.no_grad():
        patches = model.vision_tower(pixels)
        text_q = model.qformer(model.connector.vlm_att_bert_proj(patches), question)
        expected = model.connector(patches, text_q, positions, lfreq, hfreq).flatten(0, 1)
    assert tokens.shape == (frames * model.tokens_per_frame, config.llm.hidden_size)
    torch.testing.assert_close(tokens, expected, atol=1e-12, rtol=0)
    assert model.connector.vlm_att_bert_proj.weight.shape == (config.qformer.encoder_width, config.vit.width)


def _padded(lists, offsets):
    width = max(len(rows) for rows in lists)
    return torch.tensor([[offset + r for r in rows] + [-1] * (width - len(rows))
                         for rows, offset in zip(lists, offsets)])


@pytest.mark.parametrize("scale_low_to_high", [False, True])
@pytest.mark.parametrize("mix_attn", ["bi", "none"])
def test_ragged_videos_at_once_equal_each_video_alone(scale_low_to_high, mix_attn):
    """The engine's batched path: videos of 1, 7, 3 and 6 frames (lists of uneven lengths, a frame in both lists,
    a one-frame video's [0], [0]) in one call equal `forward` video by video."""
    connector = _connector(mix_attn=mix_attn, scale_low_to_high=scale_low_to_high)
    lengths = [1, 7, 3, 6]
    lows = [[0], [0, 2, 3, 6], [0, 1, 2], [0, 2, 5]]
    highs = [[0], [1, 3, 4, 5], [1], [2, 3, 4]]
    generator = torch.Generator().manual_seed(5)
    total = sum(lengths)
    patches = torch.randn(total, GRID * GRID, WIDTH, generator=generator, dtype=torch.float64)
    text_q = torch.randn(total, 3, WIDTH, generator=generator, dtype=torch.float64)
    positions = torch.rand(total, generator=generator, dtype=torch.float64)
    offsets = [sum(lengths[:b]) for b in range(len(lengths))]
    with torch.no_grad():
        ours = connector.forward_ragged(patches, text_q, positions, _padded(lows, offsets), _padded(highs, offsets))
        for b, (start, count) in enumerate(zip(offsets, lengths)):
            rows = slice(start, start + count)
            alone = connector(patches[rows], text_q[rows], positions[rows], torch.tensor(lows[b]),
                              torch.tensor(highs[b]))
            torch.testing.assert_close(ours[rows], alone, atol=1e-12, rtol=0, msg=f"video {b}")
    assert connector.count_tokens(total) == ours.shape[0] * ours.shape[1]


def test_a_non_finite_video_spares_the_others_in_a_ragged_batch():
    """Video 0 holds NaN and the longest lists; the others, padded, must read none of its rows."""
    connector = _connector()
    lengths, lows, highs = [4, 1, 3], [[0, 2], [0], [0, 1]], [[1, 3], [0], [2]]
    generator = torch.Generator().manual_seed(9)
    total = sum(lengths)
    patches = torch.randn(total, GRID * GRID, WIDTH, generator=generator, dtype=torch.float64)
    patches[:4] = float("nan")
    text_q = torch.randn(total, 3, WIDTH, generator=generator, dtype=torch.float64)
    positions = torch.rand(total, generator=generator, dtype=torch.float64)
    offsets = [0, 4, 5]
    with torch.no_grad():
        ours = connector.forward_ragged(patches, text_q, positions, _padded(lows, offsets), _padded(highs, offsets))
        assert ours[:4].isnan().all()
        for b in (1, 2):
            rows = slice(offsets[b], offsets[b] + lengths[b])
            alone = connector(patches[rows], text_q[rows], positions[rows], torch.tensor(lows[b]),
                              torch.tensor(highs[b]))
            torch.testing.assert_close(ours[rows], alone, atol=1e-12, rtol=0, msg=f"video {b}")

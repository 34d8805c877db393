"""Connector parts on their own: frame pooling, temporal events over a ragged batch, the spatial merger, the event
scorer, token accounting and the official parameter layout (DESIGN.md section 5)."""
import pytest
import torch
import torch.nn.functional as F

import dynfocus_kernels.reference as dpc
from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.connector import (DynFocusConnector, convert_official_connector,
                                             export_official_connector)
from dynfocus_infer.models.connector_parts import cluster_events, cluster_ops, pool_frames, ragged_frames
from dynfocus_infer.models.event_scorer import EventScorer, masked_min_max_normalise
from dynfocus_infer.models.spatial_merger import SpatialMerger, group_prototypes
from dynfocus_infer.models.token_budget import (count_visual_tokens, count_visual_tokens_batch,
                                                frame_token_budget)

WIDTHS = dict(vision_width=32, llm_width=48, qformer_width=16)



def test_pool_frames_is_avg_pool2d_of_the_patch_grid():
    patches = torch.randn(5, 256, 7)
    expected = F.avg_pool2d(patches.transpose(1, 2).reshape(5, 7, 16, 16), 4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_frames(patches, 16, 4), expected)


@pytest.mark.parametrize("backend, frames, num_events", [
    ("reference", [30, 1, 4, 25, 26, 2], 25),
    ("triton", [9, 1, 3, 6, 7], 6),
])
def test_events_of_a_ragged_batch_match_per_video_dpc_knn(backend, frames, num_events):
    config = ConnectorConfig(**WIDTHS, num_events=num_events)
    pooled = torch.randn(sum(frames), 16, 32)
    layout = ragged_frames(frames, sum(frames), config, torch.device("cpu"))
    events = cluster_events(pooled, layout, config, cluster_ops(backend, pooled.device))
    start = 0
    for b, T in enumerate(frames):
        L = min(num_events, T)
        expected = dpc.dpc_knn(pooled[start:start + T].flatten(1)[None], L, 5, weight="rho_delta")
        assert events.centres[b, :L].tolist() == expected.centers[0].tolist(), f"video {b}"
        assert events.valid[b].tolist() == [l < L for l in range(events.valid.shape[1])]
        torch.testing.assert_close(events.prototypes[b, :L], expected.prototypes[0], atol=1e-5, rtol=1e-5)
        assert (events.prototypes[b, L:] == 0).all() and (events.centres[b, L:] == 0).all()
        start += T


def test_grouping_orders_clusters_then_members_and_scales_them():
    T, c1, c2, C = 4, 9, 4, 5
    first, second = torch.randn(T, c1, C), torch.randn(T, c2, C)
    owner = torch.randint(0, c2 - 1, (T, c1))  # cluster c2 - 1 has no members: it contributes Z2 alone
    owner[:, :c2 - 1] = torch.arange(c2 - 1)
    modulation = torch.rand(T, c2)
    grouped = group_prototypes(first, second, owner, modulation)
    for t in range(T):
        expected = []
        for v in range(c2):
            members = [second[t, v]] + [first[t, i] for i in range(c1) if owner[t, i] == v]
            expected += [m * modulation[t, v] for m in members]
        torch.testing.assert_close(grouped[t], torch.stack(expected), rtol=0, atol=0)


def test_spatial_merger_has_the_official_layout_and_matches_across_backends():
    config = ConnectorConfig(**WIDTHS, patch_grid=8)
    merger = SpatialMerger(config, cluster_backend="reference")
    shapes = {name: tuple(t.shape) for name, t in merger.state_dict().items()}
    assert shapes == {"proj_k.weight": (512, 32), "proj_k.bias": (512,), "proj_q.weight": (512, 32),
                      "proj_q.bias": (512,), "score.weight": (6, 6), "score.bias": (6,),
                      "norm.weight": (32,), "norm.bias": (32,)}
    official = {name: torch.randn_like(t) for name, t in merger.state_dict().items()}
    merger.load_state_dict(official)  # strict
    patches = torch.randn(3, 64, 32)
    grouped = merger(patches)
    assert grouped.shape == (3, 22, 32)
    triton_merger = SpatialMerger(config, cluster_backend="triton")
    triton_merger.load_state_dict(official)
    torch.testing.assert_close(triton_merger(patches), grouped, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="patch_tokens must be"):
        merger(patches[:, :8])


def predictor_lg(scorer, x):
    """The official PredictorLG.forward, written out (one video: x [1, L, 2C])."""
    x = scorer.in_conv(x)
    half = x.shape[-1] // 2
    x = torch.cat([x[..., :half], x[..., half:].mean(dim=1, keepdim=True).expand(-1, x.shape[1], -1)], dim=-1)
    return scorer.out_conv(x).squeeze(-1)


def test_event_scorer_masks_padding_in_the_per_video_mean():
    torch.manual_seed(0)
    scorer = EventScorer(32)
    assert sorted(scorer.state_dict()) == sorted(
        f"{layer}.{p}" for layer in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4")
        for p in ("weight", "bias"))
    assert scorer.out_conv[4].weight.shape == (1, 16)
    lengths = [5, 1, 3]
    summaries = torch.randn(3, 5, 64)
    valid = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    padded = summaries.masked_fill(~valid[..., None], 1e3)  # padding must not leak into the mean
    scores = scorer(padded, valid)
    for b, L in enumerate(lengths):
        torch.testing.assert_close(scores[b, :L], predictor_lg(scorer, summaries[b:b + 1, :L])[0])
        assert (scores[b, L:] == 0).all()
    normalised = masked_min_max_normalise(scores, valid)
    for b, L in enumerate(lengths):
        s = scores[b, :L]
        torch.testing.assert_close(normalised[b, :L], (s - s.min()) / (s.max() - s.min() + 1e-5))


def test_token_budget_follows_table_6():
    def budget(**switches):
        b = frame_token_budget(ConnectorConfig(**switches))
        return b.other_tokens, b.key_tokens

    assert budget() == (2, 40)
    assert budget(rods=False) == (0, 40)
    assert budget(cone_mode="off") == (2, 0)
    assert budget(cone_mode="uncompressed") == (2, 256)
    assert budget(cone_mode="coarse") == (2, 2)
    config = ConnectorConfig()
    assert count_visual_tokens(1, config) == 40
    assert count_visual_tokens(25, config) == 20 * 40 + 5 * 2
    assert count_visual_tokens(200, config) == 20 * 40 + 180 * 2
    assert count_visual_tokens(3, config) == 2 * 40 + 2  # L = 3, K = round(2.4) = 2
    with pytest.raises(ValueError, match="at least|>= 1"):
        count_visual_tokens(0, config)


@pytest.mark.parametrize("switches", [{}, dict(keep_ratio=0.5, num_events=7), dict(cone_mode="uncompressed"),
                                      dict(rods=False, keep_ratio=0.3), dict(cone_mode="coarse")])
def test_batched_token_count_agrees_with_the_scalar_form(switches):
    config = ConnectorConfig(**switches)
    frames = list(range(1, 90))
    expected = [count_visual_tokens(t, config) for t in frames]
    assert count_visual_tokens_batch(frames, config) == expected
    assert count_visual_tokens_batch(torch.tensor(frames, dtype=torch.int32), config).tolist() == expected


def official_checkpoint(connector):
    """An official-layout state dict: connector parts under their official names, plus parts it must skip."""
    exported = export_official_connector(connector.state_dict())
    extras = {"model.vlm_att_em_projector.weight": torch.zeros(3), "sf_former.slow_proj.weight": torch.zeros(3),
              "selective_net.merge.score.weight": torch.zeros(6, 6), "model.layers.0.mlp.up_proj.weight":
              torch.zeros(2), "model.vlm_att_projector.weight": torch.zeros(4), "lm_head.weight": torch.zeros(1)}
    return {**exported, **extras}


def test_official_state_dict_round_trip():
    config = ConnectorConfig(**WIDTHS)
    torch.manual_seed(1)
    source = DynFocusConnector(config)
    official = official_checkpoint(source)
    assert "model.mm_projector.0.weight" in official and "model.mm_projector.2.bias" in official
    assert "model.vlm_att_key_projector.weight" in official and "model.vlm_att_val_projector.bias" in official
    assert "merge.score.weight" in official and "selective_net.score_network.out_conv.4.weight" in official
    converted = convert_official_connector(official, config)
    torch.manual_seed(2)
    target = DynFocusConnector(config)
    target.load_state_dict(converted)  # strict
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert export_official_connector(converted).keys() == export_official_connector(source.state_dict()).keys()


def test_official_state_dict_errors_name_the_keys():
    config = ConnectorConfig(**WIDTHS)
    official = official_checkpoint(DynFocusConnector(config))
    missing = {k: v for k, v in official.items() if k != "merge.score.bias"}
    with pytest.raises(CheckpointError, match="missing.*merge.score.bias"):
        convert_official_connector(missing, config)
    wrong = dict(official, **{"model.vlm_att_val_projector.weight": torch.zeros(5, 32)})
    with pytest.raises(CheckpointError, match="wrong shape.*vlm_att_val_projector.weight"):
        convert_official_connector(wrong, config)
    with pytest.raises(CheckpointError, match="no connector weights"):
        convert_official_connector({"lm_head.weight": torch.zeros(1)}, config)


def test_connector_falls_back_to_the_torch_mask_builder_with_identical_results(monkeypatch):
    import dynfocus_infer.ops as topk_ops

    torch.manual_seed(3)
    connector = DynFocusConnector(ConnectorConfig(**WIDTHS, patch_grid=8), cluster_backend="reference").eval()
    frames = [30, 2, 7]
    patches, q_emb = torch.randn(39, 64, 32), torch.randn(39, 32, 32)
    with torch.no_grad():
        compiled = connector(patches, q_emb, frames)

        def missing_extension():
            raise ImportError("dynfocus_infer._csrc is not built")

        monkeypatch.setattr(topk_ops, "has_cuda_build", missing_extension)
        fallback = connector(patches, q_emb, frames)
    for name in ("keyframes", "frame_mask", "frame_token_offsets", "token_offsets", "tokens"):
        assert torch.equal(getattr(compiled, name), getattr(fallback, name)), name

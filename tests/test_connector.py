"""The fused DynFocus connector against the frame-by-frame reference connector (DESIGN.md section 5).

Every case checks, per video inside a ragged batch: token count (also against count_visual_tokens), keyframe ids
and event centres exactly, tokens and scores within fp32 tolerance, and the layout fields (offsets, frame mask).
Small widths (C = 32, llm 48); the Triton path runs through the interpreter on a CPU machine.
"""
import pytest
import torch

from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.errors import RequestError
from dynfocus_infer.models.connector import DynFocusConnector
from dynfocus_infer.models.connector_reference import reference_connector
from dynfocus_infer.models.token_budget import count_visual_tokens, num_keyframes
from kernel_utils import poison_empty

WIDTHS = dict(vision_width=32, llm_width=48, qformer_width=16)



def make_connector(backend="reference", seed=0, **overrides):
    torch.manual_seed(seed)
    connector = DynFocusConnector(ConnectorConfig(**WIDTHS, **overrides), cluster_backend=backend).eval()
    with torch.no_grad():  # non-trivial LayerNorm / modulation parameters, so they matter in the comparison
        for module in (connector.event_scorer.in_conv[0], connector.merge.score):
            module.weight.add_(0.3 * torch.randn_like(module.weight))
            module.bias.add_(0.3 * torch.randn_like(module.bias))
    return connector


def make_inputs(frames, config, seed=1, static=()):
    """Packed patch tokens and q_emb for videos of `frames` frames; videos listed in `static` repeat one frame."""
    g = torch.Generator().manual_seed(seed)
    total = sum(frames)
    patches = torch.randn(total, config.patch_grid ** 2, config.vision_width, generator=g)
    start = 0
    for b, num_frames in enumerate(frames):
        if b in static:
            patches[start:start + num_frames] = patches[start]
        start += num_frames
    q_emb = torch.randn(total, config.num_queries, config.vision_width, generator=g)
    return patches, q_emb


def assert_matches_reference(connector, frames, *, static=(), seed=1, atol=2e-5):
    config = connector.config
    patches, q_emb = make_inputs(frames, config, seed=seed, static=static)
    with torch.no_grad():
        out = connector(patches, q_emb, frames)
    expected = reference_connector(connector, patches, q_emb, frames)
    assert out.tokens.shape == (sum(out.num_tokens), config.llm_width)
    assert torch.isfinite(out.tokens).all(), "a token row was never written"
    assert out.token_offsets.tolist() == [sum(out.num_tokens[:b]) for b in range(len(frames) + 1)]
    for b, (num_frames, ref) in enumerate(zip(frames, expected)):
        assert out.num_tokens[b] == ref.tokens.shape[0] == count_visual_tokens(num_frames, config), f"video {b}"
        keyframes = out.keyframes[b][out.keyframes[b] >= 0].tolist()
        assert keyframes == ref.keyframes, f"video {b}: keyframes {keyframes} != {ref.keyframes}"
        assert len(keyframes) == num_keyframes(num_frames, config)
        assert out.frame_mask[b].nonzero().flatten().tolist() == keyframes
        L = len(ref.centres)
        assert out.event_centres[b, :L].tolist() == ref.centres, f"video {b}: event centres"
        torch.testing.assert_close(out.scores[b, :L], ref.scores, atol=atol, rtol=1e-4)
        torch.testing.assert_close(out.video_tokens(b), ref.tokens, atol=atol, rtol=1e-4)
        offsets = out.frame_token_offsets[b]
        assert offsets[num_frames] == out.num_tokens[b] and (offsets[num_frames:] == out.num_tokens[b]).all()
    return out


def test_ragged_batch_matches_reference_at_full_patch_grid():
    # T = 1, 2, 16, 25, 26 covers one frame, fewer frames than events, L = T exactly, and L < T (assignment).
    assert_matches_reference(make_connector(), [26, 1, 16, 2, 25])


def test_long_video_matches_reference():
    out = assert_matches_reference(make_connector(seed=3, patch_grid=8), [200])
    assert out.num_tokens == (20 * 40 + 180 * 2,)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_long_and_short_videos_in_one_batch_match_reference(backend):
    assert_matches_reference(make_connector(backend, seed=4, patch_grid=8), [3, 200, 1, 40],
                             atol=2e-5 if backend == "reference" else 1e-4)


@pytest.mark.parametrize("frames", [[9, 1, 3, 6], [7]])
def test_triton_interpreter_path_matches_reference(frames, monkeypatch):
    # num_events = 6 puts videos on both sides of L = T with few frames (the interpreter is slow).
    connector = make_connector("triton", seed=5, patch_grid=8, num_events=6)
    poison_empty(monkeypatch)
    assert_matches_reference(connector, frames, atol=1e-4)


def constant_scorer(connector):
    """Zero the scorer's last layer: every prototype scores its bias exactly, so all scores tie exactly
    (identical prototypes alone do not guarantee that: BLAS may round rows of one GEMM differently)."""
    with torch.no_grad():
        connector.event_scorer.out_conv[4].weight.zero_()
    return connector


def test_static_video_ties_resolve_to_lowest_ids():
    # Identical frames: densities and distances tie (centres come in index order), scores tie exactly, and the
    # lowest prototype ids, i.e. frames 0..K-1, win.
    connector = constant_scorer(make_connector(seed=6, patch_grid=8))
    out = assert_matches_reference(connector, [12, 30, 5], static=(0, 1, 2))
    assert out.event_centres[1].tolist() == list(range(25))
    assert out.keyframes.tolist() == [list(range(10)) + [-1] * 10, list(range(20)), list(range(4)) + [-1] * 16]


def test_static_video_through_triton_interpreter():
    connector = constant_scorer(make_connector("triton", seed=7, patch_grid=8, num_events=5))
    out = assert_matches_reference(connector, [7, 2, 3], static=(0, 1), atol=1e-4)
    assert out.keyframes[:2].tolist() == [[0, 1, 2, 3], [0, 1, -1, -1]]


def test_static_long_video_keeps_distinct_keyframes():
    # With a real scorer, identical prototypes may score an ulp apart (GEMM row rounding; event 0 also pools six
    # copies of the frame), and min-max normalisation (eps 1e-5) turns that into an arbitrary order among the
    # tied events. So this checks the structure only: K distinct keyframes among the 25 event centres (frames
    # 0..24, by the index tie rule), finite tokens, the exact count.
    connector = make_connector(seed=6, patch_grid=8)
    patches, q_emb = make_inputs([30, 4], connector.config, static=(0,))
    with torch.no_grad():
        out = connector(patches, q_emb, [30, 4])
    keyframes = out.keyframes[0].tolist()
    assert len(set(keyframes)) == 20 and set(keyframes) <= set(out.event_centres[0].tolist())
    assert set(out.event_centres[0].tolist()) == set(range(25))
    assert torch.isfinite(out.tokens).all() and out.num_tokens[0] == count_visual_tokens(30, connector.config)


def test_one_frame_videos():
    out = assert_matches_reference(make_connector(seed=8, patch_grid=8), [1, 1, 1])
    assert out.num_tokens == (40, 40, 40)
    assert out.keyframes.tolist() == [[0], [0], [0]]


@pytest.mark.parametrize("switches, budget", [
    (dict(rods=False), (0, 40)),
    (dict(cone_mode="off"), (2, 0)),
    (dict(cone_mode="uncompressed"), (2, 64)),
    (dict(cone_mode="coarse"), (2, 2)),
    (dict(cone_mode="coarse", rods=False), (0, 2)),
    (dict(cone_mode="uncompressed", rods=False), (0, 64)),
    (dict(num_events=4, keep_ratio=0.5, temporal_k=2), (2, 40)),
    (dict(spatial_centers=(8, 3), spatial_k=(4, 2)), (2, 29)),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ablation_switches_match_reference_and_token_accounting(switches, budget, backend, monkeypatch):
    connector = make_connector(backend, seed=9, patch_grid=8, **switches)
    poison_empty(monkeypatch)
    frames = [11, 1, 4]
    out = assert_matches_reference(connector, frames)
    other, key = budget
    for b, num_frames in enumerate(frames):
        K = num_keyframes(num_frames, connector.config)
        assert out.num_tokens[b] == K * key + (num_frames - K) * other


def test_tokens_do_not_depend_on_batch_neighbours():
    connector = make_connector(seed=10, patch_grid=8)
    patches, q_emb = make_inputs([30, 5], connector.config, seed=11)
    with torch.no_grad():
        together = connector(patches, q_emb, [30, 5])
        alone = connector(patches[30:], q_emb[30:], torch.tensor([5]))
    torch.testing.assert_close(together.video_tokens(1), alone.tokens, atol=1e-5, rtol=1e-5)
    assert together.keyframes[1, :4].tolist() == alone.keyframes[0].tolist()


def test_bad_inputs_raise_clear_errors():
    connector = make_connector(patch_grid=8)
    patches, q_emb = make_inputs([3, 2], connector.config)
    with pytest.raises(ValueError, match="q_emb must be"):
        connector(patches, q_emb[:4], [3, 2])
    with pytest.raises(ValueError, match="q_emb must be"):
        connector(patches, q_emb[..., :16], [3, 2])
    with pytest.raises(ValueError, match="patch_tokens must be"):
        connector(patches[:, :10], q_emb, [3, 2])
    with pytest.raises(ValueError, match="sums to 4 but the packed inputs hold 5"):
        connector(patches, q_emb, [3, 1])
    with pytest.raises(RequestError, match="video 1 has 0 frames"):
        connector(patches, q_emb, [5, 0])
    with pytest.raises(RequestError, match="empty"):
        connector(patches[:0], q_emb[:0], [])
    bad = patches.clone()
    bad[4, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        connector(bad, q_emb, [3, 2])
    with pytest.raises(ValueError, match="cluster_backend"):
        DynFocusConnector(connector.config, cluster_backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patch_tokens_may_be_a_strided_view_of_the_vit_output(backend):
    # The model passes v[:, 1:] (CLS dropped) of the ViT output [sum T, 1 + g*g, C] without a copy.
    connector = make_connector(backend, seed=12, patch_grid=8, num_events=4)
    patches, q_emb = make_inputs([5, 2], connector.config, seed=13)
    vit_output = torch.cat([torch.randn(7, 1, 32), patches], dim=1)
    with torch.no_grad():
        strided = connector(vit_output[:, 1:], q_emb, [5, 2])
        contiguous = connector(patches, q_emb, [5, 2])
    assert torch.equal(strided.keyframes, contiguous.keyframes)
    torch.testing.assert_close(strided.tokens, contiguous.tokens, rtol=0, atol=0)


def test_the_token_ops_pass_opcheck(monkeypatch):
    """dynfocus::projector_inputs and dynfocus::scatter_tokens, with the arguments a connector call gives them."""
    from dynfocus_kernels import library

    recorded = {}
    for name in ("projector_inputs", "scatter_tokens"):
        original = getattr(library, name)

        def record(*args, _name=name, _original=original):
            recorded[_name] = args
            return _original(*args)

        monkeypatch.setattr(library, name, record)
    connector = make_connector("triton", seed=12, patch_grid=8, num_events=4)
    patches, q_emb = make_inputs([6, 2], connector.config)
    with torch.no_grad():
        connector(patches, q_emb, [6, 2])
    monkeypatch.undo()
    assert set(recorded) == {"projector_inputs", "scatter_tokens"}
    for name, args in recorded.items():
        torch.library.opcheck(getattr(library, name), args)


def test_a_nan_video_keeps_every_index_in_bounds_and_spares_its_neighbours():
    """All-NaN features make every comparison false, so ranks collide and output slots go unwritten; the kernels
    must still index in bounds (on a GPU a fault would cost the whole batch) and the other videos' tokens must be
    unchanged. The engine then fails the NaN request (tests/test_engine.py)."""
    connector = make_connector("triton", seed=13, patch_grid=8, num_events=4)
    patches, q_emb = make_inputs([5, 7, 4], connector.config, seed=3)
    patches[5:12] = float("nan")
    with torch.no_grad():
        out = connector(patches, q_emb, [5, 7, 4], check=False)
        neighbours = connector(torch.cat([patches[:5], patches[12:]]), torch.cat([q_emb[:5], q_emb[12:]]), [5, 4])
    assert out.tokens.shape[0] == sum(out.num_tokens)
    assert ((out.keyframes[1] >= -1) & (out.keyframes[1] < 7)).all()
    assert ((out.event_centres[1] >= 0) & (out.event_centres[1] < 7)).all()
    torch.testing.assert_close(out.video_tokens(0), neighbours.video_tokens(0))
    torch.testing.assert_close(out.video_tokens(2), neighbours.video_tokens(1))

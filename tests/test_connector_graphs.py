"""The connector's CUDA-graph path (core/connector_graphs.py): bucket layouts, static buffers and copies, against
plain connector calls. On a CPU the capture is an eager stand-in that reruns the forward on the static buffers (so a
forward that kept anything of the first batch but the bucket would answer the second batch wrongly); the gpu-marked
test captures real graphs."""
import numpy as np
import pytest
import torch

from dynfocus_infer.core.connector_graphs import ConnectorGraphs, frame_bucket
from dynfocus_infer.models.connector_parts import bucket_layout, bucket_layout_size
from dynfocus_infer.models.token_budget import count_visual_tokens, num_keyframes
from engine_utils import eager_connector_capture
from test_connector import make_connector, make_inputs

SMALL = dict(patch_grid=8, num_events=5, keep_ratio=0.4)  # T > 5: the long-video assignment runs; T < 4: K_b < K_max


def test_frame_buckets_pad_little():
    assert [frame_bucket(t) for t in (1, 3, 4, 5, 12, 16, 17, 31, 33, 64, 65, 200)] == \
        [4, 4, 4, 8, 12, 16, 20, 32, 36, 64, 72, 208]
    for t in range(1, 3000):
        bucket = frame_bucket(t)
        assert bucket >= t and (bucket - t < 4 or (bucket - t) / t < 0.125), t


def test_bucket_layout_pads_videos_frames_and_keyframe_slots():
    connector = make_connector(**SMALL)
    config = connector.config
    into = torch.full((bucket_layout_size(4, 8, config),), -7, dtype=torch.int64)
    layout = bucket_layout([7, 2], 4, 8, config, torch.device("cpu"), into=into)
    assert (into != -7).all()  # the whole buffer is the layout
    assert all(t.untyped_storage().data_ptr() == into.untyped_storage().data_ptr()
               for t in layout[3:13])
    assert layout.num_frames == (7, 2, 1, 1) and layout.frames.tolist() == [7, 2, 1, 1]
    assert layout.events.tolist() == [5, 2, 1, 1]
    keep = [num_keyframes(t, config) for t in (7, 2, 1, 1)]
    assert layout.keep.tolist() == keep
    assert layout.frame_starts.tolist() == [0, 8, 16, 24]
    assert layout.video_of_frame.tolist() == np.repeat(np.arange(4), 8).tolist()
    assert layout.time_of_frame.tolist() == list(range(8)) * 4
    k_max = num_keyframes(8, config)
    assert (layout.max_frames, layout.max_events, layout.max_keep, layout.any_long) == (8, 5, k_max, True)
    assert layout.keyframe_slot.tolist() == list(range(k_max)) * 4
    counts = [count_visual_tokens(t, config) for t in (7, 2, 1, 1)]
    assert layout.token_starts.tolist() == np.cumsum([0] + counts).tolist()
    assert layout.token_rows == 4 * count_visual_tokens(8, config) and layout.bucketed
    with pytest.raises(ValueError, match="does not fit the bucket"):
        bucket_layout([9], 1, 8, config, torch.device("cpu"))
    with pytest.raises(ValueError, match="static layout buffer"):
        bucket_layout([7, 2], 4, 8, config, torch.device("cpu"), into=into[1:])


def assert_same_output(out, ref):
    assert out.num_tokens == ref.num_tokens
    torch.testing.assert_close(out.tokens, ref.tokens, atol=1e-5, rtol=1e-4)
    for name in ("token_offsets", "frame_token_offsets", "keyframes", "frame_mask", "event_centres"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-4)


def test_graphs_replay_ragged_batches_like_plain_calls():
    connector = make_connector("triton", **SMALL)
    graphs = ConnectorGraphs(connector, max_videos=4, max_frames=16, capture=eager_connector_capture)
    batches = [([9, 1, 6], 1), ([12, 2, 3], 2), ([4, 4], 3), ([30], 4)]   # the second replays the first's bucket
    assert [graphs.bucket(frames) for frames, _ in batches] == [(4, 12), (4, 12), (2, 4), None]
    outputs = []
    with torch.no_grad():
        for frames, seed in batches:
            patches, q_emb = make_inputs(frames, connector.config, seed=seed)
            ref = connector(patches, q_emb, frames, check=False)
            outputs.append((graphs(patches, q_emb, frames), ref))
    for out, ref in outputs:  # the first batch's output survived the second's replay: it was copied out
        assert_same_output(out, ref)
    assert graphs.replays == 3 and sorted(graphs.graphs) == [(2, 4), (4, 12)] and graphs.disabled is None


def test_a_failed_capture_runs_eagerly_from_then_on():
    connector = make_connector("triton", **SMALL)

    def failing(forward):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = ConnectorGraphs(connector, capture=failing)
    frames = [3, 2]
    patches, q_emb = make_inputs(frames, connector.config)
    with torch.no_grad():
        assert_same_output(graphs(patches, q_emb, frames), connector(patches, q_emb, frames, check=False))
    assert "stream is capturing" in graphs.disabled and graphs.replays == 0 and not graphs.graphs


def test_wasteful_buckets_and_the_memory_cap_run_eagerly():
    connector = make_connector("triton", **SMALL)
    graphs = ConnectorGraphs(connector, max_videos=64, max_frames=512, capture=eager_connector_capture)
    assert graphs.bucket([300] + [1] * 32) is None             # (48, 320): 15,360 rows for 332 frames
    assert graphs.bucket([300, 280]) == (2, 320) and graphs.bucket([3] * 33) == (48, 4)
    frames = [3, 2]
    patches, q_emb = make_inputs(frames, connector.config)
    small = ConnectorGraphs(connector, max_static_bytes=patches[:1].nbytes, capture=eager_connector_capture)
    with torch.no_grad():
        assert_same_output(small(patches, q_emb, frames), connector(patches, q_emb, frames, check=False))
    assert small.replays == 0 and not small.graphs and small.static_bytes == 0 and small.disabled is None


def test_bad_inputs_get_the_connectors_errors():
    graphs = ConnectorGraphs(make_connector("triton", **SMALL), capture=eager_connector_capture)
    patches, q_emb = make_inputs([3, 2], graphs.connector.config)
    with torch.no_grad(), pytest.raises(ValueError, match="sums to 4"):
        graphs(patches, q_emb, [2, 2])
    with torch.no_grad(), pytest.raises(ValueError, match="q_emb must be"):
        graphs(patches, q_emb[:, :3, :5], [3, 2])
    assert not graphs.graphs


@pytest.mark.gpu
def test_cuda_graphs_match_eager_calls():
    connector = make_connector("triton", **SMALL).cuda().to(torch.bfloat16)
    graphs = ConnectorGraphs(connector, max_videos=4, max_frames=32)
    with torch.no_grad():
        for frames, seed in (([9, 1, 6], 1), ([12, 2, 7], 2), ([20, 20], 3), ([9, 1, 6], 4)):
            patches, q_emb = (t.cuda() for t in make_inputs(frames, connector.config, seed=seed))
            ref = connector(patches, q_emb, frames, check=False)
            out = graphs(patches, q_emb, frames)
            assert out.num_tokens == ref.num_tokens
            torch.testing.assert_close(out.tokens.float(), ref.tokens.float(), atol=2e-2, rtol=2e-2)
            assert torch.equal(out.keyframes, ref.keyframes) and torch.equal(out.frame_mask, ref.frame_mask)
    assert graphs.disabled is None and graphs.replays == 4


def test_the_engine_answers_the_same_through_connector_graphs(tmp_path):
    """Videos of different lengths in one engine batch (fps sampling), with the stand-in capture: the same tokens as
    the plain connector call, and every batch served by a graph."""
    from dynfocus_infer.engine import LLM
    from dynfocus_infer.outputs import Request
    from dynfocus_infer.sampling import SamplingParams
    from dynfocus_infer.video import write_test_video

    paths = []
    for i, frames in enumerate((24, 12, 40)):
        paths.append(str(tmp_path / f"v{i}.mp4"))
        write_test_video(paths[-1], num_frames=frames, fps=8, num_scenes=1 + i)
    llm = LLM("tiny", fps=2.0, max_frames=8, cluster_backend="triton", seed=3)
    requests = [Request("What happens?", path, request_id=str(i)) for i, path in enumerate(paths)]
    params = SamplingParams(max_tokens=4)
    eager = llm.generate(requests, params)
    llm.visual.connector_graphs = graphs = ConnectorGraphs(llm.model.connector, capture=eager_connector_capture)
    replayed = llm.generate(requests, params)
    assert graphs.replays >= 1 and graphs.disabled is None
    for a, b in zip(eager, replayed):
        assert a.ok and b.ok, (a.error, b.error)
        assert a.tokens.frames != 0 and a.tokens.visual_tokens == b.tokens.visual_tokens
        assert a.tokens.keyframes == b.tokens.keyframes and a.token_ids == b.token_ids
    assert len({a.tokens.frames for a in eager}) > 1  # a ragged batch

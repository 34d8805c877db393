"""bench/count_ops.py counts what one call issues: Triton launches (also under the interpreter) and the other PyTorch
operators, custom ops apart (the connector's counts: tests/test_connector_bench.py)."""
import sys
from pathlib import Path

import torch

import dynfocus_kernels as K
from dynfocus_kernels.gram import dpc_knn_gram

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from count_ops import count_calls  # noqa: E402


def test_plain_torch_counts_its_operators_and_no_launch():
    x = torch.randn(3, 4)
    result, counts = count_calls(lambda: (x + 1).sum())
    assert torch.equal(result, (x + 1).sum())
    assert (counts.launches, counts.ops, counts.custom) == (0, 2, 0)
    assert counts.by_op == {"aten.add": 1, "aten.sum": 1}


def test_dpc_knn_launches_one_kernel_per_pass():
    x = torch.randn(2, 30, 16)
    result, v1 = count_calls(lambda: K.dpc_knn(x, 4, 3, check=False))
    assert torch.equal(result.centers, K.dpc_knn(x, 4, 3, check=False).centers)
    assert dict(v1.by_kernel) == {name: 1 for name in ("_sq_norm_kernel", "_knn_density_kernel",
                                                         "_density_delta_kernel", "_select_centers_kernel",
                                                         "_assign_kernel", "_weighted_pool_fwd_kernel")}
    assert v1.launches == v1.custom == 6 and v1.ops > 0
    _, v2 = count_calls(lambda: dpc_knn_gram(x, 4, 3, check=False))
    # v2: the distances once, the density and delta kernels reading them, the assignment a gather of them.
    assert dict(v2.by_kernel) == {name: 1 for name in ("_sq_norm_kernel", "_sq_dist_matrix_kernel",
                                                         "_knn_density_kernel", "_density_delta_kernel",
                                                         "_select_centers_kernel", "_weighted_pool_fwd_kernel")}



def test_connector_inference_stays_within_12_launches_and_60_work_ops():
    """Issue 12's glue target: one connector call for a ragged batch issues at most 12 Triton launches and 60 operators
    that may launch device work, whatever the number of videos and frames, under every Table 6 switch, and never
    reads the device (no aten._local_scalar_dense)."""
    from dynfocus_infer.config import ConnectorConfig
    from dynfocus_infer.models.connector import DynFocusConnector

    for switches in ({}, {"cone_mode": "uncompressed"}, {"rods": False}, {"cone_mode": "coarse"}):
        config = ConnectorConfig(vision_width=16, llm_width=24, qformer_width=16, patch_grid=8, num_events=6,
                                 **switches)
        connector = DynFocusConnector(config, cluster_backend="triton").eval()
        seen = set()
        for frames in ([1], [6], [3, 3], [12, 2, 5], [9] * 6):
            patches, q_emb = torch.randn(sum(frames), 64, 16), torch.randn(sum(frames), 32, 16)
            with torch.no_grad():
                out, counts = count_calls(lambda: connector(patches, q_emb, frames, check=False))
            assert out.tokens.shape[0] == sum(out.num_tokens)
            assert counts.launches <= 12 and counts.work_ops <= 60, (switches, frames, counts.by_work_op)
            assert "aten._local_scalar_dense" not in counts.by_op, (switches, frames)
            seen.add((counts.launches, counts.work_ops))
        # A batch with a video longer than L adds the assignment launch and one merge; nothing else varies.
        assert len(seen) <= 2 and max(seen)[0] - min(seen)[0] <= 1, seen

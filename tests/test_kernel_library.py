"""The DPC-KNN custom ops (kernels/library.py): torch.library's own checks (schema, fake tensors, autograd
registration, AOT dispatch), and torch.compile tracing dpc_knn in one graph, forward and backward, with the eager
result."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import library
from dynfocus_kernels.distance import column_splits, launch_config, lengths_i32, prepare_points
from dynfocus_kernels.library import weighted_pool_backward_op, weighted_pool_op
from kernel_utils import make_points, ragged_lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_distance_ops_pass_opcheck(dtype):
    x = make_points(2, 19, 12, dtype, seed=3)
    lens = ragged_lengths(2, 19, seed=3, minimum=5)
    points, sq = prepare_points(x, lens)
    lengths = lengths_i32(x, lens)
    splits, cols = column_splits(x, launch_config(19, 12, points.dtype), 2)
    rho = K.knn_density(x, 3, valid_len=lens)
    centers = K.select_centers(rho, 4, valid_len=lens)
    d = library.sq_dist_rows(points, sq, lengths, 0, 19)
    for op, args in [(library.sq_norms_op, (points,)),
                     (library.knn_best, (points, sq, lengths, 3, splits, cols, None)),
                     (library.knn_best, (points, sq, lengths, 3, splits, cols, d)),
                     (library.delta_near_far, (points, sq, rho, lengths, splits, cols, None)),
                     (library.delta_near_far, (points, sq, rho, lengths, splits, cols, d)),
                     (library.sq_dist_rows, (points, sq, lengths, 0, 19)),
                     (library.sq_dist_rows, (points, sq, lengths, 5, 9)),
                     (library.select_centers_op, (rho, lengths, 4)), (library.assign, (points, sq, lengths, centers))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("with_weight", [True, False])
def test_weighted_pool_ops_pass_opcheck(with_weight):
    x = make_points(2, 13, 10, torch.float32, seed=4).requires_grad_()
    assignment = torch.randint(-1, 3, (2, 13), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    weight = torch.rand(2, 13).requires_grad_() if with_weight else None
    torch.library.opcheck(weighted_pool_op, (x, assignment, weight, 3))
    with torch.no_grad():
        proto, wsum = weighted_pool_op(x, assignment, weight, 3)
    grad = torch.randn_like(proto)
    torch.library.opcheck(weighted_pool_backward_op,
                          (grad, x.detach(), assignment, None if weight is None else weight.detach(), proto, wsum,
                           with_weight))


def test_weight_sums_carry_no_gradient():
    x = make_points(1, 8, 4, torch.float32, seed=5).requires_grad_()
    weight = torch.rand(1, 8).requires_grad_()
    proto, wsum = weighted_pool_op(x, torch.zeros(1, 8, dtype=torch.int32), weight, 2)
    assert proto.requires_grad and not wsum.requires_grad


def test_the_connectors_temporal_clustering_compiles_as_one_graph():
    """cluster_events (the connector's DPE: density, delta, centres, assignment, pooling over ragged videos)."""
    from dynfocus_infer.config import ConnectorConfig
    from dynfocus_infer.models.connector_parts import cluster_events, ragged_frames

    config = ConnectorConfig(vision_width=16, llm_width=32, qformer_width=16, patch_grid=4, pool_grid=2,
                             num_events=5)
    pooled = torch.randn(19, 4, 16)
    layout = ragged_frames([12, 7], 19, config, torch.device("cpu"))
    eager = cluster_events(pooled, layout, config, K)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p: cluster_events(p, layout, config, K), fullgraph=True, backend="aot_eager")
    got = compiled(pooled)
    for name in ("prototypes", "centres", "valid"):
        want = getattr(eager, name)
        torch.testing.assert_close(getattr(got, name), want, msg=name)


def test_compiled_dpc_knn_is_one_graph_with_the_eager_values_and_gradients():
    x = make_points(2, 37, 24, torch.float32, seed=6)
    lens = ragged_lengths(2, 37, seed=6, minimum=8)

    def loss(points):
        result = K.dpc_knn(points, 6, 4, weight="rho_delta", valid_len=lens, check=False)
        return result.prototypes.square().sum(), result.assignment

    eager_x = x.clone().requires_grad_()
    eager_loss, eager_assignment = loss(eager_x)
    eager_loss.backward()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")   # fullgraph: a graph break raises
    compiled_x = x.clone().requires_grad_()
    compiled_loss, compiled_assignment = compiled(compiled_x)
    compiled_loss.backward()
    assert torch.equal(compiled_assignment, eager_assignment)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
    assert eager_x.grad.abs().sum() > 0

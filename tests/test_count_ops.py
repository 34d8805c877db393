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


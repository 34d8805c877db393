"""The DPC-KNN kernels with the GPU's launch configuration (64-row tiles, 32/64-channel tiles, column splits sized for
132 SMs, 32-row pooling tiles), run by the interpreter under `gpu_tiles()`: the interpreter's own wide tiles cover
most sets in one tile and would hide tiling, remainder and split-merge bugs that only the GPU configuration shows.
Races, NaN handling of hardware max/min and register pressure still need a GPU (bench/gpu_session.sh)."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R
from dynfocus_kernels.common import gpu_tiles
from dynfocus_kernels.distance import column_splits, launch_config
from kernel_utils import DTYPE_TOL, make_points, poison_empty, ragged_lengths

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


def test_gpu_tiles_switch_the_launch_configuration():
    x = torch.zeros(2, 257, 100)
    wide = launch_config(257, 100, torch.bfloat16)
    with gpu_tiles():
        gpu = launch_config(257, 100, torch.bfloat16)
        splits, cols = column_splits(x, gpu)
        fp32 = launch_config(257, 100, torch.float32)
    assert (wide["BLOCK_M"], wide["BLOCK_C"]) == (256, 128)
    assert (gpu["BLOCK_M"], gpu["BLOCK_N"], gpu["BLOCK_C"], gpu["num_stages"]) == (64, 64, 64, 3)
    assert fp32["BLOCK_C"] == 32 and fp32["num_stages"] == 1
    assert gpu["UPCAST"], "the interpreter still needs fp32 dot operands"
    assert (splits, cols) == (5, 64), "2 x 132 SMs over 2 sets x 5 row tiles: every column tile its own split"
    assert column_splits(x, launch_config(257, 100, torch.bfloat16)) == (1, 512)   # one split, 2 wide tiles


@pytest.mark.parametrize("N,C,L,k,dtype", [(257, 100, 25, 5, torch.bfloat16), (150, 1408, 25, 5, torch.float32),
                                           (130, 33, 70, 3, torch.float32), (65, 48, 16, 8, torch.float16)])
def test_dpc_knn_with_gpu_tiles_matches_reference(N, C, L, k, dtype):
    B = 2
    x = make_points(B, N, C, dtype, seed=N * 7 + C)
    lens = ragged_lengths(B, N, seed=N + L, minimum=L)
    with gpu_tiles():
        res = K.dpc_knn(x, L, k, weight="rho_delta", valid_len=lens)
    ref = R.dpc_knn(x, L, k, weight="rho_delta", valid_len=lens)
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.delta, ref.delta, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.centers, ref.centers)
    assert torch.equal(res.assignment, ref.assignment)
    tol = DTYPE_TOL[dtype]
    torch.testing.assert_close(res.prototypes, ref.prototypes, atol=tol, rtol=tol)


def test_pooling_backward_with_gpu_tiles_matches_reference():
    B, N, C, L = 2, 75, 90, 6
    x = make_points(B, N, C, torch.float32, seed=5).requires_grad_()
    weight = torch.rand(B, N, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assignment = torch.randint(0, L, (B, N), generator=torch.Generator().manual_seed(2))
    assignment[0, 60:] = -1
    with gpu_tiles():
        out = K.weighted_pool(x, assignment, weight, L)
        grads = torch.autograd.grad(out.square().sum(), (x, weight))
    ref = R.weighted_pool(x, assignment, weight, L)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, weight))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

"""weighted_pool forward/backward kernels against the reference, gradcheck in float64, and gradient flow."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R
from kernel_utils import DTYPE_TOL, make_points, poison_empty


def _assignment(B, N, L, seed, device, drop_tail=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, L, (B, N), generator=g)
    if drop_tail and N > 2:
        a[1 % B, N // 2:] = -1  # ragged: ignored points
    return a.to(device)


@pytest.mark.parametrize("N,C,L", [(1, 1, 1), (2, 33, 2), (7, 1408, 3), (63, 33, 25), (257, 1408, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_pool_forward_matches_reference(N, C, L, dtype, weighted, device, monkeypatch):
    poison_empty(monkeypatch)
    B = 2
    x = make_points(B, N, C, dtype, seed=N + C, device=device)
    a = _assignment(B, N, L, seed=N, device=device)
    w = torch.rand(B, N, device=device) + 0.1 if weighted else None
    got = K.weighted_pool(x, a, w, L)
    ref = R.weighted_pool(x, a, w, L)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=DTYPE_TOL[dtype], rtol=DTYPE_TOL[dtype])


def test_empty_cluster_gives_zero_prototype(device):
    x = make_points(1, 5, 8, torch.float32, seed=1, device=device)
    a = torch.tensor([[0, 0, 2, 2, -1]], device=device)
    got = K.weighted_pool(x, a, None, 4)
    assert torch.equal(got[0, 1], torch.zeros(8, device=device)) and torch.equal(got[0, 3], torch.zeros(8, device=device))
    torch.testing.assert_close(got[0, 0], x[0, :2].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_gradients_match_reference(dtype, device, monkeypatch):
    poison_empty(monkeypatch)
    B, N, C, L = 2, 37, 70, 5
    x = make_points(B, N, C, dtype, seed=4, device=device).requires_grad_()
    w = (torch.rand(B, N, device=device) + 0.1).requires_grad_()
    a = _assignment(B, N, L, seed=4, device=device)
    g = torch.randn(B, L, C, device=device).to(dtype)
    gx, gw = torch.autograd.grad(K.weighted_pool(x, a, w, L), (x, w), g)
    rx, rw = torch.autograd.grad(R.weighted_pool(x, a, w, L), (x, w), g)
    tol = DTYPE_TOL[dtype]
    torch.testing.assert_close(gx, rx, atol=tol, rtol=tol)
    torch.testing.assert_close(gw, rw, atol=10 * tol, rtol=10 * tol)
    pad = a < 0
    assert (gx[pad] == 0).all() and (gw[pad] == 0).all()


def test_pool_gradcheck_float64(device):
    B, N, C, L = 2, 9, 5, 3
    x = make_points(B, N, C, torch.float64, seed=2, device=device).requires_grad_()
    w = (torch.rand(B, N, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    a = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 1, -1, -1, 1, 0]], device=device).to(torch.int32)
    assert torch.autograd.gradcheck(lambda x, w: K.WeightedPoolFunction.apply(x, a, w, L), (x, w))
    assert torch.autograd.gradcheck(lambda x: K.WeightedPoolFunction.apply(x, a, None, L), (x,))


@pytest.mark.parametrize("weight", ["uniform", "rho_delta"])
def test_dpc_knn_prototypes_carry_gradient_to_x(weight, device):
    B, N, C, L = 2, 30, 48, 6
    x = make_points(B, N, C, torch.float32, seed=8, device=device).requires_grad_()
    g = torch.randn(B, L, C, device=device)
    (gx,) = torch.autograd.grad(K.dpc_knn(x, L, 4, weight=weight).prototypes, x, g)
    res = R.dpc_knn(x.detach(), L, 4, weight=weight)
    w = None if weight == "uniform" else torch.exp(res.rho * res.delta)
    (rx,) = torch.autograd.grad(R.weighted_pool(x, res.assignment, w, L), x, g)
    assert gx.abs().sum() > 0
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)

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
    # The composed reference agrees: only its pooling is differentiable (density and delta carry no gradient).
    ref = R.dpc_knn(x, L, 4, weight=weight)
    assert not ref.rho.requires_grad and not ref.delta.requires_grad and ref.prototypes.requires_grad
    (composed,) = torch.autograd.grad(ref.prototypes, x, g)
    torch.testing.assert_close(composed, rx, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_output_edited_in_place_leaves_backward_intact(weight_grad, device):
    B, N, C, L = 2, 12, 20, 3
    x = make_points(B, N, C, torch.float32, seed=9, device=device).requires_grad_()
    w = (torch.rand(B, N, device=device) + 0.5).requires_grad_(weight_grad)
    a = _assignment(B, N, L, seed=9, device=device)
    g = torch.randn(B, L, C, device=device)
    inputs = [x, w] if weight_grad else [x]
    want = torch.autograd.grad(R.weighted_pool(x, a, w, L), inputs, g)
    out = K.weighted_pool(x, a, w, L)
    loss = (out * g).sum()
    with torch.no_grad():
        out.add_(1e6)  # a caller reusing the output buffer before the backward pass
    got = torch.autograd.grad(loss, inputs)
    for a_grad, r_grad in zip(got, want):
        torch.testing.assert_close(a_grad, r_grad, atol=1e-5, rtol=1e-5)


def test_backward_is_once_differentiable(device):
    x = make_points(1, 6, 8, torch.float32, seed=10, device=device).requires_grad_()
    a = torch.tensor([[0, 1, 0, 1, 0, -1]], device=device)
    (gx,) = torch.autograd.grad(K.weighted_pool(x, a, None, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|trying to differentiate twice|no autograd formula"):
        gx.sum().backward()


def test_unchecked_ids_past_num_clusters_are_ignored(device):
    x = make_points(1, 6, 16, torch.float32, seed=11, device=device).requires_grad_()
    a = torch.tensor([[0, 1, 5, 1, 0, 9]], device=device)  # 5 and 9 >= L = 2: only possible with check=False
    out = K.weighted_pool(x, a, None, 2, check=False)
    torch.testing.assert_close(out, R.weighted_pool(x, torch.where(a < 2, a, -1), None, 2))
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(gx[0, [2, 5]], torch.zeros(2, 16, device=device)) and (gx[0, [0, 1, 3, 4]] != 0).all()

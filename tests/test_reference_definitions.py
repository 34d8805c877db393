"""The reference itself against the definitions of DESIGN section 4, written element by element with
torch.cdist on small sets: guards the oracle that every kernel test trusts."""
import math

import torch

from dynfocus_kernels import reference as R


def _naive(x, L, k):
    n, C = x.shape
    d = torch.cdist(x.double(), x.double()) / math.sqrt(C)
    rho = [math.exp(-sum(v * v for v in sorted(d[i].tolist())[:k]) / min(k, n)) for i in range(n)]
    delta = []
    for i in range(n):
        higher = [d[i, j].item() for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(higher) if higher else d.max().item())  # densest: the set's largest distance
    score = [r * s for r, s in zip(rho, delta)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:L]
    assign = [min(range(L), key=lambda r: (d[i, centers[r]].item(), r)) for i in range(n)]
    for r, c in enumerate(centers):
        assign[c] = r
    w = [math.exp(r * s) for r, s in zip(rho, delta)]
    protos = torch.stack([sum(w[i] * x[i].double() for i in range(n) if assign[i] == r) /
                          sum(w[i] for i in range(n) if assign[i] == r) for r in range(L)])
    return torch.tensor(rho, dtype=torch.float64), torch.tensor(delta, dtype=torch.float64), centers, assign, protos


def test_reference_follows_the_definitions():
    for seed, (n, C, L, k) in enumerate([(9, 3, 3, 2), (17, 5, 4, 5), (6, 1, 2, 3)]):
        x = torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * 2
        rho, delta, centers, assign, protos = _naive(x, L, k)
        res = R.dpc_knn(x[None], L, k, weight="rho_delta")
        torch.testing.assert_close(res.rho[0].double(), rho, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.delta[0].double(), delta, atol=1e-5, rtol=1e-5)
        assert res.centers[0].tolist() == centers
        assert res.assignment[0].tolist() == assign
        torch.testing.assert_close(res.prototypes[0].double(), protos, atol=1e-5, rtol=1e-5)

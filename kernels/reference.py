"""Plain-PyTorch DPC-KNN: the oracle for every kernel test (DESIGN.md section 4).

Obviously correct and slow: it builds the full N x N distance matrix of every set. Every function has the same
name, arguments and result as its fused twin in `dynfocus_kernels`, so callers can swap the modules; `prepared`
(the fused ops' shared centred points) is accepted and ignored: each reference op centres the points itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import TIE_EPS, DPCResult, centre_points, check_points, lengths_of, pool_weights, valid_mask


def pairwise_sq_dist(x: torch.Tensor, valid_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(i, j)^2 = (||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j>) / C in fp32 between the set-centred points, clamped at 0,
    [B, N, N]. Squares below TIE_EPS * (||x_i||^2 + ||x_j||^2) are the expansion's cancellation noise and read as 0,
    so identical points are exactly at distance 0 (ties then follow the index rule); d(i, i) is 0.
    """
    return _sq_dist_and_norms(x, valid_len)[0]


def _sq_dist_and_norms(x: torch.Tensor, valid_len: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairwise_sq_dist, the squared norms ||x_i||^2 [B, N] of the centred points it was computed from)."""
    x = centre_points(x, valid_len).float()
    C = x.shape[-1]
    sq = (x * x).sum(-1)
    norms = sq[:, :, None] + sq[:, None, :]
    d2 = (norms - 2.0 * x @ x.transpose(1, 2)).clamp_min(0.0)
    d2 = torch.where(d2 <= TIE_EPS * norms, torch.zeros_like(d2), d2)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0) / C, sq


def knn_density(x: torch.Tensor, k: int, *, valid_len: Optional[torch.Tensor] = None,
                check: bool = True, prepared=None) -> torch.Tensor:
    """rho_i = exp(-mean of d(i, j)^2 over the k nearest valid j, i itself included). [B, N] fp32, 0 past valid_len."""
    if check:
        check_points(x, valid_len, k=k)
    valid = valid_mask(x, valid_len)
    d2 = pairwise_sq_dist(x, valid_len).masked_fill(~valid[:, None, :], float("inf"))
    n = lengths_of(x, valid_len)
    k_eff = torch.clamp(n, max=k).to(torch.float32)
    nearest = torch.topk(d2, min(k, x.shape[1]), dim=-1, largest=False).values
    nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
    rho = torch.exp(-nearest.sum(-1) / k_eff[:, None])
    return torch.where(valid, rho, torch.zeros_like(rho))


def density_delta(x: torch.Tensor, rho: torch.Tensor, *, valid_len: Optional[torch.Tensor] = None,
                  check: bool = True, prepared=None) -> torch.Tensor:
    """delta_i = min d(i, j) over j of higher density (rho_j > rho_i, or equal and j < i); for the densest point,
    the largest distance in the set (as the official DPC-KNN). [B, N] fp32, 0 past valid_len."""
    if check:
        check_points(x, valid_len)
    B, N, _ = x.shape
    valid = valid_mask(x, valid_len)
    d = pairwise_sq_dist(x, valid_len).sqrt()
    idx = torch.arange(N, device=x.device)
    r_i, r_j = rho[:, :, None], rho[:, None, :]
    higher = (r_j > r_i) | ((r_j == r_i) & (idx[None, None, :] < idx[None, :, None]))
    higher &= valid[:, None, :]
    inf = torch.full_like(d, float("inf"))
    nearest_higher = torch.where(higher, d, inf).min(-1).values
    pair_valid = valid[:, :, None] & valid[:, None, :]
    set_farthest = torch.where(pair_valid, d, torch.zeros_like(d)).flatten(1).max(-1).values
    delta = torch.where(torch.isinf(nearest_higher), set_farthest[:, None].expand(B, N), nearest_higher)
    return torch.where(valid, delta, torch.zeros_like(delta))


def select_centers(score: torch.Tensor, num_clusters: int, *, valid_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The num_clusters valid points of largest score, in descending score order, ties by lower index. [B, L] int64."""
    valid = valid_mask(score, valid_len)
    masked = torch.where(valid, score, torch.full_like(score, -float("inf")))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return order[:, :num_clusters]


def assign_to_centers(x: torch.Tensor, centers: torch.Tensor, *, valid_len: Optional[torch.Tensor] = None,
                      check: bool = True, prepared=None) -> torch.Tensor:
    """Index (rank in `centers`) of each point's nearest centre, lowest rank on ties; each centre maps to itself.
    [B, N] int64, -1 past valid_len. A tie: a squared distance within TIE_EPS * (||x_i||^2 + ||c||^2) / C of the
    smallest (the expansion's rounding must not decide between equidistant centres)."""
    if check:
        check_points(x, valid_len, num_clusters=centers.shape[1])
    B, N, C = x.shape
    L = centers.shape[1]
    d2, sq = _sq_dist_and_norms(x, valid_len)
    to_centers = torch.gather(d2, 2, centers[:, None, :].expand(B, N, L))
    slack = (sq[:, :, None] + torch.gather(sq, 1, centers)[:, None, :]) * (TIE_EPS / C)
    tied = to_centers <= to_centers.min(-1, keepdim=True).values + slack
    assignment = tied.to(torch.int8).argmax(-1)  # the first tied centre: the lowest rank
    ranks = torch.arange(L, device=x.device).expand(B, L)
    assignment = assignment.scatter(1, centers, ranks)
    valid = valid_mask(x, valid_len)
    return torch.where(valid, assignment, torch.full_like(assignment, -1))


def weighted_pool(x: torch.Tensor, assignment: torch.Tensor, weight: Optional[torch.Tensor],
                  num_clusters: int, *, check: bool = True) -> torch.Tensor:
    """prototype_l = sum_i w_i x_i / sum_i w_i over points assigned to l (paper Eq. 3); w = 1 when weight is None.
    Points with assignment -1 are ignored; an empty cluster (or zero total weight) gives a zero prototype.
    [B, L, C] in x.dtype, fp32 math, differentiable in x and weight."""
    if check and bool((assignment >= num_clusters).any()):
        raise ValueError(f"assignment holds cluster ids >= num_clusters = {num_clusters}")
    B, N, C = x.shape
    w = torch.ones(B, N, dtype=torch.float32, device=x.device) if weight is None else weight.float()
    keep = assignment >= 0
    w = torch.where(keep, w, torch.zeros_like(w))
    onehot = torch.nn.functional.one_hot(assignment.clamp_min(0), num_clusters).to(torch.float32)
    onehot = onehot * w[:, :, None]                                   # [B, N, L]
    points = torch.where(keep[:, :, None], x.float(), torch.zeros((), device=x.device))  # no 0 * inf = NaN
    sums = onehot.transpose(1, 2) @ points                            # [B, L, C]
    total = onehot.sum(1)                                            # [B, L]
    safe = torch.where(total > 0, total, torch.ones_like(total))
    protos = torch.where(total[:, :, None] > 0, sums / safe[:, :, None], torch.zeros_like(sums))
    return protos.to(x.dtype)


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int, *, weight: str = "uniform",
            valid_len: Optional[torch.Tensor] = None, check: bool = True) -> DPCResult:
    """The composed DPC-KNN clustering of DESIGN section 4 -> (centers, assignment, prototypes, rho, delta).
    Only the pooling is differentiable (in x): density, delta, centres, assignment and the weights carry no
    gradient, as in the fused dpc_knn."""
    if check:
        check_points(x, valid_len, k=k, num_clusters=num_clusters)
    with torch.no_grad():
        rho = knn_density(x, k, valid_len=valid_len, check=False)
        delta = density_delta(x, rho, valid_len=valid_len, check=False)
        centers = select_centers(rho * delta, num_clusters, valid_len=valid_len)
        assignment = assign_to_centers(x, centers, valid_len=valid_len, check=False)
        w = pool_weights(weight, rho, delta, assignment, num_clusters)
    prototypes = weighted_pool(x, assignment, w, num_clusters)
    return DPCResult(centers, assignment, prototypes, rho, delta)

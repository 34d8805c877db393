"""The composed DPC-KNN clustering (DESIGN section 4): density, delta, centres, assignment, pooling."""
from __future__ import annotations

from typing import Optional

import torch

from .assign import assign_to_centers
from .centers import select_centers
from .common import DPCResult, check_points, pool_weights
from .density_delta import density_delta
from .distance import prepare_points, require_kernel_device
from .knn_density import knn_density
from .weighted_pool import weighted_pool


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int, *, weight: str = "uniform",
            valid_len: Optional[torch.Tensor] = None, check: bool = True) -> DPCResult:
    """Cluster every set of x [B, N, C] into num_clusters groups.

    weight="uniform" pools with w = 1 (official spatial merge); "rho_delta" with w = exp(rho * delta) (paper Eq. 3).
    `prototypes` is differentiable in x (and in the weights); the rest carries no gradient. check=False skips the
    input validation (and its host syncs) for callers that already validated their inputs; what follows is custom
    ops (kernels/library.py) and tensor ops, with no host sync, which torch.compile traces whole.
    """
    if check:
        check_points(x, valid_len, k=k, num_clusters=num_clusters)
    if weight not in ("uniform", "rho_delta"):  # reject an unknown weight name before any launch
        raise ValueError(f"weight must be 'uniform' or 'rho_delta', got {weight!r}")
    require_kernel_device(x, valid_len)
    with torch.no_grad():
        prepared = prepare_points(x, valid_len)
        rho = knn_density(x, k, valid_len=valid_len, check=False, prepared=prepared)
        delta = density_delta(x, rho, valid_len=valid_len, check=False, prepared=prepared)
        centers = select_centers(rho * delta, num_clusters, valid_len=valid_len)
        assignment = assign_to_centers(x, centers, valid_len=valid_len, check=False, prepared=prepared)
        del prepared
        weights = pool_weights(weight, rho, delta, assignment, num_clusters)
    prototypes = weighted_pool(x, assignment, weights, num_clusters, check=False)
    return DPCResult(centers, assignment, prototypes, rho, delta)

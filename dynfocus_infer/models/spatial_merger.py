"""Multi-grained spatial prototypes G_t (paper Sec. 3.3; official `Merger`, DESIGN.md section 5).

Per frame: DPC-KNN on the 256 patch tokens (16 centres, k = 8, uniform weights) -> Z1 [16, C]; DPC-KNN on Z1
(6 centres, k = 3) -> Z2 [6, C] and each Z1 token's second-layer cluster; modulation
a = softmax(Linear(6, 6)(mean over channels of Z2)). G_t lists, for each second-layer cluster v in centre order,
Z2[v] and then the Z1 tokens assigned to v in index order, all scaled by a[v]: 22 tokens.

The official `group` builds G_t with two Python loops (frames x clusters); here the Triton backend does both
layers, the modulation and the grouping in one kernel for all frames (kernels/spatial.py), and the composed path
(reference backend, training gradients) orders all frames at once with one stable argsort over a (cluster,
position) key. Parameter layout: the official `merge.*` with the prefix
stripped: `score` (the Linear(6, 6) used here) and `proj_k`, `proj_q` (Linear(C, 512)), `norm` (LayerNorm(C)),
which the official forward never calls. They stay registered, unused, so official state dicts load strictly
and round-trip.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

import dynfocus_kernels
from dynfocus_kernels.spatial import MAX_FIRST_CENTRES

from ..config import ConnectorConfig
from .connector_parts import cluster_ops

OFFICIAL_LATENT_WIDTH = 512  # width of the unused proj_k / proj_q in the official Merger


class SpatialPrototypes(NamedTuple):
    grouped: torch.Tensor      # G_t [T, c1 + c2, C]
    modulation: torch.Tensor   # a [T, c2]


def group_prototypes(first: torch.Tensor, second: torch.Tensor, second_of_first: torch.Tensor,
                     modulation: torch.Tensor) -> torch.Tensor:
    """G [T, c2 + c1, C] from Z1 [T, c1, C], Z2 [T, c2, C], the cluster of each Z1 token [T, c1] and a [T, c2]."""
    T, c1, C = first.shape
    c2 = second.shape[1]
    own_cluster = torch.arange(c2, device=first.device).expand(T, c2)
    cluster = torch.cat([own_cluster, second_of_first], dim=1)                          # [T, c2 + c1]
    # Within a cluster, Z2[v] (position 0) comes first, then Z1 tokens by index (positions 1..c1).
    position = torch.cat([torch.zeros_like(own_cluster),
                          torch.arange(1, c1 + 1, device=first.device).expand(T, c1)], dim=1)
    order = torch.argsort(cluster * (c1 + 1) + position, dim=1, stable=True)
    tokens = torch.cat([second, first], dim=1).gather(1, order[..., None].expand(T, c2 + c1, C))
    scale = modulation.gather(1, cluster.gather(1, order))
    return tokens * scale[..., None].to(tokens.dtype)


class SpatialMerger(nn.Module):
    """patch tokens [T, N, C] -> G [T, c1 + c2, C] (22 tokens at the default sizes)."""

    def __init__(self, config: ConnectorConfig, *, cluster_backend: str = "auto"):
        super().__init__()
        width = config.vision_width
        self.num_centers = config.spatial_centers
        self.num_neighbours = config.spatial_k
        self.cluster_backend = cluster_backend
        self.proj_k = nn.Linear(width, OFFICIAL_LATENT_WIDTH)
        self.proj_q = nn.Linear(width, OFFICIAL_LATENT_WIDTH)
        self.score = nn.Linear(self.num_centers[1], self.num_centers[1])
        self.norm = nn.LayerNorm(width)
        cluster_ops(cluster_backend, torch.device("cpu"))  # reject an unknown backend name now

    def prototypes(self, patch_tokens: torch.Tensor) -> SpatialPrototypes:
        """G_t and the modulation a of every frame of patch_tokens [T, N, C].

        Triton backend: one launch for all frames (dynfocus_kernels.spatial_merge). When a gradient is wanted
        (training), the kernel's two assignments are pooled again by the differentiable weighted_pool and the
        modulation and grouping run as tensor ops, so gradients reach the patch tokens and merge.score. The reference
        backend composes two dpc_knn calls (the same result: tests/test_spatial_merge.py)."""
        ops = cluster_ops(self.cluster_backend, patch_tokens.device)
        (c1, c2), (k1, k2) = self.num_centers, self.num_neighbours
        wants_grad = torch.is_grad_enabled() and (patch_tokens.requires_grad or self.score.weight.requires_grad)
        if ops is dynfocus_kernels and c1 <= MAX_FIRST_CENTRES:
            fused = ops.spatial_merge(patch_tokens.detach(), self.score.weight.detach(), self.score.bias.detach(),
                                      (c1, c2), (k1, k2), check=False)
            if not wants_grad:
                return SpatialPrototypes(fused.grouped, fused.modulation)
            first = ops.weighted_pool(patch_tokens, fused.first_assignment, None, c1, check=False)
            second = ops.weighted_pool(first, fused.second_assignment, None, c2, check=False)
            second_of_first = fused.second_assignment
        else:
            first = ops.dpc_knn(patch_tokens, c1, k1, weight="uniform", check=False).prototypes
            clustered = ops.dpc_knn(first, c2, k2, weight="uniform", check=False)
            second, second_of_first = clustered.prototypes, clustered.assignment
        channel_mean = second.mean(dim=-1).to(self.score.weight.dtype)
        modulation = torch.softmax(self.score(channel_mean), dim=-1)
        grouped = group_prototypes(first, second, second_of_first, modulation)
        return SpatialPrototypes(grouped, modulation)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        if patch_tokens.dim() != 3 or patch_tokens.shape[1] < self.num_centers[0]:
            raise ValueError(f"patch_tokens must be [T, N >= {self.num_centers[0]}, C], "
                             f"got {tuple(patch_tokens.shape)}")
        return self.prototypes(patch_tokens).grouped

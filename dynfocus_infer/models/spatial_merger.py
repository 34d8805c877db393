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
import torch.nn.functional as F

import dynfocus_kernels
from dynfocus_kernels.spatial import MAX_FIRST_CENTRES

from ..config import ConnectorConfig
from .connector_parts import cluster_ops

OFFICIAL_LATENT_WIDTH = 512  # width of the unused proj_k / proj_q in the official Merger


class SpatialPrototypes(NamedTuple):
    grouped: torch.Tensor            # G_t [T, c1 + c2, C]
    modulation: torch.Tensor         # a [T, c2]
    first_assignment: torch.Tensor   # int64 [T, N]: each patch's layer-1 cluster (Z1 index)
    second_of_first: torch.Tensor    # int64 [T, c1]: each Z1 token's layer-2 cluster (Z2 index)


def group_order(second_of_first: torch.Tensor, c2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where G's rows come from: (order, cluster) [T, c2 + c1], G row i = cat([Z2, Z1])[order[i]], which belongs
    to layer-2 cluster cluster[i]. Within a cluster, Z2[v] comes first, then its Z1 tokens by index."""
    T, c1 = second_of_first.shape
    device = second_of_first.device
    own_cluster = torch.arange(c2, device=device).expand(T, c2)
    cluster = torch.cat([own_cluster, second_of_first], dim=1)                          # [T, c2 + c1]
    position = torch.cat([torch.zeros_like(own_cluster), torch.arange(1, c1 + 1, device=device).expand(T, c1)], dim=1)
    order = torch.argsort(cluster * (c1 + 1) + position, dim=1, stable=True)
    return order, cluster.gather(1, order)


def group_prototypes(first: torch.Tensor, second: torch.Tensor, second_of_first: torch.Tensor,
                     modulation: torch.Tensor) -> torch.Tensor:
    """G [T, c2 + c1, C] from Z1 [T, c1, C], Z2 [T, c2, C], the cluster of each Z1 token [T, c1] and a [T, c2]."""
    T, c1, C = first.shape
    c2 = second.shape[1]
    order, cluster = group_order(second_of_first, c2)
    tokens = torch.cat([second, first], dim=1).gather(1, order[..., None].expand(T, c2 + c1, C))
    return tokens * modulation.gather(1, cluster)[..., None].to(tokens.dtype)


def grouped_patch_labels(labels: torch.Tensor, first_assignment: torch.Tensor, second_of_first: torch.Tensor,
                         c2: int, num_labels: int, *, min_share: float = 0.5, ignore: int = -100) -> torch.Tensor:
    """The label of each row of G [T, c2 + c1] from per-patch labels [T, N] in [0, num_labels): the label most of
    the row's patches carry (a Z1 token's: its cluster's patches; a Z2 token's: those of its Z1 tokens; c2 Z2
    tokens), or `ignore` unless more than `min_share` of them carry it (at 0.5 or above the label is unique)."""
    T, c1 = second_of_first.shape
    one_hot = F.one_hot(labels.to(first_assignment.device), num_labels).float()          # [T, N, labels]
    first_counts = one_hot.new_zeros(T, c1, num_labels).scatter_add_(
        1, first_assignment[..., None].expand(-1, -1, num_labels), one_hot)
    second_counts = first_counts.new_zeros(T, c2, num_labels).scatter_add_(
        1, second_of_first[..., None].expand(-1, -1, num_labels), first_counts)
    order, _ = group_order(second_of_first, c2)
    counts = torch.cat([second_counts, first_counts], dim=1).gather(1, order[..., None].expand(-1, -1, num_labels))
    share, label = (counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)).max(dim=-1)
    return torch.where(share > min_share, label, torch.full_like(label, ignore))


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
                return SpatialPrototypes(fused.grouped, fused.modulation, fused.first_assignment,
                                         fused.second_assignment)
            first = ops.weighted_pool(patch_tokens, fused.first_assignment, None, c1, check=False)
            second = ops.weighted_pool(first, fused.second_assignment, None, c2, check=False)
            first_assignment, second_of_first = fused.first_assignment, fused.second_assignment
        else:
            patches = ops.dpc_knn(patch_tokens, c1, k1, weight="uniform", check=False)
            first, first_assignment = patches.prototypes, patches.assignment
            clustered = ops.dpc_knn(first, c2, k2, weight="uniform", check=False)
            second, second_of_first = clustered.prototypes, clustered.assignment
        channel_mean = second.mean(dim=-1).to(self.score.weight.dtype)
        modulation = torch.softmax(self.score(channel_mean), dim=-1)
        grouped = group_prototypes(first, second, second_of_first, modulation)
        return SpatialPrototypes(grouped, modulation, first_assignment, second_of_first)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        if patch_tokens.dim() != 3 or patch_tokens.shape[1] < self.num_centers[0]:
            raise ValueError(f"patch_tokens must be [T, N >= {self.num_centers[0]}, C], "
                             f"got {tuple(patch_tokens.shape)}")
        return self.prototypes(patch_tokens).grouped

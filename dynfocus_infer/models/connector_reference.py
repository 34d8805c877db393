"""The DynFocus connector written the obvious way: one video at a time, one frame at a time (slow, for tests and
the benchmark's baseline). It shares the parameter modules of a DynFocusConnector and follows the equations
directly (DESIGN.md section 5, paper Eqs. 1-3 and 8-11) with `dynfocus_kernels.reference` for DPC-KNN; nothing
here reuses the fused path's index arithmetic, token budget table or mask builder.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

import dynfocus_kernels.reference as dpc

from .connector import DynFocusConnector


class ReferenceVideo(NamedTuple):
    tokens: torch.Tensor      # [num tokens, llm_width]
    keyframes: list[int]      # frame ids in time order
    scores: torch.Tensor      # [L] min-max normalised scores, prototype order
    centres: list[int]        # [L] centre frame of each prototype


def spatial_prototypes(connector: DynFocusConnector, frame: torch.Tensor) -> torch.Tensor:
    """G_t [c2 + c1, C] of one frame [N, C] (official `Merger.forward` + `group`)."""
    (c1, c2), (k1, k2) = connector.config.spatial_centers, connector.config.spatial_k
    first = dpc.dpc_knn(frame[None], c1, k1, weight="uniform")
    second = dpc.dpc_knn(first.prototypes, c2, k2, weight="uniform")
    z1, z2, owner = first.prototypes[0], second.prototypes[0], second.assignment[0].tolist()
    modulation = torch.softmax(connector.merge.score(z2.mean(dim=-1)), dim=-1)
    grouped = []
    for v in range(c2):
        members = [z2[v]] + [z1[i] for i in range(c1) if owner[i] == v]
        grouped += [token * modulation[v] for token in members]
    return torch.stack(grouped)


def frame_rods(connector: DynFocusConnector, grouped: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[global token, text-guided token] [2, llm] of one frame (paper Eqs. 9-10)."""
    key = connector.vlm_att_key_projector(grouped)
    attention = torch.softmax(queries @ key.T / grouped.shape[-1] ** 0.5, dim=-1)
    context = (attention @ grouped).mean(dim=0)
    return torch.stack([connector.mm_projector(grouped.mean(dim=0)), connector.vlm_att_val_projector(context)])


def pooled_frame(frame: torch.Tensor, patch_grid: int, pool_grid: int) -> torch.Tensor:
    """f_t [P, C]: avg_pool2d of the patch grid of one frame [g*g, C]."""
    grid = frame.T.reshape(1, -1, patch_grid, patch_grid)
    step = patch_grid // pool_grid
    return F.avg_pool2d(grid, step)[0].flatten(1).T


def reference_video(connector: DynFocusConnector, patches: torch.Tensor, queries: torch.Tensor) -> ReferenceVideo:
    """Connector tokens of one video: patches [T, N, C], queries [T, Q, C]."""
    config = connector.config
    T, C = patches.shape[0], config.vision_width
    grouped = [spatial_prototypes(connector, patches[t]) for t in range(T)]
    points = torch.stack([pooled_frame(patches[t], config.patch_grid, config.pool_grid).flatten()
                          for t in range(T)])
    L = min(config.num_events, T)
    events = dpc.dpc_knn(points[None], L, config.temporal_k, weight="rho_delta")
    prototypes = events.prototypes[0].view(L, config.num_pooled, C)
    summaries = torch.stack([torch.cat([m.mean(dim=0), m.max(dim=0).values]) for m in prototypes])
    raw = connector.event_scorer(summaries[None])[0]
    scores = (raw - raw.min()) / (raw.max() - raw.min() + 1e-5)
    K = max(1, round(config.keep_ratio * L))
    kept = sorted(range(L), key=lambda l: (-float(scores[l]), l))[:K]
    centres = events.centers[0].tolist()
    event_of_keyframe = {centres[l]: l for l in kept}
    tokens = []
    for t in range(T):
        rods = frame_rods(connector, grouped[t], queries[t])
        if t not in event_of_keyframe:
            if config.rods:
                tokens.append(rods)
            continue
        if config.cone_mode == "compressed":
            focal = prototypes[event_of_keyframe[t]]
            tokens += [connector.mm_projector(torch.cat([focal, grouped[t]])), rods]
        elif config.cone_mode == "uncompressed":
            tokens.append(connector.mm_projector(patches[t]))
        elif config.cone_mode == "coarse":
            tokens.append(rods)
    empty = patches.new_zeros(0, config.llm_width)
    return ReferenceVideo(torch.cat(tokens) if tokens else empty, sorted(event_of_keyframe), scores, centres)


@torch.no_grad()
def reference_connector(connector: DynFocusConnector, patch_tokens: torch.Tensor, q_emb: torch.Tensor,
                        frames_per_video: Sequence[int]) -> list[ReferenceVideo]:
    """Per-video results for a packed ragged batch, one video after another."""
    results, start = [], 0
    for num_frames in frames_per_video:
        results.append(reference_video(connector, patch_tokens[start:start + num_frames],
                                       q_emb[start:start + num_frames]))
        start += num_frames
    return results

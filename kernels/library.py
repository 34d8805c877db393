"""Every Triton launch of the DPC-KNN family as a PyTorch custom op (`torch.library`), so `torch.compile` sees each
as one node with known output shapes (a fake implementation) instead of breaking its graph at the launch, and the
pooling's backward is registered with its op (AOT autograd traces through it). The tensor glue around the launches
(centring, merging column splits, pooling weights) stays plain torch in the entry points, which compile traces.

- `dynfocus::sq_norms(points)` -> ||p_i||^2 [B, N] fp32
- `dynfocus::knn_best(points, sq, lengths, k, splits, cols_per_split, distances)` -> k smallest distances per split
- `dynfocus::delta_near_far(points, sq, rho, lengths, splits, cols_per_split, distances)` -> (nearest denser,
  farthest); both read `distances` (v2's D [B, N, N]) instead of recomputing when it is not None
- `dynfocus::sq_dist_rows(points, sq, lengths, row0, rows)` -> D's rows row0 .. row0 + rows [B, rows, N] (v2)
- `dynfocus::select_centers(score, lengths, num_clusters)` -> centre ids [B, L]
- `dynfocus::assign(points, sq, lengths, centers)` -> cluster ranks [B, N]
- `dynfocus::spatial_merge(x, weight, bias, c1, c2, k1, k2)` -> the spatial merger's two layers, modulation and G
  (kernels/spatial.py's SpatialMergeResult fields, in order), one launch
- `dynfocus::knn_lists` -> knn_best's distances with their columns and each row's farthest distance per split;
  `dynfocus::delta_near(..., nbr_d, nbr_id)` -> delta_near_far's nearest denser, from the k nearest where a denser
  point is among them (a block of rows that all found one skips the pass)
- `dynfocus::pool_centre`, `event_rho`, `event_centres`, `event_pool`: the connector's temporal clustering
  (kernels/temporal.py), between knn_lists, delta_near and assign
- `dynfocus::projector_inputs`, `scatter_tokens`: the connector's token gather and scatter around mm_projector
  (kernels/tokens.py)
- `dynfocus::weighted_pool(x, assignment, weight, num_clusters)` -> (prototypes [B, L, C] in the accumulation
  dtype, weight sums [B, L]), differentiable in x and weight; `dynfocus::weighted_pool_backward` its backward.

The ops take validated inputs (the entry points check them first, with `check=True`) and never read the device: a
compiled or graph-captured caller gets no host sync from them. On CPU tensors they run under the interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .assign import launch_assign
from .centers import launch_select_centers
from .density_delta import launch_delta_near_far
from .distance import launch_sq_norms
from .gram import launch_sq_dist_matrix
from .knn_density import launch_knn_best, launch_knn_lists
from .spatial import launch_spatial_merge
from .temporal import launch_event_centres, launch_event_pool, launch_pool_centre, launch_rho
from .tokens import launch_projector_inputs, launch_scatter_tokens
from .weighted_pool import _acc_dtype, weighted_pool_backward, weighted_pool_forward


@torch.library.custom_op("dynfocus::sq_norms", mutates_args=())
def sq_norms_op(points: Tensor) -> Tensor:
    return launch_sq_norms(points)


@sq_norms_op.register_fake
def _(points):
    return points.new_empty(points.shape[:2], dtype=torch.float32)


@torch.library.custom_op("dynfocus::knn_best", mutates_args=())
def knn_best(points: Tensor, sq: Tensor, lengths: Tensor, k: int, splits: int, cols_per_split: int,
             distances: Optional[Tensor]) -> Tensor:
    return launch_knn_best(points, sq, lengths, k, splits, cols_per_split, distances)


@knn_best.register_fake
def _(points, sq, lengths, k, splits, cols_per_split, distances):
    B, N, _ = points.shape
    return points.new_empty((B, splits, N, k), dtype=torch.float32)


@torch.library.custom_op("dynfocus::delta_near_far", mutates_args=())
def delta_near_far(points: Tensor, sq: Tensor, rho: Tensor, lengths: Tensor, splits: int, cols_per_split: int,
                   distances: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return launch_delta_near_far(points, sq, rho, lengths, splits, cols_per_split, distances)


@delta_near_far.register_fake
def _(points, sq, rho, lengths, splits, cols_per_split, distances):
    B, N, _ = points.shape
    near = points.new_empty((B, splits, N), dtype=torch.float32)
    return near, torch.empty_like(near)


@torch.library.custom_op("dynfocus::knn_lists", mutates_args=())
def knn_lists(points: Tensor, sq: Tensor, lengths: Tensor, k: int, splits: int, cols_per_split: int,
              distances: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return launch_knn_lists(points, sq, lengths, k, splits, cols_per_split, distances)


@knn_lists.register_fake
def _(points, sq, lengths, k, splits, cols_per_split, distances):
    B, N, _ = points.shape
    best = points.new_empty((B, splits, N, k), dtype=torch.float32)
    return best, torch.empty_like(best, dtype=torch.int32), points.new_empty((B, splits, N), dtype=torch.float32)


@torch.library.custom_op("dynfocus::delta_near", mutates_args=())
def delta_near(points: Tensor, sq: Tensor, rho: Tensor, lengths: Tensor, splits: int, cols_per_split: int,
               distances: Optional[Tensor], nbr_d: Tensor, nbr_id: Tensor) -> Tensor:
    return launch_delta_near_far(points, sq, rho, lengths, splits, cols_per_split, distances, (nbr_d, nbr_id))[0]


@delta_near.register_fake
def _(points, sq, rho, lengths, splits, cols_per_split, distances, nbr_d, nbr_id):
    B, N, _ = points.shape
    return points.new_empty((B, splits, N), dtype=torch.float32)


@torch.library.custom_op("dynfocus::sq_dist_rows", mutates_args=())
def sq_dist_rows(points: Tensor, sq: Tensor, lengths: Tensor, row0: int, rows: int) -> Tensor:
    return launch_sq_dist_matrix(points, sq, lengths, row0, rows)


@sq_dist_rows.register_fake
def _(points, sq, lengths, row0, rows):
    B, N, _ = points.shape
    return points.new_empty((B, rows, N), dtype=torch.float32)


@torch.library.custom_op("dynfocus::select_centers", mutates_args=())
def select_centers_op(score: Tensor, lengths: Tensor, num_clusters: int) -> Tensor:
    return launch_select_centers(score, lengths, num_clusters)


@select_centers_op.register_fake
def _(score, lengths, num_clusters):
    return score.new_empty((score.shape[0], num_clusters), dtype=torch.int64)


@torch.library.custom_op("dynfocus::assign", mutates_args=())
def assign(points: Tensor, sq: Tensor, lengths: Tensor, centers: Tensor) -> Tensor:
    return launch_assign(points, sq, lengths, centers)


@assign.register_fake
def _(points, sq, lengths, centers):
    return points.new_empty(points.shape[:2], dtype=torch.int64)


@torch.library.custom_op("dynfocus::spatial_merge", mutates_args=())
def spatial_merge_op(x: Tensor, weight: Tensor, bias: Tensor, c1: int, c2: int, k1: int, k2: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(launch_spatial_merge(x, weight, bias, c1, c2, k1, k2))


@spatial_merge_op.register_fake
def _(x, weight, bias, c1, c2, k1, k2):
    T, N, C = x.shape
    ids = dict(dtype=torch.int64)
    return (x.new_empty((T, c1 + c2, C)), x.new_empty((T, c2), dtype=weight.dtype), x.new_empty((T, c1, C)),
            x.new_empty((T, c1), **ids), x.new_empty((T, N), **ids), x.new_empty((T, c2, C)),
            x.new_empty((T, c2), **ids), x.new_empty((T, c1), **ids), x.new_empty((T, N), dtype=torch.float32),
            x.new_empty((T, N), dtype=torch.float32), x.new_empty((T,), dtype=torch.int32))


@torch.library.custom_op("dynfocus::pool_centre", mutates_args=())
def pool_centre(patch_tokens: Tensor, frame_starts: Tensor, frames: Tensor, max_frames: int, patch_grid: int,
                pool_grid: int) -> tuple[Tensor, Tensor, Tensor]:
    return launch_pool_centre(patch_tokens, frame_starts, frames, max_frames, patch_grid, pool_grid)


@pool_centre.register_fake
def _(patch_tokens, frame_starts, frames, max_frames, patch_grid, pool_grid):
    from .common import centred_dtype
    from .temporal import feature_blocks

    B, F = frames.shape[0], pool_grid * pool_grid * patch_tokens.shape[-1]
    pooled = patch_tokens.new_empty((B, max_frames, F))
    return (pooled, pooled.new_empty((B, max_frames, F), dtype=centred_dtype(patch_tokens.dtype)),
            pooled.new_empty((B, max_frames, feature_blocks(F)), dtype=torch.float32))


@torch.library.custom_op("dynfocus::event_rho", mutates_args=())
def event_rho(best: Tensor, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return launch_rho(best, ids, lengths)


@event_rho.register_fake
def _(best, ids, lengths):
    B, _, N, k = best.shape
    return best.new_empty((B, N)), best.new_empty((B, N, k)), ids.new_empty((B, N, k))


@torch.library.custom_op("dynfocus::event_centres", mutates_args=())
def event_centres(rho: Tensor, near: Tensor, far: Tensor, lengths: Tensor, events: Tensor, max_events: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch_event_centres(rho, near, far, lengths, events, max_events)


@event_centres.register_fake
def _(rho, near, far, lengths, events, max_events):
    ids = rho.new_empty(rho.shape, dtype=torch.int64)
    return torch.empty_like(rho), rho.new_empty((rho.shape[0], max_events), dtype=torch.int64), ids, \
        torch.empty_like(lengths)


@torch.library.custom_op("dynfocus::event_pool", mutates_args=())
def event_pool(pooled: Tensor, assignment: Tensor, rho: Tensor, delta: Tensor, num_pooled: int, max_events: int
               ) -> tuple[Tensor, Tensor]:
    return launch_event_pool(pooled, assignment, rho, delta, num_pooled, max_events)


@event_pool.register_fake
def _(pooled, assignment, rho, delta, num_pooled, max_events):
    B, _, F = pooled.shape
    return pooled.new_empty((B, max_events, F)), pooled.new_empty((B, max_events, 2 * (F // num_pooled)))


@torch.library.custom_op("dynfocus::projector_inputs", mutates_args=())
def projector_inputs(prototypes: Tensor, grouped: Tensor, patch_tokens: Tensor, centres: Tensor, kept: Tensor,
                     key_video: Tensor, key_slot: Tensor, frame_starts: Tensor, frames: Tensor, keep: Tensor,
                     cone: int, cone_rows: int, num_pooled: int, rod_means: bool) -> tuple[Tensor, Tensor]:
    return launch_projector_inputs(prototypes, grouped, patch_tokens, centres, kept, key_video, key_slot,
                                   frame_starts, frames, keep, cone, cone_rows, num_pooled, rod_means)


@projector_inputs.register_fake
def _(prototypes, grouped, patch_tokens, centres, kept, key_video, key_slot, frame_starts, frames, keep, cone,
      cone_rows, num_pooled, rod_means):
    rows = key_video.shape[0] * cone_rows + (patch_tokens.shape[0] if rod_means else 0)
    return patch_tokens.new_empty((rows, patch_tokens.shape[-1])), kept.new_empty(kept.shape)


@torch.library.custom_op("dynfocus::scatter_tokens", mutates_args=())
def scatter_tokens(projected: Tensor, values: Tensor, token_starts: Tensor, token_offsets: Tensor, frame_mask: Tensor,
                   video_of_frame: Tensor, time_of_frame: Tensor, key_video: Tensor, key_slot: Tensor, kept: Tensor,
                   centres: Tensor, frame_starts: Tensor, frames: Tensor, keep: Tensor, total: int, cone_rows: int,
                   key_rods: bool, other_rods: bool) -> Tensor:
    return launch_scatter_tokens(projected, values, token_starts, token_offsets, frame_mask, video_of_frame,
                                 time_of_frame, key_video, key_slot, kept, centres, frame_starts, frames, keep, total,
                                 cone_rows, key_rods, other_rods)


@scatter_tokens.register_fake
def _(projected, values, token_starts, token_offsets, frame_mask, video_of_frame, time_of_frame, key_video, key_slot,
      kept, centres, frame_starts, frames, keep, total, cone_rows, key_rods, other_rods):
    return projected.new_empty((total, projected.shape[1]))


@torch.library.custom_op("dynfocus::weighted_pool", mutates_args=())
def weighted_pool_op(x: Tensor, assignment: Tensor, weight: Optional[Tensor], num_clusters: int
                     ) -> tuple[Tensor, Tensor]:
    return weighted_pool_forward(x, assignment, weight, num_clusters)


@weighted_pool_op.register_fake
def _(x, assignment, weight, num_clusters):
    B, _, C = x.shape
    acc = _acc_dtype(x)[1]
    return x.new_empty((B, num_clusters, C), dtype=acc), x.new_empty((B, num_clusters), dtype=acc)


@torch.library.custom_op("dynfocus::weighted_pool_backward", mutates_args=())
def weighted_pool_backward_op(grad: Tensor, x: Tensor, assignment: Tensor, weight: Optional[Tensor],
                              proto: Tensor, wsum: Tensor, need_grad_weight: bool) -> tuple[Tensor, Tensor]:
    grad_x, grad_w = weighted_pool_backward(grad, x, assignment, weight, proto if need_grad_weight else None, wsum,
                                            need_grad_weight)
    return grad_x, grad_w if grad_w is not None else wsum.new_empty((0,))


@weighted_pool_backward_op.register_fake
def _(grad, x, assignment, weight, proto, wsum, need_grad_weight):
    acc = _acc_dtype(x)[1]
    grad_w = x.new_empty(x.shape[:2], dtype=acc) if need_grad_weight else wsum.new_empty((0,))
    return x.new_empty(x.shape, dtype=acc), grad_w


def _pool_setup_context(ctx, inputs, output):
    x, assignment, weight, _ = inputs
    proto, wsum = output
    ctx.need_grad_weight = weight is not None and ctx.needs_input_grad[2]
    ctx.mark_non_differentiable(wsum)
    ctx.save_for_backward(x, assignment, weight, proto, wsum)


def _pool_backward(ctx, grad_proto, grad_wsum):
    x, assignment, weight, proto, wsum = ctx.saved_tensors
    grad_x, grad_w = weighted_pool_backward_op(grad_proto, x, assignment, weight, proto, wsum, ctx.need_grad_weight)
    grad_w = grad_w.to(weight.dtype) if ctx.need_grad_weight else None
    return grad_x.to(x.dtype), None, grad_w, None


weighted_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)

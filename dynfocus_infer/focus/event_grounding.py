"""Focus "dpe": the segment a question needs, from DynFocus's own signals (DESIGN.md section 13), and the dense
frames of that segment turned into keyframes.

Grounding, over the T sparse frames of one video:
1. events: the connector's temporal DPC-KNN (section 5: pooled frames, k = temporal_k, L = min(num_events, T)),
   each frame assigned to its nearest centre (ties: the lower centre rank), each event scored by the event scorer
   (PredictorLG, min-max normalised over the video);
2. question relevance r_t: the Q-Former queries of frame t (question-conditioned) attend over the frame's patches
   through the connector's own rod attention key (`vlm_att_key_projector`); r_t is the log-partition of that
   attention, logsumexp_j(q_i . k_j / sqrt(C)), averaged over the queries and min-max normalised over the frames
   (a frame whose patches answer some query strongly scores high);
3. frame score s_t = event score of t's event + question_weight * r_t; runs are maximal stretches of consecutive
   sparse frames in one event; a run scores the mean s_t of its frames;
4. the best `num_runs` runs, each widened by `padding` (a fraction of the video) on both sides, overlapping ones
   merged: the segments (normalised start / end).
Dense frames of the segments are added to the sparse ones (frame_sampling); in the answer, every dense frame that
the top-K did not already make a keyframe becomes one: its cones are mm_projector(cat(f_t, G_t)), f_t its 4x4
pooled frame (the prototype of a one-frame event, Eq. 3 with a single point), inserted before its rods.
"""
from __future__ import annotations

import torch

from ..models.connector_parts import cluster_events, cluster_ops, pool_frames, ragged_frames
from ..models.event_scorer import masked_min_max_normalise, prototype_summary
from ..models.token_budget import ROD_TOKENS


def _min_max(values: torch.Tensor) -> torch.Tensor:
    return masked_min_max_normalise(values[None])[0]


def frame_scores(connector, patch_tokens: torch.Tensor, q_emb: torch.Tensor, question_weight: float):
    """One video's sparse frames: patch_tokens [T, 256, C], q_emb [T, Q, C] -> (event of each frame [T] int64,
    s_t [T] fp32). Steps 1-3 of the module docstring."""
    config, device = connector.config, patch_tokens.device
    T = patch_tokens.shape[0]
    patch_tokens = patch_tokens.to(connector.mm_projector[0].weight.dtype)
    layout = ragged_frames([T], T, config, device)
    pooled = pool_frames(patch_tokens, config.patch_grid, config.pool_grid)
    events = cluster_events(pooled, layout, config, cluster_ops(connector.cluster_backend, device))
    num_events = layout.num_events[0]
    summaries = prototype_summary(events.prototypes.unflatten(-1, (config.num_pooled, config.vision_width)))
    scores = masked_min_max_normalise(connector.event_scorer(summaries, events.valid), events.valid)[0, :num_events]
    points = pooled.flatten(1).float()
    centres = events.centres[0, :num_events]
    event_of_frame = torch.cdist(points, points[centres]).argmin(dim=1)   # first minimum: the lower centre rank
    event_of_frame[centres] = torch.arange(num_events, device=device)
    key = connector.vlm_att_key_projector(patch_tokens)
    logits = q_emb.to(key.dtype) @ key.transpose(1, 2) / key.shape[-1] ** 0.5          # [T, Q, 256]
    relevance = _min_max(torch.logsumexp(logits.float(), dim=-1).mean(dim=1))
    return event_of_frame, scores[event_of_frame] + question_weight * relevance


def best_segments(event_of_frame: torch.Tensor, scores: torch.Tensor, sparse_indices: list, num_frames: int, *,
                  num_runs: int = 1, padding: float = 0.05) -> list[tuple[float, float]]:
    """Step 4: runs of equal events, mean score per run, the best num_runs padded and merged -> sorted
    (start, end) pairs in [0, 1]. sparse_indices: the stream index of each sparse frame (for the times)."""
    T = event_of_frame.shape[0]
    change = torch.ones(T, dtype=torch.int64, device=event_of_frame.device)
    change[1:] = (event_of_frame[1:] != event_of_frame[:-1]).to(torch.int64)
    run_of_frame = torch.cumsum(change, 0) - 1
    num_run = int(run_of_frame[-1]) + 1
    totals = torch.zeros(num_run, device=scores.device).index_add_(0, run_of_frame, scores.float())
    sizes = torch.zeros(num_run, device=scores.device).index_add_(0, run_of_frame, torch.ones_like(scores.float()))
    order = torch.sort(-(totals / sizes), stable=True).indices[:num_runs]
    last = torch.cumsum(sizes.to(torch.int64), 0) - 1                  # runs are consecutive frames
    first = last - sizes.to(torch.int64) + 1
    spans = sorted(zip(first[order].tolist(), last[order].tolist()))
    segments: list[list[float]] = []
    for a, b in spans:
        start = max(0.0, sparse_indices[a] / num_frames - padding)
        end = min(1.0, sparse_indices[b] / num_frames + padding)
        if segments and start <= segments[-1][1]:
            segments[-1][1] = max(segments[-1][1], end)
        else:
            segments.append([start, end])
    return [(start, end) for start, end in segments]


def check_keyframe_layout(connector) -> None:
    """Dense keyframes are inserted as cones before a frame's rods: the paper's default layout."""
    budget = connector.budget
    if not (connector.config.cone_mode == "compressed" and budget.keyframe_rods and budget.other_tokens == ROD_TOKENS):
        raise ValueError(f"focus='dpe' needs the connector's default layout (cone_mode 'compressed' with rods), "
                         f"not cone_mode {connector.config.cone_mode!r} / rods {connector.config.rods}: use "
                         f"focus='llm' or the default connector")


def add_keyframes(connector, tokens: torch.Tensor, frame_offsets: torch.Tensor, frame_mask: torch.Tensor,
                  patch_tokens: torch.Tensor, dense_positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One video's visual tokens with every dense frame a keyframe.

    tokens [N, W] in frame order with frame_offsets [T + 1] and frame_mask [T] (the connector's output for the
    video), patch_tokens [T, 256, C], dense_positions [D] (frame positions) -> (tokens [N + n * 38, W], n), n the
    dense frames that were not keyframes yet: their cones go in front of their rods, nothing else moves but down."""
    config, device = connector.config, tokens.device
    cone_tokens = connector.budget.cone_tokens
    T = frame_mask.shape[0]
    added = torch.zeros(T, dtype=torch.bool, device=device)
    added[dense_positions] = True
    added &= ~frame_mask
    new = added.nonzero().flatten()
    num_new = int(new.numel())
    if num_new == 0:
        return tokens, 0
    dtype = connector.mm_projector[0].weight.dtype
    frames = patch_tokens[new].to(dtype)
    focal = pool_frames(frames, config.patch_grid, config.pool_grid)
    cones = connector.mm_projector(torch.cat([focal, connector.merge.prototypes(frames).grouped], dim=1))
    shift = torch.cumsum(added.to(torch.int64), 0) * cone_tokens          # rows inserted up to and including t
    rows = torch.arange(tokens.shape[0], device=device)
    frame_of_row = torch.searchsorted(frame_offsets[1:].contiguous(), rows, right=True)
    out = tokens.new_empty(tokens.shape[0] + num_new * cone_tokens, tokens.shape[1])
    out[rows + shift[frame_of_row]] = tokens
    cone_start = frame_offsets[new] + shift[new] - cone_tokens
    cone_rows = cone_start[:, None] + torch.arange(cone_tokens, device=device)
    out[cone_rows.flatten()] = cones.flatten(0, 1).to(tokens.dtype)
    return out, num_new

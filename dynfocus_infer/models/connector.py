"""The DynFocus connector: DPE (event prototypes, scores, keyframes) + CCE (cones and rods), DESIGN.md section 5.

One forward handles a ragged batch of videos (all frames of all videos packed as [sum T, ...]) with no Python
loop over frames or videos: the temporal DPC-KNN runs once over the padded batch (see connector_parts), the
spatial merger once over all frames, the scorer once over [B, L_max], the csrc top-K mask builder once, and
every frame's tokens land in the packed output through index_copy at offsets derived from the mask builder's
token offsets. Per-video counts are host arithmetic (token_budget), so sizing the output needs no device read.

Training mode (official `PatchNet`): the hard top-K picks the layout (which frames are keyframes), and the
perturbed top-K (Berthet et al.) gives a soft indicator P [B, K, L] that weighs the cones as in the official
`extract_patches_from_indicators`: the event part of keyframe slot k is sum_l P[k, l] h_l (gradient reaches the
scorer through P and the frame features through weighted_pool), the spatial part sum_l P[k, l].detach() G_{c_l}.
The official code lays out keyframes by argmax_l P[k, l]; the hard top-K of the unperturbed scores is the
noise-free version of that and keeps the layout identical to inference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

import dynfocus_kernels
from dynfocus_kernels import library as kernel_ops
from dynfocus_kernels.tokens import CONE_NONE, CONE_PATCHES, CONE_PROTOTYPES

from ..config import ConnectorConfig
from ..errors import CheckpointError
from .connector_parts import RaggedFrames, cluster_ops, ragged_frames, topk_mask, video_events
from .event_scorer import EventScorer, masked_min_max_normalise
from .perturbed_topk import perturbed_topk
from .spatial_merger import SpatialMerger
from .token_budget import ROD_TOKENS, count_visual_tokens, frame_token_budget


_CONE_SOURCES = {"compressed": CONE_PROTOTYPES, "uncompressed": CONE_PATCHES}


class ConnectorOutput(NamedTuple):
    """Visual tokens of a ragged batch, packed in video order, and how to find each video's part."""

    tokens: torch.Tensor              # [sum of num_tokens, llm_width]
    num_tokens: tuple[int, ...]       # per video, host ints (lay out prompts without a device read)
    token_offsets: torch.Tensor       # int64 [B + 1]: video b is tokens[token_offsets[b]:token_offsets[b + 1]]
    frame_token_offsets: torch.Tensor  # int64 [B, T_max + 1]: token offset of frame t within video b
    keyframes: torch.Tensor           # int64 [B, K_max]: keyframe ids in time order, -1 padded
    frame_mask: torch.Tensor          # bool [B, T_max]: b_t
    scores: torch.Tensor              # fp32 [B, L_max]: min-max normalised event scores, 0 in padding
    event_centres: torch.Tensor       # int64 [B, L_max]: centre frame of each event prototype
    indicator: Optional[torch.Tensor] = None  # training: soft top-K indicator [B, K_max, L_max]

    def video_tokens(self, b: int) -> torch.Tensor:
        start = sum(self.num_tokens[:b])
        return self.tokens[start:start + self.num_tokens[b]]


class DynFocusConnector(nn.Module):
    """DPE + CCE with the official parameter names: `mm_projector.0/2`, `vlm_att_key_projector`,
    `vlm_att_val_projector`, `merge.*`, `selective_net.score_network.*`.

    cluster_backend: "auto" (Triton on CUDA or under the interpreter, else the plain-torch reference), "triton",
    "reference". jacobian: the perturbed top-K backward in training, "full" (paper Eq. 7) or "diagonal" (the
    official code's einsum); see perturbed_topk."""

    def __init__(self, config: ConnectorConfig, *, cluster_backend: str = "auto", jacobian: str = "full"):
        super().__init__()
        self.config = config
        self.cluster_backend = cluster_backend
        self.jacobian = jacobian
        self.budget = frame_token_budget(config)
        width, llm = config.vision_width, config.llm_width
        self.mm_projector = nn.Sequential(nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
        self.vlm_att_key_projector = nn.Linear(width, width)
        self.vlm_att_val_projector = nn.Linear(width, llm)
        self.merge = SpatialMerger(config, cluster_backend=cluster_backend)
        self.selective_net = nn.ModuleDict({"score_network": EventScorer(width)})

    def count_tokens(self, num_frames: int) -> int:
        """Exact number of visual tokens forward emits for one video of `num_frames` frames (as the baselines')."""
        return count_visual_tokens(num_frames, self.config)

    @property
    def event_scorer(self) -> EventScorer:
        return self.selective_net["score_network"]

    def rods(self, grouped: torch.Tensor, q_emb: torch.Tensor) -> torch.Tensor:
        """[mm_projector(mean G_t), vlm_att_val_projector(ctx)] [T, 2, llm] (paper Eqs. 9-10, official
        `one_token_generation`)."""
        context = self.text_context(grouped, q_emb)
        return torch.stack([self.mm_projector(grouped.mean(dim=1)), self.vlm_att_val_projector(context)], dim=1)

    def text_context(self, grouped: torch.Tensor, q_emb: torch.Tensor) -> torch.Tensor:
        """ctx [T, C] = mean over queries of att G_t, att = softmax(q_emb_t key^T / sqrt(C)), key = the key projector
        of G_t (the second rod's input)."""
        key = self.vlm_att_key_projector(grouped)
        attention = torch.softmax(q_emb.to(key.dtype) @ key.transpose(1, 2) / grouped.shape[-1] ** 0.5, dim=-1)
        return (attention @ grouped).mean(dim=1)

    def _check_inputs(self, patch_tokens: torch.Tensor, q_emb: torch.Tensor) -> None:
        config = self.config
        expected = (config.patch_grid ** 2, config.vision_width)
        if patch_tokens.dim() != 3 or tuple(patch_tokens.shape[1:]) != expected:
            raise ValueError(f"patch_tokens must be [sum T, {expected[0]}, {expected[1]}] (ViT patch tokens "
                             f"without CLS), got {tuple(patch_tokens.shape)}")
        if q_emb.dim() != 3 or q_emb.shape[0] != patch_tokens.shape[0] or q_emb.shape[2] != config.vision_width:
            raise ValueError(f"q_emb must be [sum T = {patch_tokens.shape[0]}, num_queries, {config.vision_width}] "
                             f"(one Q-Former output per frame), got {tuple(q_emb.shape)}")
        if q_emb.device != patch_tokens.device:
            raise ValueError(f"q_emb is on {q_emb.device} but patch_tokens on {patch_tokens.device}")

    def forward(self, patch_tokens: torch.Tensor, q_emb: torch.Tensor,
                frames_per_video: Sequence[int] | torch.Tensor, *, check: bool = True,
                noise: Optional[torch.Tensor] = None) -> ConnectorOutput:
        """patch_tokens [sum T, 256, C], q_emb [sum T, 32, C], frames_per_video (T_b) -> ConnectorOutput.

        check=True also rejects non-finite inputs (one host read). `noise` [B, samples, L_max] fixes the
        perturbation of the training path (tests)."""
        self._check_inputs(patch_tokens, q_emb)
        dtype = self.mm_projector[0].weight.dtype
        patch_tokens, q_emb = patch_tokens.to(dtype), q_emb.to(dtype)
        device, config = patch_tokens.device, self.config
        layout = ragged_frames(frames_per_video, patch_tokens.shape[0], config, device)
        if check and not bool(torch.isfinite(patch_tokens).all() & torch.isfinite(q_emb).all()):
            raise ValueError("patch_tokens or q_emb hold NaN or inf: check the vision tower's output")
        return self.forward_layout(patch_tokens, q_emb, layout, noise=noise)

    def fused_inference(self, device: torch.device) -> bool:
        """Whether forward takes the fused token path (_assemble_fused) on `device` now: Triton backend, eval mode,
        no gradient. Bucket layouts (CUDA graphs) need it."""
        return (cluster_ops(self.cluster_backend, device) is dynfocus_kernels and not torch.is_grad_enabled()
                and not (self.training and self.budget.cone_tokens))

    def forward_layout(self, patch_tokens: torch.Tensor, q_emb: torch.Tensor, layout: RaggedFrames, *,
                       noise: Optional[torch.Tensor] = None) -> ConnectorOutput:
        """forward from a built layout (connector_parts: ragged_frames, or bucket_layout for a CUDA graph, which only
        the fused inference path reads); inputs already checked and cast. No host read."""
        device, config = patch_tokens.device, self.config
        fused = self.fused_inference(device)
        if layout.bucketed and not fused:
            raise ValueError("a bucket layout needs the fused inference path (Triton backend, eval, no gradient)")
        ops = cluster_ops(self.cluster_backend, device)
        events, summaries = video_events(patch_tokens, layout, config, ops)
        scores = masked_min_max_normalise(self.event_scorer(summaries, events.valid), events.valid)
        mask = topk_mask(scores.detach(), events.centres, layout, self.budget, device)
        # G_t feeds the rods and the compressed cones; "uncompressed" cones without any rods never read it.
        needs_spatial = self.budget.other_tokens or self.budget.keyframe_rods or config.cone_mode == "compressed"
        spatial = self.merge.prototypes(patch_tokens).grouped if needs_spatial else None
        indicator = None
        if self.training and self.budget.cone_tokens:
            indicator = perturbed_topk(scores, layout.events, layout.keep, events.centres, max_keep=layout.max_keep,
                                       num_samples=config.perturb_samples, sigma=config.perturb_sigma, noise=noise,
                                       jacobian=self.jacobian)
        if fused:
            return self._assemble_fused(patch_tokens, q_emb, spatial, events, scores, mask, layout)
        return self._assemble(patch_tokens, q_emb, spatial, events, scores, mask, layout, indicator)

    def _assemble_fused(self, patch_tokens, q_emb, spatial, events, scores, mask, layout) -> ConnectorOutput:
        """Inference with the Triton backend: the projector's input rows gathered in one launch (keyframes' cone
        inputs, every frame's mean G_t), one mm_projector call over all of them, the text context for the second
        rods, and one launch placing every token at its row (kernels/tokens.py); the same tokens as _assemble."""
        budget, config = self.budget, self.config
        num_tokens = tuple(k * budget.key_tokens + (t - k) * budget.other_tokens
                           for t, k in zip(layout.num_frames, layout.num_keep))
        cone = (_CONE_SOURCES[config.cone_mode] if budget.cone_tokens else CONE_NONE)
        rod_means = bool(budget.other_tokens or budget.keyframe_rods)
        grouped = spatial if spatial is not None else patch_tokens  # unread when there are neither rods nor G cones
        inputs, keyframes = kernel_ops.projector_inputs(
            events.prototypes, grouped, patch_tokens, events.centres, mask.kept_ids, layout.keyframe_video,
            layout.keyframe_slot, layout.frame_starts, layout.frames, layout.keep, cone, budget.cone_tokens,
            config.num_pooled, rod_means)
        projected = self.mm_projector(inputs)
        values = self.vlm_att_val_projector(self.text_context(spatial, q_emb)) if rod_means else projected
        tokens = kernel_ops.scatter_tokens(
            projected, values, layout.token_starts, mask.token_offsets, mask.frame_mask, layout.video_of_frame,
            layout.time_of_frame, layout.keyframe_video, layout.keyframe_slot, mask.kept_ids, events.centres,
            layout.frame_starts, layout.frames, layout.keep, layout.token_rows, budget.cone_tokens,
            budget.keyframe_rods, bool(budget.other_tokens))
        return ConnectorOutput(tokens, num_tokens, layout.token_starts, mask.token_offsets, keyframes, mask.frame_mask,
                               scores.detach(), events.centres, None)

    def _cones(self, patch_tokens, spatial, events, mask, layout, indicator, key_video, key_slot, key_frame):
        """Keyframe tokens before their rods: [n_key, cone_tokens, llm] (paper Eq. 8)."""
        config = self.config
        if indicator is not None:  # training: soft cones weighed by the perturbed top-K indicator
            source = patch_tokens if config.cone_mode == "uncompressed" else spatial
            at_centres = source[layout.frame_starts[:, None] + events.centres]                # [B, L_max, n, C]
            weights = indicator.to(source.dtype)
            if config.cone_mode == "uncompressed":
                mixed = torch.einsum("bkl,blnc->bknc", weights, at_centres)
                return self.mm_projector(mixed[key_video, key_slot])
            focal = torch.einsum("bkl,blc->bkc", weights, events.prototypes)[key_video, key_slot]
            grouped = torch.einsum("bkl,blnc->bknc", weights.detach(), at_centres)[key_video, key_slot]
            focal = focal.unflatten(-1, (config.num_pooled, config.vision_width))
            return self.mm_projector(torch.cat([focal, grouped], dim=1))
        if config.cone_mode == "uncompressed":
            return self.mm_projector(patch_tokens[key_frame])
        kept = mask.kept_ids[key_video, key_slot]
        focal = events.prototypes[key_video, kept].unflatten(-1, (config.num_pooled, config.vision_width))
        return self.mm_projector(torch.cat([focal, spatial[key_frame]], dim=1))

    def _assemble(self, patch_tokens, q_emb, spatial, events, scores, mask, layout, indicator) -> ConnectorOutput:
        """Scatter every frame's tokens (time order; keyframe: cones then rods, paper Eq. 11) into the output."""
        device, budget = patch_tokens.device, self.budget
        num_tokens = tuple(k * budget.key_tokens + (t - k) * budget.other_tokens
                           for t, k in zip(layout.num_frames, layout.num_keep))
        total = sum(num_tokens)
        video_offsets = torch.zeros(layout.batch_size + 1, dtype=torch.int64, device=device)
        video_offsets[1:] = torch.cumsum(mask.total_tokens, 0)
        vid, time = layout.video_of_frame, layout.time_of_frame
        frame_start = video_offsets[vid] + mask.token_offsets[vid, time]              # [sum T]
        is_key = mask.frame_mask[vid, time]
        # Row `total` is a discard slot for frames that carry no such tokens; it is cut off at the end.
        tokens = patch_tokens.new_full((total + 1, self.config.llm_width), float("nan"))  # every row is written
        if budget.other_tokens or budget.keyframe_rods:
            start = frame_start + torch.where(is_key, budget.cone_tokens, 0)
            rows = start[:, None] + torch.arange(ROD_TOKENS, device=device)
            if not (budget.keyframe_rods and budget.other_tokens):
                carries = is_key if budget.keyframe_rods else ~is_key
                rows = torch.where(carries[:, None], rows, total)
            rods = self.rods(spatial, q_emb)
            tokens = tokens.index_copy(0, rows.flatten(), rods.flatten(0, 1))
        if budget.cone_tokens:
            key_video, key_slot = layout.keyframe_video, layout.keyframe_slot
            key_time = events.centres[key_video, mask.kept_ids[key_video, key_slot]]
            key_frame = layout.frame_starts[key_video] + key_time
            cones = self._cones(patch_tokens, spatial, events, mask, layout, indicator, key_video, key_slot, key_frame)
            rows = frame_start[key_frame][:, None] + torch.arange(budget.cone_tokens, device=device)
            tokens = tokens.index_copy(0, rows.flatten(), cones.flatten(0, 1))
        keyframes = torch.where(mask.kept_ids >= 0,
                                events.centres.gather(1, mask.kept_ids.clamp_min(0)), -1)
        return ConnectorOutput(tokens[:total], num_tokens, video_offsets, mask.token_offsets, keyframes,
                               mask.frame_mask, scores.detach(), events.centres, indicator)


# Official checkpoint layout (DESIGN.md section 5): the projectors live under `model.`, the scorer and the merger
# at the top level of LlavaLlamaAttForCausalLM. `selective_net.merge.*`, `sf_former.*` and
# `model.vlm_att_em_projector.*` exist there too but no forward path reads them.
_OFFICIAL_PROJECTORS = ("mm_projector.", "vlm_att_key_projector.", "vlm_att_val_projector.")
_OFFICIAL_TOP_LEVEL = ("merge.", "selective_net.score_network.")


def convert_official_connector(state_dict, config: Optional[ConnectorConfig] = None) -> dict:
    """Official DynFocus checkpoint dict (`model.mm_projector.0.weight`, `merge.score.weight`,
    `selective_net.score_network.in_conv.0.weight`, ...) -> DynFocusConnector names. The leading `model.` of
    the projectors is optional. Raises CheckpointError naming missing, unexpected or wrong-shape keys."""
    from .eva_vit import check_converted  # the shared key/shape checker

    converted = {}
    for name, tensor in state_dict.items():
        short = name[len("model."):] if name.startswith("model.") else name
        if short.startswith(_OFFICIAL_PROJECTORS) or name.startswith(_OFFICIAL_TOP_LEVEL):
            converted[short if short.startswith(_OFFICIAL_PROJECTORS) else name] = tensor
    if not converted:
        raise CheckpointError("the state dict holds no connector weights (expected model.mm_projector.*, "
                              "model.vlm_att_key_projector.*, model.vlm_att_val_projector.*, merge.*, "
                              "selective_net.score_network.*): is it a DynFocus checkpoint?")
    with torch.device("meta"):
        reference = DynFocusConnector(config or ConnectorConfig(), cluster_backend="reference")
    check_converted(converted, reference, source="official connector state dict")
    return converted


def export_official_connector(state_dict) -> dict:
    """DynFocusConnector state dict -> official names (inverse of convert_official_connector)."""
    return {(f"model.{name}" if name.startswith(_OFFICIAL_PROJECTORS) else name): tensor
            for name, tensor in state_dict.items()}

"""Token-count baselines behind the connector interface, for profiling what DynFocus's dynamic encoding buys.

Every encoder takes what the DynFocus connector takes (`patch_tokens [sum T, g^2, C]`, `q_emb [sum T, 32, C]`,
`frames_per_video`) and returns a `ConnectorOutput` with the same fields, so the engine or a profiler can swap
one for another. All of them reuse the connector's trained projectors (shared parameters, no copies):

| name                 | tokens per video of T frames   | what each frame becomes                                    |
|----------------------|--------------------------------|------------------------------------------------------------|
| "full"               | T * g^2 (256)                  | mm_projector of every patch token (LLaVA-style)            |
| "pool-4x4"           | T * p^2 (16)                   | mm_projector of the 4x4 average pool of the patch grid     |
| "llama-vid"          | T * 2                          | [context, content] (LLaMA-VID, Li et al. 2024, Sec. 3.1)   |
| "uniform-K"          | min(K, T) * g^2                | K frames picked uniformly, all patch tokens each           |
| "dynfocus-L{L}-r{r}" | count_visual_tokens (Eq. 11)   | the DynFocus connector with num_events L, keep_ratio K/L r |

LLaMA-VID's two tokens are the connector's rods computed over the raw patch tokens instead of G_t: context =
vlm_att_val_projector(mean over queries of softmax(q_emb key^T / sqrt(C)) v), content = mm_projector(mean of v),
in LLaMA-VID's order (context first; official `token_generation`). Uniform sampling takes the middle frame of
each of K equal segments, t_i = floor((i + 1/2) T / K), which are distinct whenever K <= T.

Uniform-K frames are "keyframes" in the output (frame_mask, keyframes); the per-frame baselines have none.
No encoder loops over frames or videos in Python: outputs are per-frame token blocks packed in time order.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .connector import ConnectorOutput, DynFocusConnector
from .connector_parts import RaggedFrames, pool_frames, ragged_frames
from .token_budget import ROD_TOKENS, count_visual_tokens

PAPER_SETTING = (25, 0.8)   # L, K/L of the paper's DynFocus (Sec. 4.1)
DYNFOCUS_GRID = tuple((L, r) for L in (10, 25, 50) for r in (0.4, 0.8))


def dynfocus_name(num_events: int, keep_ratio: float) -> str:
    return f"dynfocus-L{num_events}-r{keep_ratio:g}"


PAPER_DYNFOCUS = dynfocus_name(*PAPER_SETTING)


class VisualEncoder(nn.Module):
    """One way of turning a video's frames into visual tokens; the connector interface plus exact accounting.

    uses_qformer: whether forward reads q_emb (otherwise it may be None and the Q-Former need not run).
    """

    name: str = ""
    uses_qformer: bool = False

    def __init__(self, connector: DynFocusConnector):
        super().__init__()
        self.connector = connector  # shared: the baselines use the model's own projectors

    @property
    def config(self):
        return self.connector.config

    def count_tokens(self, num_frames: int) -> int:
        """Exact number of visual tokens forward emits for one video of `num_frames` frames."""
        raise NotImplementedError

    def frames_read(self, num_frames: int) -> int:
        """How many of the video's frames the encoder reads (the ViT need not encode the others)."""
        _check_frames(num_frames)
        return num_frames

    def _prepare(self, patch_tokens, q_emb, frames_per_video, check) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                                               RaggedFrames]:
        config = self.config
        expected = (config.patch_grid ** 2, config.vision_width)
        if patch_tokens.dim() != 3 or tuple(patch_tokens.shape[1:]) != expected:
            raise ValueError(f"patch_tokens must be [sum T, {expected[0]}, {expected[1]}] (ViT patch tokens "
                             f"without CLS), got {tuple(patch_tokens.shape)}")
        if self.uses_qformer and q_emb is None:
            raise ValueError(f"the {self.name} encoder reads q_emb [sum T, num_queries, {config.vision_width}]: "
                             "run the Q-Former first")
        if q_emb is not None and (q_emb.dim() != 3 or q_emb.shape[0] != patch_tokens.shape[0]
                                  or q_emb.shape[2] != config.vision_width):
            raise ValueError(f"q_emb must be [sum T = {patch_tokens.shape[0]}, num_queries, {config.vision_width}] "
                             f"(one Q-Former output per frame), got {tuple(q_emb.shape)}")
        layout = ragged_frames(frames_per_video, patch_tokens.shape[0], config, patch_tokens.device)
        dtype = self.connector.mm_projector[0].weight.dtype
        patch_tokens = patch_tokens.to(dtype)
        q_emb = q_emb.to(dtype) if q_emb is not None and self.uses_qformer else None
        if check:
            finite = torch.isfinite(patch_tokens).all()
            if q_emb is not None:
                finite &= torch.isfinite(q_emb).all()
            if not bool(finite):
                raise ValueError("patch_tokens or q_emb hold NaN or inf: check the vision tower's output")
        return patch_tokens, q_emb, layout


def _check_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"a video needs an integer number of frames >= 1, got {num_frames!r}")


def _packed_output(tokens: torch.Tensor, num_tokens: Sequence[int], frame_token_offsets: torch.Tensor,
                   frame_mask: torch.Tensor, keyframes: torch.Tensor) -> ConnectorOutput:
    """A ConnectorOutput without event prototypes (no scores, no event centres: [B, 0])."""
    device, batch = tokens.device, len(num_tokens)
    video_offsets = torch.tensor([0] + list(num_tokens), dtype=torch.int64).cumsum(0).to(device)
    no_events = torch.zeros(batch, 0, dtype=torch.int64, device=device)
    return ConnectorOutput(tokens, tuple(num_tokens), video_offsets, frame_token_offsets, keyframes, frame_mask,
                           no_events.to(torch.float32), no_events)


class PerFrameEncoder(VisualEncoder):
    """Base of the encoders that give every frame the same number of tokens (`tokens_per_frame`)."""

    tokens_per_frame: int = 0

    def count_tokens(self, num_frames: int) -> int:
        _check_frames(num_frames)
        return num_frames * self.tokens_per_frame

    def encode_frames(self, patch_tokens: torch.Tensor, q_emb: Optional[torch.Tensor]) -> torch.Tensor:
        """[N, g^2, C] (+ q_emb [N, 32, C]) -> [N, tokens_per_frame, llm_width]."""
        raise NotImplementedError

    def forward(self, patch_tokens: torch.Tensor, q_emb: Optional[torch.Tensor],
                frames_per_video: Sequence[int] | torch.Tensor, *, check: bool = True) -> ConnectorOutput:
        patch_tokens, q_emb, layout = self._prepare(patch_tokens, q_emb, frames_per_video, check)
        n, device = self.tokens_per_frame, patch_tokens.device
        # Frames are packed video by video in time order, so their token blocks already are too.
        tokens = self.encode_frames(patch_tokens, q_emb).flatten(0, 1)
        steps = torch.arange(layout.max_frames + 1, device=device)
        frame_token_offsets = torch.minimum(steps, layout.frames[:, None]) * n
        frame_mask = torch.zeros(layout.batch_size, layout.max_frames, dtype=torch.bool, device=device)
        keyframes = torch.zeros(layout.batch_size, 0, dtype=torch.int64, device=device)
        return _packed_output(tokens, [t * n for t in layout.num_frames], frame_token_offsets, frame_mask, keyframes)


class FullTokensEncoder(PerFrameEncoder):
    """mm_projector of every patch token: g^2 (256) tokens per frame."""

    name = "full"

    def __init__(self, connector: DynFocusConnector):
        super().__init__(connector)
        self.tokens_per_frame = connector.config.patch_grid ** 2

    def encode_frames(self, patch_tokens, q_emb):
        return self.connector.mm_projector(patch_tokens)


class PooledTokensEncoder(PerFrameEncoder):
    """mm_projector of the p x p average pool of the patch grid (p = pool_grid, 4 -> 16 tokens per frame)."""

    def __init__(self, connector: DynFocusConnector, grid: Optional[int] = None):
        super().__init__(connector)
        grid = connector.config.pool_grid if grid is None else grid
        if not 1 <= grid <= connector.config.patch_grid or connector.config.patch_grid % grid:
            raise ValueError(f"pool-{grid}x{grid} needs a grid dividing the {connector.config.patch_grid}-patch grid")
        self.grid, self.name, self.tokens_per_frame = grid, f"pool-{grid}x{grid}", grid * grid

    def encode_frames(self, patch_tokens, q_emb):
        return self.connector.mm_projector(pool_frames(patch_tokens, self.config.patch_grid, self.grid))


class LlamaVidEncoder(PerFrameEncoder):
    """LLaMA-VID's [context token, content token] per frame: the connector's rods over the raw patch tokens."""

    name = "llama-vid"
    uses_qformer = True
    tokens_per_frame = ROD_TOKENS

    def encode_frames(self, patch_tokens, q_emb):
        content_then_context = self.connector.rods(patch_tokens, q_emb)
        return content_then_context.flip(1)


class UniformFramesEncoder(VisualEncoder):
    """K frames picked uniformly (middle of K equal segments; all frames when T <= K), g^2 tokens each."""

    def __init__(self, connector: DynFocusConnector, num_frames: int):
        super().__init__(connector)
        _check_frames(num_frames)
        self.num_picked, self.name = num_frames, f"uniform-{num_frames}"
        self.tokens_per_frame = connector.config.patch_grid ** 2

    def frames_read(self, num_frames: int) -> int:
        _check_frames(num_frames)
        return min(self.num_picked, num_frames)

    def count_tokens(self, num_frames: int) -> int:
        return self.frames_read(num_frames) * self.tokens_per_frame

    def picked_frames(self, frames_per_video: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(video, slot, time) of every picked frame, in video then time order (host tensors)."""
        frames = torch.tensor(list(frames_per_video), dtype=torch.int64)
        picked = frames.clamp(max=self.num_picked)
        video = torch.repeat_interleave(torch.arange(len(frames)), picked)
        slot = torch.arange(int(picked.sum())) - (picked.cumsum(0) - picked)[video]
        time = (2 * slot + 1) * frames[video] // (2 * picked[video])
        return video, slot, time

    def forward(self, patch_tokens: torch.Tensor, q_emb: Optional[torch.Tensor],
                frames_per_video: Sequence[int] | torch.Tensor, *, check: bool = True) -> ConnectorOutput:
        patch_tokens, _, layout = self._prepare(patch_tokens, q_emb, frames_per_video, check)
        device, n = patch_tokens.device, self.tokens_per_frame
        video, slot, time = (t.to(device) for t in self.picked_frames(layout.num_frames))
        rows = layout.frame_starts[video] + time
        tokens = self.connector.mm_projector(patch_tokens.index_select(0, rows)).flatten(0, 1)
        batch, max_frames = layout.batch_size, layout.max_frames
        frame_mask = torch.zeros(batch, max_frames, dtype=torch.bool, device=device).index_put_(
            (video, time), torch.ones_like(time, dtype=torch.bool))
        frame_token_offsets = torch.zeros(batch, max_frames + 1, dtype=torch.int64, device=device)
        frame_token_offsets[:, 1:] = torch.cumsum(frame_mask.to(torch.int64) * n, dim=1)
        max_picked = min(self.num_picked, max_frames)
        keyframes = torch.full((batch, max_picked), -1, dtype=torch.int64, device=device).index_put_(
            (video, slot), time)
        return _packed_output(tokens, [self.count_tokens(t) for t in layout.num_frames], frame_token_offsets,
                              frame_mask, keyframes)


def dynfocus_variant(connector: DynFocusConnector, num_events: int, keep_ratio: float,
                     **switches) -> DynFocusConnector:
    """A DynFocus connector with another L (num_events) and K/L (keep_ratio), and optionally Table 6's switches
    (`rods`, `cone_mode`), that shares every parameter of `connector` (none of them depends on L, K or the
    switches)."""
    config = dataclasses.replace(connector.config, num_events=num_events, keep_ratio=keep_ratio, **switches)
    with torch.device("meta"):  # its own modules are replaced below: never allocate them
        variant = DynFocusConnector(config, cluster_backend=connector.cluster_backend, jacobian=connector.jacobian)
    for name, child in connector.named_children():
        setattr(variant, name, child)
    return variant.train(connector.training)


class DynFocusEncoder(VisualEncoder):
    """The DynFocus connector (DPE + CCE) at a given L and K/L."""

    uses_qformer = True

    def __init__(self, connector: DynFocusConnector, num_events: int, keep_ratio: float, *,
                 name: Optional[str] = None, **switches):
        super().__init__(dynfocus_variant(connector, num_events, keep_ratio, **switches))
        self.name = name or dynfocus_name(num_events, keep_ratio)

    def count_tokens(self, num_frames: int) -> int:
        return count_visual_tokens(num_frames, self.config)

    def forward(self, patch_tokens: torch.Tensor, q_emb: torch.Tensor,
                frames_per_video: Sequence[int] | torch.Tensor, *, check: bool = True) -> ConnectorOutput:
        if q_emb is None:
            raise ValueError(f"the {self.name} encoder reads q_emb: run the Q-Former first")
        return self.connector(patch_tokens, q_emb, frames_per_video, check=check)


def build_baselines(connector: DynFocusConnector, *, uniform_frames: Sequence[int] = (8,),
                    dynfocus_grid: Sequence[tuple[int, float]] = DYNFOCUS_GRID) -> dict[str, VisualEncoder]:
    """Every baseline over one connector's parameters, by name: full, pool, llama-vid, uniform-K for each K in
    `uniform_frames`, and DynFocus at each (L, K/L) of `dynfocus_grid` (the paper's (25, 0.8) always included)."""
    encoders: list[VisualEncoder] = [FullTokensEncoder(connector), PooledTokensEncoder(connector),
                                     LlamaVidEncoder(connector)]
    encoders += [UniformFramesEncoder(connector, k) for k in uniform_frames]
    grid = list(dict.fromkeys([PAPER_SETTING, *dynfocus_grid]))
    encoders += [DynFocusEncoder(connector, L, r) for L, r in grid]
    return {encoder.name: encoder for encoder in encoders}


# The paper's Table 6 ablations of the encoding, at the model's own L and K/L.
TABLE6_SWITCHES = {"dynfocus-rods-off": {"rods": False}, "dynfocus-cones-off": {"cone_mode": "off"},
                   "dynfocus-coarse": {"cone_mode": "coarse"}, "dynfocus-uncompressed": {"cone_mode": "uncompressed"}}
_DYNFOCUS_LR = re.compile(r"dynfocus-L(\d+)-r(\d+(?:\.\d*)?)")


def encoder_by_name(connector: DynFocusConnector, name: str) -> VisualEncoder:
    """The encoder `name` names over `connector`'s parameters: full, llama-vid, pool-GxG, uniform-K,
    dynfocus-L<L>-r<K/L> (any L >= 1 and 0 < K/L <= 1) or a Table 6 switch (TABLE6_SWITCHES). ConfigError naming
    the forms otherwise."""
    config = connector.config
    fixed = {"full": FullTokensEncoder, "llama-vid": LlamaVidEncoder}
    if name in fixed:
        return fixed[name](connector)
    if name in TABLE6_SWITCHES:
        return DynFocusEncoder(connector, config.num_events, config.keep_ratio, name=name, **TABLE6_SWITCHES[name])
    pool = re.fullmatch(r"pool-(\d+)x\1", name)
    if pool:
        try:
            return PooledTokensEncoder(connector, int(pool.group(1)))
        except ValueError as error:
            raise ConfigError(f"visual_encoder {name!r}: {error}") from None
    uniform = re.fullmatch(r"uniform-(\d+)", name)
    if uniform and int(uniform.group(1)) >= 1:
        return UniformFramesEncoder(connector, int(uniform.group(1)))
    grid = _DYNFOCUS_LR.fullmatch(name)
    if grid and int(grid.group(1)) >= 1 and 0 < float(grid.group(2)) <= 1:
        return DynFocusEncoder(connector, int(grid.group(1)), float(grid.group(2)), name=name)
    raise ConfigError(f"visual_encoder {name!r} is unknown: expected dynfocus, full, llama-vid, pool-GxG (G dividing "
                     f"{config.patch_grid}), uniform-K, dynfocus-L<events>-r<keep ratio in (0, 1]> or one of "
                     f"{sorted(TABLE6_SWITCHES)}")

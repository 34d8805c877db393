"""Host side of the csrc top-K mask builder (DESIGN.md section 7).

After the connector scores its event prototypes (paper Sec. 3.2, DESIGN.md section 5), every video b keeps its
K_b best prototypes; the centre frame of each kept prototype becomes a keyframe (b_t = 1) that gets
`key_tokens` (cones + rods, 40) in the LLM input, every other frame `other_tokens` (rods, 2), in time order
(paper Eq. 11). `build_topk_mask` does that bookkeeping for a whole ragged batch in one kernel launch (CUDA) or
one call of the C++ twin (CPU); `build_topk_mask_reference` is the same contract in plain torch, the oracle of
the tests and the baseline of `bench/bench_topk_mask.py`.

Validation: shapes, dtypes and devices are always checked (no device work). `check=True` also checks the values,
which reads them on the host (a device sync on GPU); hot paths that validated upstream pass `check=False`, and
also `max_keep`/`max_frames`, whose defaults are another host read. Unchecked bad values give unspecified numbers
but never an out-of-bounds access (the core clamps every count to its buffer).

An empty batch slot is allowed: a video with num_protos = 0 must have num_keep = 0 (e.g. a failed request kept
in place); a video with prototypes must keep at least one, as DynFocus keeps max(1, round(0.8 L)).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import torch

_INT32_MAX = 2**31 - 1
_UPCAST_SCORE_DTYPES = (torch.float16, torch.bfloat16)  # exact in float32, so ranks and ties are unchanged


class TopKMask(NamedTuple):
    """Outputs of the top-K mask builder for a batch of B videos."""

    kept_ids: torch.Tensor  # int64 [B, K_max]: kept prototype ids in centre-frame order, -1 padded
    frame_mask: torch.Tensor  # bool [B, T_max]: b_t, True at the centre frame of a kept prototype
    token_offsets: torch.Tensor  # int64 [B, T_max + 1]: exclusive prefix sum of per-frame token counts
    total_tokens: torch.Tensor  # int64 [B]: visual tokens of each video (= token_offsets[:, T_max])


class _Batch(NamedTuple):
    scores: torch.Tensor  # float32 [B, L_max], unit column stride
    centre_frames: torch.Tensor  # [B, L_max], unit column stride
    num_protos: torch.Tensor  # [B]
    num_keep: torch.Tensor
    num_frames: torch.Tensor
    max_keep: int
    max_frames: int


_MISSING_EXTENSION = (
    "dynfocus_infer._csrc (the compiled top-K mask builder) is not importable ({error}). Build it with "
    "`bash scripts/setup.sh` (or `pip install --no-build-isolation -e .`); that needs CMake, ninja, pybind11 "
    "and a C++ compiler (plus nvcc for the CUDA kernel)."
)


def _extension():
    try:
        from . import _csrc
    except ImportError as error:
        raise ImportError(_MISSING_EXTENSION.format(error=error)) from error
    return _csrc


def has_cuda_build() -> bool:
    """True when the installed extension contains the compiled CUDA kernel."""
    return bool(_extension().has_cuda_build())


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_count_tensor(name: str, value, batch_size: int, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, device=device)
        if value.numel() == 0:  # an empty list becomes float32; an empty batch has integer counts
            value = value.long()
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but scores is on {device}; put all inputs on one device")
    if value.dim() != 1 or value.shape[0] != batch_size or not _is_integer_dtype(value.dtype):
        raise ValueError(
            f"{name} must be an integer tensor of shape [{batch_size}] (one count per video), "
            f"got {value.dtype} {tuple(value.shape)}"
        )
    return value


def _check_count_argument(name: str, value, upper: int = _INT32_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= upper:
        raise ValueError(f"{name} must be an int in [0, {upper}], got {value!r}")


def _first_bad(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in flags.nonzero()[0].tolist())


def _check_values(batch: _Batch) -> None:
    """Raises ValueError naming the first bad video; one host read when everything is fine."""
    L_max = batch.scores.shape[1]
    L, K, T = (t.to(torch.int64) for t in (batch.num_protos, batch.num_keep, batch.num_frames))
    in_video = torch.arange(L_max, device=L.device) < L[:, None]
    centres = batch.centre_frames
    per_video_rules = [
        ((L < 0) | (L > L_max), f"num_protos = {{L}} is outside [0, {L_max}] (scores has {L_max} columns)"),
        (T < 0, "num_frames = {T} is negative"),
        (T > batch.max_frames, f"num_frames = {{T}} exceeds max_frames = {batch.max_frames}"),
        ((L == 0) & (K != 0), "num_keep = {K} but num_protos = 0; a video without prototypes must keep 0"),
        ((L > 0) & (K < 1), "num_keep = {K} < 1; a video with {L} prototypes must keep at least 1"),
        (K > L, "num_keep = {K} exceeds num_protos = {L}; keep at most num_protos"),
        (K > batch.max_keep, f"num_keep = {{K}} exceeds max_keep = {batch.max_keep}"),
    ]
    bad_centre = in_video & ((centres < 0) | (centres >= T[:, None]))
    bad_score = in_video & torch.isnan(batch.scores)
    flags = torch.stack([rule.any() for rule, _ in per_video_rules] + [bad_centre.any(), bad_score.any()])
    failed = flags.tolist()  # the one host read
    for (rule, message), is_bad in zip(per_video_rules, failed):
        if is_bad:
            (b,) = _first_bad(rule)
            values = message.format(L=int(L[b]), K=int(K[b]), T=int(T[b]))
            raise ValueError(f"build_topk_mask: video {b}: {values}")
    if failed[-2]:
        b, i = _first_bad(bad_centre)
        raise ValueError(
            f"build_topk_mask: video {b}: centre_frames[{b}, {i}] = {int(centres[b, i])} is outside "
            f"[0, num_frames = {int(T[b])}); every prototype's centre must be one of the video's frames"
        )
    if failed[-1]:
        b, i = _first_bad(bad_score)
        raise ValueError(f"build_topk_mask: video {b}: scores[{b}, {i}] is NaN; the scorer produced NaN")


def _prepare(scores, centre_frames, num_protos, num_keep, num_frames, key_tokens, other_tokens, max_keep,
             max_frames, check: bool, count_dtype: torch.dtype) -> _Batch:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [B, L_max] tensor, got {getattr(scores, 'shape', type(scores))}")
    if scores.dtype in _UPCAST_SCORE_DTYPES:
        scores = scores.float()
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 (float16/bfloat16 are upcast), got {scores.dtype}; rounding "
                         "float64 to float32 could create ties, so cast it yourself if that is acceptable")
    device, (B, L_max) = scores.device, scores.shape
    if not isinstance(centre_frames, torch.Tensor) or centre_frames.shape != scores.shape:
        raise ValueError(f"centre_frames must be a tensor of the scores' shape {tuple(scores.shape)}, got "
                         f"{getattr(centre_frames, 'shape', type(centre_frames))}")
    if centre_frames.device != device:
        raise ValueError(f"centre_frames is on {centre_frames.device} but scores is on {device}; "
                         "put all inputs on one device")
    if not _is_integer_dtype(centre_frames.dtype):
        raise ValueError(f"centre_frames must hold integer frame indices, got {centre_frames.dtype}")
    counts = [_as_count_tensor(name, value, B, device) for name, value in
              (("num_protos", num_protos), ("num_keep", num_keep), ("num_frames", num_frames))]
    _check_count_argument("key_tokens", key_tokens)
    _check_count_argument("other_tokens", other_tokens)
    if max_keep is None or max_frames is None:
        maxima = torch.stack([counts[1].max(), counts[2].max()]).tolist() if B else [0, 0]
        max_keep = max(0, maxima[0]) if max_keep is None else max_keep
        max_frames = max(0, maxima[1]) if max_frames is None else max_frames
    _check_count_argument("max_keep", max_keep)
    # Below INT32_MAX so that max_frames + 1 offsets still count in int32 inside the kernels.
    _check_count_argument("max_frames", max_frames, upper=_INT32_MAX - 1)
    max_keep, max_frames = int(max_keep), int(max_frames)
    batch = _Batch(scores, centre_frames, *counts, max_keep, max_frames)
    if check:
        _check_values(batch)
    if L_max > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    centre_frames = centre_frames.to(count_dtype)
    if L_max > 1 and centre_frames.stride(1) != 1:
        centre_frames = centre_frames.contiguous()
    counts = [count.to(count_dtype).contiguous() for count in counts]
    return _Batch(scores, centre_frames, *counts, max_keep, max_frames)


def _empty_outputs(B: int, max_keep: int, max_frames: int, device: torch.device) -> TopKMask:
    return TopKMask(
        kept_ids=torch.empty(B, max_keep, dtype=torch.int64, device=device),
        frame_mask=torch.empty(B, max_frames, dtype=torch.bool, device=device),
        token_offsets=torch.empty(B, max_frames + 1, dtype=torch.int64, device=device),
        total_tokens=torch.empty(B, dtype=torch.int64, device=device),
    )


def _check_out(out: TopKMask, B: int, max_keep: int, max_frames: int, device: torch.device) -> None:
    shapes = ((B, max_keep), (B, max_frames), (B, max_frames + 1), (B,))
    dtypes = (torch.int64, torch.bool, torch.int64, torch.int64)
    for name, given, shape, dtype in zip(TopKMask._fields, out, shapes, dtypes):
        if not (isinstance(given, torch.Tensor) and given.shape == shape and given.dtype == dtype
                and given.device == device and given.is_contiguous()):
            raise ValueError(f"out.{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
                             f"{getattr(given, 'dtype', type(given))} {tuple(getattr(given, 'shape', ()))}")


def build_topk_mask(
    scores: torch.Tensor,
    centre_frames: torch.Tensor,
    num_protos: torch.Tensor | Sequence[int],
    num_keep: torch.Tensor | Sequence[int],
    num_frames: torch.Tensor | Sequence[int],
    *,
    key_tokens: int = 40,
    other_tokens: int = 2,
    max_keep: int | None = None,
    max_frames: int | None = None,
    check: bool = True,
    out: TopKMask | None = None,
) -> TopKMask:
    """Keeps the num_keep[b] best prototypes of each video and lays out its frames' visual tokens.

    scores: float32 [B, L_max] (float16/bfloat16 are upcast, which is exact); centre_frames: integer [B, L_max],
    the frame of each prototype's centre; num_protos / num_keep / num_frames: integer [B] (L_b, K_b, T_b).
    Entries at or beyond L_b are ignored. Score ties go to the lower prototype id; kept ids come in
    centre-frame order (ties to the lower id). `out` takes preallocated outputs (e.g. for CUDA-graph capture).
    CUDA tensors: one kernel launch on the current stream, with no host sync when check=False and
    max_keep/max_frames are given (int32 counts and centre frames also spare the cast kernels).
    CPU tensors: the C++ twin.
    """
    batch = _prepare(scores, centre_frames, num_protos, num_keep, num_frames, key_tokens, other_tokens,
                     max_keep, max_frames, check, count_dtype=torch.int32)
    (B, max_protos), device = batch.scores.shape, batch.scores.device
    if out is None:
        out = _empty_outputs(B, batch.max_keep, batch.max_frames, device)
    else:
        _check_out(out, B, batch.max_keep, batch.max_frames, device)
    if B == 0:
        return out
    if max_protos > _INT32_MAX:
        raise ValueError(f"scores has {max_protos} columns; at most {_INT32_MAX} prototypes per video")
    extension = _extension()
    arguments = dict(
        scores=batch.scores.data_ptr(), scores_row_stride=batch.scores.stride(0),
        centre_frames=batch.centre_frames.data_ptr(), centre_row_stride=batch.centre_frames.stride(0),
        num_protos=batch.num_protos.data_ptr(), num_keep=batch.num_keep.data_ptr(),
        num_frames=batch.num_frames.data_ptr(), batch=B, max_protos=max_protos, max_keep=batch.max_keep,
        max_frames=batch.max_frames, key_tokens=key_tokens, other_tokens=other_tokens,
        kept_ids=out.kept_ids.data_ptr(), frame_mask=out.frame_mask.data_ptr(),
        token_offsets=out.token_offsets.data_ptr(), total_tokens=out.total_tokens.data_ptr(),
    )
    if device.type == "cuda":
        if not extension.has_cuda_build():
            raise RuntimeError(
                "build_topk_mask got CUDA tensors but dynfocus_infer._csrc was built without its CUDA kernel "
                "(no nvcc at build time); rebuild with nvcc on PATH via `bash scripts/setup.sh`, or pass CPU tensors"
            )
        stream = torch.cuda.current_stream(device).cuda_stream
        extension.topk_mask_cuda(**arguments, stream=stream, device=device.index)
    elif device.type == "cpu":
        extension.topk_mask_cpu(**arguments)
    else:
        raise ValueError(f"build_topk_mask runs on cpu or cuda tensors, got {device}; "
                         "use build_topk_mask_reference for other devices")
    return out


def build_topk_mask_reference(
    scores: torch.Tensor,
    centre_frames: torch.Tensor,
    num_protos: torch.Tensor | Sequence[int],
    num_keep: torch.Tensor | Sequence[int],
    num_frames: torch.Tensor | Sequence[int],
    *,
    key_tokens: int = 40,
    other_tokens: int = 2,
    max_keep: int | None = None,
    max_frames: int | None = None,
    check: bool = True,
) -> TopKMask:
    """`build_topk_mask` in plain torch (stable sort, gather, scatter, cumsum): the tests' oracle.

    Same contract and validation; with check=False a NaN score ranks below every number, as in the compiled
    paths (other bad values that check=False lets through give unspecified results on every path).
    """
    batch = _prepare(scores, centre_frames, num_protos, num_keep, num_frames, key_tokens, other_tokens,
                     max_keep, max_frames, check, count_dtype=torch.int64)
    (B, L), device = batch.scores.shape, batch.scores.device
    max_keep, max_frames = batch.max_keep, batch.max_frames
    num_keep = torch.minimum(batch.num_keep, batch.num_protos)[:, None]
    num_frames = batch.num_frames[:, None]

    # Score order, ties to the lower id (stable sort); then, stably, real scores before NaN before padding.
    in_video = torch.arange(L, device=device) < batch.num_protos[:, None]
    is_nan = torch.isnan(batch.scores) & in_video
    ranked = batch.scores.masked_fill(~in_video | is_nan, float("-inf"))
    ids_by_score = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    category = (is_nan.to(torch.int64) + 2 * (~in_video).to(torch.int64)).gather(1, ids_by_score)
    ids_by_score = ids_by_score.gather(1, torch.argsort(category, dim=1, stable=True))
    is_kept = torch.arange(L, device=device) < num_keep  # over score-ranked slots
    centre_by_score = batch.centre_frames.gather(1, ids_by_score)

    # Kept ids in (centre frame, id) order; the others pushed past the end.
    order_key = torch.where(is_kept, centre_by_score * max(L, 1) + ids_by_score, torch.iinfo(torch.int64).max)
    ids_by_frame = ids_by_score.gather(1, torch.argsort(order_key, dim=1, stable=True))
    kept_ids = torch.full((B, max_keep), -1, dtype=torch.int64, device=device)
    width = min(L, max_keep)
    kept_ids[:, :width] = torch.where(is_kept[:, :width], ids_by_frame[:, :width], -1)

    is_keyframe = is_kept & (centre_by_score >= 0) & (centre_by_score < num_frames)
    target_frame = torch.where(is_keyframe, centre_by_score, max_frames)  # column max_frames is a discard slot
    frame_mask = torch.zeros(B, max_frames + 1, dtype=torch.bool, device=device)
    frame_mask.scatter_(1, target_frame, True)
    frame_mask = frame_mask[:, :max_frames].contiguous()

    in_time = torch.arange(max_frames, device=device) < num_frames
    tokens_per_frame = torch.where(frame_mask, key_tokens, other_tokens) * in_time
    token_offsets = torch.zeros(B, max_frames + 1, dtype=torch.int64, device=device)
    token_offsets[:, 1:] = torch.cumsum(tokens_per_frame, dim=1)
    return TopKMask(kept_ids, frame_mask, token_offsets, token_offsets[:, -1].clone())

"""Shared pieces of the DPC-KNN family: the result type, input checks, and small host helpers."""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

# Distances are taken between points centred on their set's mean (centre_points): distances do not change, and
# the expansion ||x_i||^2 + ||x_j||^2 - 2<x_i, x_j> then cancels far less (features share a large common part).
# Squared distances below TIE_EPS * (||x_i||^2 + ||x_j||^2) of the centred points are read as exactly 0: the
# expansion cannot resolve them in fp32 (noise measured up to 6e-7 of the norms for identical bf16 rows at
# C = 1408 and 22,528), and without the snap identical points (a static video) would get slightly different
# densities, so the tie rule would be decided by rounding, not by index.
TIE_EPS = 1e-5

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DPCResult(NamedTuple):
    """Result of `dpc_knn`: centre point ids in descending score order [B, L] (int64), each point's cluster rank
    [B, N] (int64, -1 past valid_len), prototypes [B, L, C] (x.dtype), rho and delta [B, N] (fp32)."""

    centers: torch.Tensor
    assignment: torch.Tensor
    prototypes: torch.Tensor
    rho: torch.Tensor
    delta: torch.Tensor


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under gpu_tiles() the launchers pick the tiles, warps and column splits a GPU gets (EMULATED_SMS SMs, an H100's
# count) while the interpreter runs them: its own few wide tiles would hide tiling and split bugs.
_gpu_tiles = False
EMULATED_SMS = 132


@contextlib.contextmanager
def gpu_tiles():
    """Run the kernels with the GPU's launch configuration under the interpreter (tests; slow)."""
    global _gpu_tiles
    previous, _gpu_tiles = _gpu_tiles, True
    try:
        yield
    finally:
        _gpu_tiles = previous


def interpreter_tiles() -> bool:
    """Whether the launchers pick the interpreter's wide tiles (interpreting, and not under gpu_tiles())."""
    return interpreter_active() and not _gpu_tiles


def gpu_split_sms(device: torch.device) -> Optional[int]:
    """SMs that column splits aim to fill: the device's on CUDA, EMULATED_SMS under gpu_tiles(), else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return EMULATED_SMS if _gpu_tiles else None


def lengths_of(x: torch.Tensor, valid_len: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-set number of valid points as an int64 tensor [B] on x's device, clamped to [0, N] (with check=False a
    length past N would otherwise make a kernel read the next set's rows, or past the buffer)."""
    if valid_len is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
    return valid_len.to(torch.int64).clamp(0, x.shape[1])


def valid_mask(x: torch.Tensor, valid_len: Optional[torch.Tensor]) -> torch.Tensor:
    """bool [B, N]: True for the points of each set before its valid_len (x may be [B, N] or [B, N, C])."""
    return torch.arange(x.shape[1], device=x.device)[None, :] < lengths_of(x, valid_len)[:, None]


def centred_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype centre_points returns: fp16 becomes fp32, since the difference of two finite fp16 points may pass
    fp16's range (65504); bf16 (fp32's range) and fp32 stay as they are."""
    return torch.float32 if dtype == torch.float16 else dtype


def centre_points(x: torch.Tensor, valid_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x minus the mean of each set's valid points, in centred_dtype(x.dtype).

    The mean is a batched matrix product with weights 1/n on valid points (any shift leaves distances unchanged,
    so its rounding does not matter); the kernels and the reference share this function so they see the same
    points. Points past valid_len are shifted too and stay ignored. A bf16 difference is computed in fp32 and
    rounded once: the centred points carry bf16's relative precision of the set's spread rather than of the
    points' magnitudes (what the bf16 tensor-core distance tiles read)."""
    B, N, _ = x.shape
    x = x.to(centred_dtype(x.dtype))
    n = lengths_of(x, valid_len)
    valid = valid_mask(x, valid_len)
    # Padding rows are zeroed first: they must not reach the mean even when they hold NaN or inf.
    centred = torch.where(valid[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = torch.bmm((valid.to(x.dtype) / n[:, None].to(x.dtype))[:, None, :], centred)     # [B, 1, C]
    return centred.sub_(mean)


def check_points(x: torch.Tensor, valid_len: Optional[torch.Tensor] = None, *, k: Optional[int] = None,
                 num_clusters: Optional[int] = None, check_finite: bool = True,
                 dtypes: tuple = FLOAT_DTYPES) -> None:
    """Validate a batch of point sets x [B, N, C]; raise ValueError/TypeError saying what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, N, C], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have rank 3 [B, N, C] (batch of point sets), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if x.dtype not in dtypes:
        raise TypeError(f"x has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if B == 0 or N == 0 or C == 0:
        raise ValueError(f"x holds an empty set: shape {tuple(x.shape)} (need B, N, C >= 1)")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an integer >= 1 (neighbours for the density), got {k!r}")
    if num_clusters is not None and (not isinstance(num_clusters, int) or num_clusters < 1):
        raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
    min_valid = N
    if valid_len is not None:
        if not isinstance(valid_len, torch.Tensor):
            raise TypeError(f"valid_len must be an integer tensor [B], got {type(valid_len).__name__}")
        if valid_len.device != x.device:
            raise ValueError(f"valid_len is on {valid_len.device} but x is on {x.device}: put both on one device")
        if valid_len.shape != (B,) or valid_len.dtype.is_floating_point or valid_len.dtype == torch.bool:
            raise ValueError(f"valid_len must be an integer tensor of shape [{B}], got {valid_len.dtype} "
                             f"{tuple(valid_len.shape)}")
        lens = valid_len.tolist()
        bad = [(b, n) for b, n in enumerate(lens) if not 1 <= n <= N]
        if bad:
            b, n = bad[0]
            raise ValueError(f"valid_len[{b}] = {n} is outside [1, {N}]: every set needs at least one point "
                             f"(an empty set cannot be clustered)")
        min_valid = min(lens)
    if num_clusters is not None and num_clusters > min_valid:
        raise ValueError(f"num_clusters = {num_clusters} exceeds the number of valid points ({min_valid}) of the "
                         f"smallest set: use at most {min_valid} clusters")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite values (NaN or inf): distances would be meaningless")


def pool_weights(weight: str, rho: torch.Tensor, delta: torch.Tensor, assignment: torch.Tensor,
                 num_clusters: int) -> Optional[torch.Tensor]:
    """Pooling weights by name: "uniform" (official spatial merge) or "rho_delta", w = exp(rho * delta) (Eq. 3).

    Each cluster's exponents are shifted by their maximum, exp(s_i - max_l s): the pooled ratios are unchanged and
    exp cannot overflow to inf (and inf / inf to NaN) for large deltas. Points with assignment -1 get weight 0."""
    if weight == "uniform":
        return None
    if weight != "rho_delta":
        raise ValueError(f"weight must be 'uniform' or 'rho_delta', got {weight!r}")
    score = rho * delta
    cluster = assignment.clamp_min(0)
    top = torch.full((score.shape[0], num_clusters), -float("inf"), device=score.device, dtype=score.dtype)
    top = top.scatter_reduce(1, cluster, score, reduce="amax")
    shifted = torch.exp(score - top.gather(1, cluster))
    return torch.where(assignment >= 0, shifted, torch.zeros_like(shifted))

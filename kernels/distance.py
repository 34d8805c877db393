"""The scaled-distance tile shared by every DPC-KNN kernel, squared norms, and launcher plumbing.

d(i, j)^2 = (||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j>) / C with fp32 accumulation, clamped at 0, snapped to 0 below
TIE_EPS of the norms (see common.TIE_EPS), 0 on the diagonal. Tiles are computed in registers and never written out.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import centre_points, gpu_split_sms, interpreter_active, interpreter_tiles, lengths_of


@triton.jit
def _sq_dist_tile(p_x_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n, C, inv_C,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TIE: tl.constexpr,
                  UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scaled squared distances between rows offs_m and rows offs_n of one set.

    UPCAST feeds tl.dot fp32 operands: the Triton interpreter multiplies 16-bit floats as raw bits.
    """
    b_dot = _dot_tile(p_x_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, 0, C, BLOCK_M, BLOCK_N, BLOCK_C,
                      UPCAST)
    return _sq_dist_from_dot(b_dot, sq_m, sq_n, offs_m, offs_n, inv_C, TIE)


@triton.jit
def _dot_tile(p_x_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, c_begin, c_end,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 dot products <x_m, x_n> over the channels c_begin .. c_end, BLOCK_C at a time (the
    whole C, or one channel split of kernels/gram.py)."""
    b_dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m_c = offs_c < c_end
        b_xm = tl.load(p_x_set + offs_m[:, None] * stride_n + offs_c[None, :] * stride_c,
                       mask=mask_m[:, None] & m_c[None, :], other=0.0)
        b_xn = tl.load(p_x_set + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c,
                       mask=mask_n[:, None] & m_c[None, :], other=0.0)
        if UPCAST:
            b_xm = b_xm.to(tl.float32)
            b_xn = b_xn.to(tl.float32)
        b_dot = tl.dot(b_xm, tl.trans(b_xn), b_dot, input_precision="ieee")
    return b_dot


@triton.jit
def _sq_dist_from_dot(b_dot, sq_m, sq_n, offs_m, offs_n, inv_C, TIE: tl.constexpr):
    """Scaled squared distances from the dot products <x_m, x_n> of centred points and their squared norms: the
    expansion clamped at 0, snapped to 0 below TIE of the norms, 0 where offs_m == offs_n (the same point)."""
    b_norms = sq_m[:, None] + sq_n[None, :]
    b_d2 = tl.maximum(b_norms - 2.0 * b_dot, 0.0)
    b_d2 = tl.where((b_d2 <= TIE * b_norms) | (offs_m[:, None] == offs_n[None, :]), 0.0, b_d2)
    return b_d2 * inv_C


@triton.jit
def _precedes(value_cols, cols, value_rows, rows):
    """[rows, cols]: column j comes before row i in descending value order, ties to the lower index (DESIGN
    section 4's rule for "higher density" and for the centres' order)."""
    return (value_cols[None, :] > value_rows[:, None]) | \
        ((value_cols[None, :] == value_rows[:, None]) & (cols[None, :] < rows[:, None]))


@triton.jit
def _knn_rho_of_rows(b_d2, cols, K: tl.constexpr):
    """rho of each row of b_d2 [M, N] (inf where a column is no candidate): exp(-mean of its K smallest values),
    summed in ascending order (so equal multisets give equal sums); a row with fewer finite values takes their mean."""
    b_total = tl.zeros_like(tl.min(b_d2, axis=1))
    b_count = tl.zeros_like(b_total)
    for _ in tl.static_range(K):
        b_near = tl.min(b_d2, axis=1)
        b_d2 = tl.where(cols[None, :] == tl.argmin(b_d2, axis=1)[:, None], float("inf"), b_d2)
        b_total += tl.where(b_near < float("inf"), b_near, 0.0)
        b_count += tl.where(b_near < float("inf"), 1.0, 0.0)
    return tl.exp(-tl.div_rn(b_total, tl.maximum(b_count, 1.0)))


@triton.jit
def _sqrt(x, UPCAST: tl.constexpr):
    """Correctly rounded square root, as torch's (compiled tl.sqrt is sqrt.approx); the interpreter's tl.sqrt is."""
    if UPCAST:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _tile(p_x_set, p_d_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n, N, C, inv_C,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TIE: tl.constexpr,
          UPCAST: tl.constexpr, FROM_D: tl.constexpr):
    """The tile of _sq_dist_tile, or (FROM_D) read from a distance matrix D [N, N] of the set that the same function
    wrote (kernels/gram.py): v2's passes read distances instead of recomputing them."""
    if FROM_D:
        return tl.load(p_d_set + offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    else:
        return _sq_dist_tile(p_x_set, stride_n, stride_c, offs_m, offs_n, mask_m, mask_n, sq_m, sq_n, C, inv_C,
                             BLOCK_M, BLOCK_N, BLOCK_C, TIE, UPCAST)


@triton.jit
def _sq_norm_kernel(p_x, p_sq, N, C, stride_b, stride_n, stride_c,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    b_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        b_x = tl.load(p_x + pid_b * stride_b + offs_m[:, None] * stride_n + offs_c[None, :] * stride_c,
                      mask=mask_m[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
        b_acc += tl.sum(b_x * b_x, axis=1)
    tl.store(p_sq + pid_b * N + offs_m, b_acc, mask=mask_m)


def same_device(*tensors: Optional[torch.Tensor]) -> torch.device:
    """The one device of `tensors` (None entries ignored); a clear error when they are spread over several."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different devices ({', '.join(sorted(map(str, devices)))}): "
                         "put them on one device")
    return devices.pop()


def require_kernel_device(*tensors: Optional[torch.Tensor]) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    device = same_device(*tensors)
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {device}; on a CPU-only machine set "
                           "TRITON_INTERPRET=1 before importing triton, or use dynfocus_kernels.reference")


def launch_config(N: int, C: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options of the streaming kernels (tl.dot needs >= 16 per side).

    GPU: 64 x 64 distance tiles over 64 channels for bf16 points (tensor cores), 32 channels and no pipelining
    for fp32 points (exact fp32 dots run on FMA units and need the registers; fp16 inputs are centred into fp32,
    see common.centred_dtype, and take this path too); 8 warps. That choice is not measured yet: compiled with
    the JIT's runtime specialisation (bench/kernel_resources.py), neither 4 nor 8 warps spill on sm_90 (bf16
    knn_density: 175 registers at 4 warps, 113 at 8); an earlier "4 warps spill" reading came from a compile
    without that specialisation. Interpreter: few wide tiles, because it pays per operation (common.gpu_tiles()
    makes it run the GPU's tiles, for tests).
    """
    interpreted = interpreter_active()
    if interpreter_tiles():
        block_n, block_c = min(256, triton.next_power_of_2(N)), 1024
    else:
        block_n = 64 if N > 32 else triton.next_power_of_2(N)
        block_c = 32 if dtype == torch.float32 else 64
    block_n = max(16, block_n)
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    return dict(BLOCK_M=block_n, BLOCK_N=block_n, BLOCK_C=block_c, UPCAST=interpreted, num_warps=8,
                num_stages=1 if dtype == torch.float32 else 3)


def column_splits(x: torch.Tensor, blocks: dict, splits: Optional[int] = None) -> tuple[int, int]:
    """(number of column splits, columns per split) for the streaming kernels' third grid axis.

    Default: 1 in the interpreter (fewer, larger programs run faster there); on a GPU, at least enough splits that
    B x row blocks x splits reaches twice the SM count, and up to twice that many where more fill the last wave
    better (the fewest splits with the least idle SM share in the last wave), never more than the column tiles.
    """
    B, N, _ = x.shape
    col_tiles = triton.cdiv(N, blocks["BLOCK_N"])
    row_blocks = triton.cdiv(N, blocks["BLOCK_M"])

    def effective(requested: int) -> tuple[int, int]:
        requested = max(1, min(int(requested), col_tiles))
        cols_per_split = triton.cdiv(col_tiles, requested) * blocks["BLOCK_N"]
        return triton.cdiv(N, cols_per_split), cols_per_split

    if splits is not None:
        return effective(splits)
    sms = gpu_split_sms(x.device)
    if sms is None:
        return effective(1)
    least = triton.cdiv(2 * sms, B * row_blocks)

    def idle_share(candidate: tuple[int, int]) -> float:
        programs = B * row_blocks * candidate[0]
        return 1 - programs / (triton.cdiv(programs, sms) * sms)

    candidates = [effective(s) for s in range(least, 2 * least + 1)]
    return min(candidates, key=lambda c: (round(idle_share(c), 3), c[0]))


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 in fp32, [B, N] (the custom op dynfocus::sq_norms)."""
    from .library import sq_norms_op

    return sq_norms_op(x)


def launch_sq_norms(x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    sq = torch.empty(B, N, dtype=torch.float32, device=x.device)
    cfg = launch_config(N, C, x.dtype)
    grid = (B, triton.cdiv(N, cfg["BLOCK_M"]))
    _sq_norm_kernel[grid](x, sq, N, C, *x.stride(), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                          num_warps=cfg["num_warps"])
    return sq


class PreparedPoints(NamedTuple):
    """What the distance kernels read: the set-centred points (common.centre_points) and their squared norms."""

    points: torch.Tensor
    sq: torch.Tensor

    def select(self, index: torch.Tensor) -> "PreparedPoints":
        """The prepared points of the sets `index` (a subset of the batch, each set centred as before)."""
        return PreparedPoints(self.points.index_select(0, index), self.sq.index_select(0, index))


def prepare_points(x: torch.Tensor, valid_len: Optional[torch.Tensor] = None) -> PreparedPoints:
    """Centre each set once for all the distance kernels that follow (one pass over x, one copy of it)."""
    centred = centre_points(x, valid_len)
    return PreparedPoints(centred, sq_norms(centred))


def lengths_i32(x: torch.Tensor, valid_len: Optional[torch.Tensor]) -> torch.Tensor:
    return lengths_of(x, valid_len).to(torch.int32).contiguous()

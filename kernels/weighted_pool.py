"""Weighted prototype pooling (paper Eq. 3), forward and backward as kernels, wrapped in an autograd Function.

prototype_l = sum_i w_i x_i / W_l with W_l = sum_i w_i over points assigned to l. Backward:
dL/dx_i = w_i / W_l * g_l and dL/dw_i = <g_l, x_i - prototype_l> / W_l, for l = assignment_i.
The forward reads x once: each program owns a channel block and accumulates onehot(assignment) * w @ x with tl.dot;
no atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .assign import centre_block
from .distance import require_kernel_device, same_device
from .common import interpreter_tiles


@triton.jit
def _weighted_pool_fwd_kernel(p_x, p_assign, p_w, p_proto, p_wsum, N, C, L, stride_b, stride_n, stride_c,
                              HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    l0 = tl.program_id(2) * BLOCK_L  # this program's block of clusters
    ranks = l0 + tl.arange(0, BLOCK_L)
    b_acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=ACC)
    b_wsum = tl.zeros([BLOCK_L], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_a = tl.load(p_assign + pid_b * N + offs_n, mask=mask_n, other=-1)
        if HAS_WEIGHT:
            b_w = tl.load(p_w + pid_b * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        else:
            b_w = tl.full([BLOCK_N], 1.0, ACC)
        b_w = tl.where(b_a >= 0, b_w, 0.0)
        b_onehot = tl.where(ranks[:, None] == b_a[None, :], b_w[None, :], 0.0).to(ACC)
        # Only this block's points are read: ignored ones (-1) hold padding, where a weight of 0 would not stop
        # a NaN or inf (0 * inf = NaN).
        m_mine = mask_n & (b_a >= l0) & (b_a < l0 + BLOCK_L)
        b_x = tl.load(p_x + pid_b * stride_b + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c,
                      mask=m_mine[:, None] & mask_c[None, :], other=0.0).to(ACC)
        b_acc = tl.dot(b_onehot, b_x, b_acc, input_precision="ieee", out_dtype=ACC)  # fp64 in gradcheck
        b_wsum += tl.sum(b_onehot, axis=1)
    b_proto = tl.where(b_wsum[:, None] > 0, b_acc / tl.where(b_wsum > 0, b_wsum, 1.0)[:, None], 0.0)
    mask_l = ranks < L
    tl.store(p_proto + pid_b * L * C + ranks[:, None] * C + offs_c[None, :], b_proto,
             mask=mask_l[:, None] & mask_c[None, :])
    if pid_c == 0:
        tl.store(p_wsum + pid_b * L + ranks, b_wsum, mask=mask_l)


@triton.jit
def _weighted_pool_bwd_kernel(p_x, p_assign, p_w, p_proto, p_wsum, p_grad, p_grad_x, p_grad_w, N, C, L,
                              stride_b, stride_n, stride_c, HAS_WEIGHT: tl.constexpr, NEED_GRAD_W: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # set offsets pass 2**31 elements in large batches
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_a = tl.load(p_assign + pid_b * N + offs_n, mask=mask_n, other=-1)
    m_point = mask_n & (b_a >= 0) & (b_a < L)  # ids >= L (possible with check=False) are never read
    rows = tl.where(m_point, b_a, 0)
    if HAS_WEIGHT:
        b_w = tl.load(p_w + pid_b * N + offs_n, mask=m_point, other=0.0).to(ACC)
    else:
        b_w = tl.full([BLOCK_N], 1.0, ACC)
    b_total = tl.load(p_wsum + pid_b * L + rows, mask=m_point, other=0.0)
    m_point = m_point & (b_total > 0)
    b_scale = tl.where(m_point, b_w / tl.where(m_point, b_total, 1.0), 0.0)
    b_gw = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m_2d = m_point[:, None] & (offs_c[None, :] < C)
        b_g = tl.load(p_grad + pid_b * L * C + rows[:, None] * C + offs_c[None, :], mask=m_2d, other=0.0).to(ACC)
        tl.store(p_grad_x + pid_b * N * C + offs_n[:, None] * C + offs_c[None, :], b_scale[:, None] * b_g,
                 mask=mask_n[:, None] & (offs_c[None, :] < C))
        if NEED_GRAD_W:
            b_x = tl.load(p_x + pid_b * stride_b + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c,
                          mask=m_2d, other=0.0).to(ACC)
            b_p = tl.load(p_proto + pid_b * L * C + rows[:, None] * C + offs_c[None, :], mask=m_2d, other=0.0)
            b_gw += tl.sum(b_g * (b_x - b_p), axis=1)
    if NEED_GRAD_W:
        b_gw = tl.where(m_point, b_gw / tl.where(m_point, b_total, 1.0), 0.0)
        tl.store(p_grad_w + pid_b * N + offs_n, b_gw, mask=mask_n)


# GPU launch options of both pooling kernels (bench/kernel_resources.py reports their registers and spills).
POOL_LAUNCH = dict(num_warps=8, num_stages=2)


def _acc_dtype(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _blocks(C: int) -> tuple:
    wide = interpreter_tiles()
    return 128 if wide else 32, min(256 if wide else 64, max(16, triton.next_power_of_2(C)))


def weighted_pool_forward(x, assignment, weight, num_clusters):
    B, N, C = x.shape
    acc_tl, acc_torch = _acc_dtype(x)
    proto = torch.empty(B, num_clusters, C, dtype=acc_torch, device=x.device)
    wsum = torch.empty(B, num_clusters, dtype=acc_torch, device=x.device)
    block_n, block_c = _blocks(C)
    block_l = centre_block(num_clusters)
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(num_clusters, block_l))
    _weighted_pool_fwd_kernel[grid](x, assignment, weight if weight is not None else x, proto, wsum, N, C,
                                    num_clusters, *x.stride(), HAS_WEIGHT=weight is not None, ACC=acc_tl,
                                    BLOCK_L=block_l, BLOCK_N=max(16, block_n), BLOCK_C=block_c, **POOL_LAUNCH)
    return proto, wsum


class WeightedPoolFunction(torch.autograd.Function):
    """Differentiable in x and in the weights; assignment is an integer input without gradient."""

    @staticmethod
    def forward(ctx, x, assignment, weight, num_clusters):
        proto, wsum = weighted_pool_forward(x, assignment, weight, num_clusters)
        need_grad_w = weight is not None and ctx.needs_input_grad[2]
        # The prototypes are saved only for dL/dw; the output is then a copy, so that editing it in place
        # cannot change what backward reads.
        ctx.save_for_backward(x, assignment, weight, proto if need_grad_w else None, wsum)
        ctx.num_clusters = num_clusters
        return proto.to(x.dtype, copy=need_grad_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_proto):
        x, assignment, weight, proto, wsum = ctx.saved_tensors
        need_grad_w = weight is not None and ctx.needs_input_grad[2]
        grad_x, grad_w = weighted_pool_backward(grad_proto, x, assignment, weight, proto, wsum, need_grad_w)
        return grad_x.to(x.dtype), None, grad_w.to(weight.dtype) if need_grad_w else None, None


def weighted_pool_backward(grad_proto, x, assignment, weight, proto, wsum, need_grad_w: bool):
    """(grad_x [B, N, C], grad_w [B, N] or None) in the accumulation dtype, from the forward's prototypes (read
    only for grad_w) and weight sums."""
    B, N, C = x.shape
    L = wsum.shape[1]
    acc_tl, acc_torch = _acc_dtype(x)
    grad_x = torch.empty(B, N, C, dtype=acc_torch, device=x.device)
    grad_w = torch.empty(B, N, dtype=acc_torch, device=x.device) if need_grad_w else None
    block_n, block_c = _blocks(C)
    grid = (B, triton.cdiv(N, block_n))
    _weighted_pool_bwd_kernel[grid](x, assignment, weight if weight is not None else x,
                                    proto if need_grad_w else wsum, wsum,
                                    grad_proto.to(acc_torch).contiguous(), grad_x,
                                    grad_w if need_grad_w else wsum, N, C, L, *x.stride(),
                                    HAS_WEIGHT=weight is not None, NEED_GRAD_W=need_grad_w, ACC=acc_tl,
                                    BLOCK_N=block_n, BLOCK_C=block_c, **POOL_LAUNCH)
    return grad_x, grad_w


def weighted_pool(x: torch.Tensor, assignment: torch.Tensor, weight: Optional[torch.Tensor],
                  num_clusters: int, *, check: bool = True) -> torch.Tensor:
    """Prototypes [B, L, C] (x.dtype, fp32 math; fp64 stays fp64 for gradcheck). assignment: [B, N] cluster ranks,
    -1 to ignore a point; weight: [B, N] >= 0 or None for uniform. An empty cluster gives a zero prototype."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if assignment.shape != x.shape[:2] or assignment.dtype.is_floating_point:
        raise ValueError(f"assignment must be an integer tensor of shape {tuple(x.shape[:2])}, "
                         f"got {assignment.dtype} {tuple(assignment.shape)}")
    if not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
    if weight is not None and (weight.shape != x.shape[:2] or not weight.dtype.is_floating_point):
        raise ValueError(f"weight must be a float tensor of shape {tuple(x.shape[:2])}, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    same_device(x, assignment, weight)
    if check and bool((assignment >= num_clusters).any()):
        raise ValueError(f"assignment holds cluster ids >= num_clusters = {num_clusters}")
    require_kernel_device(x, assignment, weight)
    assignment = assignment.to(torch.int32).contiguous()
    weight = weight.contiguous() if weight is not None else None
    from .library import weighted_pool_op   # the custom op (torch.library): compiled callers see one node

    proto, _ = weighted_pool_op(x, assignment, weight, num_clusters)
    # A copy when weights are given: backward reads the saved prototypes for dL/dw, and a caller editing the
    # returned tensor in place must not change them.
    return proto.to(x.dtype, copy=weight is not None)

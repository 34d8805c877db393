"""The spatial merger's whole two-layer clustering in one launch (issue 12 item 2; DESIGN.md sections 4 and 5).

Per frame (a set of N patch tokens, C channels): DPC-KNN into c1 centres (k1 neighbours, uniform weights) -> Z1;
DPC-KNN of Z1 into c2 centres (k2) -> Z2; modulation a = softmax(W mean_C(Z2) + b); G = for each second-layer
cluster v in centre order, Z2[v] then the Z1 tokens assigned to v in index order, scaled by a[v] (the official
`Merger`, what models/spatial_merger.py composes from the separate ops).

One persistent program per group of frames runs, for each of its frames:
1. the set's mean (x read once; a non-finite value flags the frame in `bad`);
2. the centred Gram X_c X_c^T once, upper-triangle tiles, fp32 accumulation (tensor cores for bf16), into a
   per-program scratch [N_pad, N_pad] (256 KB at N = 256: L2-resident), not recomputed by the passes that follow;
3. density, delta, centre ranks and the assignment as passes over Gram rows (distances from the Gram and its
   diagonal, DESIGN section 4's expansion, snap and tie rules, exactly as the other kernels: `_sq_dist_from_dot`);
4. the first-layer prototypes as one-hot x one matmul per channel block (x read a third time);
5. layer 2 on the c1 prototypes entirely in registers (c1 <= 64 points), its prototypes, the modulation, and G
   written in its final order.
So x is read three times (mean, Gram, pooling) and nothing of size N x N leaves the chip's L2; the frames of a
batch take one launch, where the composed path takes 12 launches and ~150 tensor ops.

Phases of one frame communicate through global scratch within the program, separated by `tl.debug_barrier()`
(bar.sync: the block's global writes are visible to the block after it). Inference only: the training path takes
this kernel's assignments and pools with the differentiable `weighted_pool` (models/spatial_merger.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import TIE_EPS, centred_dtype, gpu_split_sms, interpreter_active, interpreter_tiles
from .distance import _knn_rho_of_rows, _precedes, _sq_dist_from_dot, _sqrt, require_kernel_device

MAX_FIRST_CENTRES = 64  # layer 2 holds its c1 x c1 distances in registers


class SpatialMergeResult(NamedTuple):
    """Both layers of one frame batch [T, ...]: G and a (what the connector reads), and the layers' clusterings."""

    grouped: torch.Tensor             # G [T, c1 + c2, C] in x.dtype
    modulation: torch.Tensor          # a [T, c2] in the score weight's dtype
    first: torch.Tensor               # Z1 [T, c1, C] in x.dtype
    first_centers: torch.Tensor       # int64 [T, c1]: patch ids in descending score order
    first_assignment: torch.Tensor    # int64 [T, N]: each patch's layer-1 cluster rank
    second: torch.Tensor              # Z2 [T, c2, C] in x.dtype
    second_centers: torch.Tensor      # int64 [T, c2]: Z1 ids in descending score order
    second_assignment: torch.Tensor   # int64 [T, c1]: each Z1 token's layer-2 cluster rank
    rho: torch.Tensor                 # fp32 [T, N]: layer-1 densities
    delta: torch.Tensor               # fp32 [T, N]: layer-1 deltas
    bad: torch.Tensor                 # int32 [T]: 1 where the frame holds NaN or inf (its outputs are meaningless)


@triton.jit
def _round(b, DT: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 b rounded to DT (nearest even). Compiled: b.to(DT). Interpreter (UPCAST): the value, rounded, kept in
    fp32, because the interpreter casts fp32 to bf16 by truncation; a store to a DT buffer is then exact."""
    if UPCAST:
        if DT == tl.bfloat16:
            bits = b.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return b.to(DT).to(tl.float32)
    else:
        return b.to(DT)


@triton.jit
def _gram_row_distances(p_gram, rows, m_rows, cols, m_cols, sq_cols, N_PAD: tl.constexpr, inv_C, TIE: tl.constexpr):
    """Scaled squared distances [rows, cols] from the frame's Gram scratch (row stride N_PAD, norms on its diagonal)."""
    sq_rows = tl.load(p_gram + rows * (N_PAD + 1), mask=m_rows, other=0.0)
    b_g = tl.load(p_gram + rows[:, None] * N_PAD + cols[None, :], mask=m_rows[:, None] & m_cols[None, :], other=0.0)
    return _sq_dist_from_dot(b_g, sq_rows, sq_cols, rows, cols, inv_C, TIE)


@triton.jit
def _column_of(b_vec, eye):
    """A vector laid along rows ([M]) re-laid along columns, through the identity mask eye [M, M]."""
    return tl.sum(tl.where(eye, b_vec[:, None], 0), axis=0)


@triton.jit
def _spatial_merge_kernel(
        p_x, p_w, p_bias, p_gram, p_mean, p_bad, p_rho, p_delta, p_centers1, p_assign1, p_first,
        p_centers2, p_assign2, p_second, p_mod, p_out,
        T, N, C, stride_t, stride_n, stride_c, inv_C, mean_w1, mean_w2,
        C1: tl.constexpr, C2: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, N_PAD: tl.constexpr,
        C1_PAD: tl.constexpr, C2_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TIE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    CDT = p_mean.dtype.element_ty    # centred points: bf16 stays bf16, fp16 becomes fp32 (common.centred_dtype)
    ODT = p_first.dtype.element_ty   # x's dtype: prototypes and G
    WDT = p_mod.dtype.element_ty     # the score Linear's dtype
    p_gram_mine = p_gram + pid.to(tl.int64) * N_PAD * N_PAD
    p_mean_mine = p_mean + pid.to(tl.int64) * C
    cols = tl.arange(0, N_PAD)
    m_cols = cols < N
    ranks1 = tl.arange(0, C1_PAD)
    m_ranks1 = ranks1 < C1
    ranks2 = tl.arange(0, C2_PAD)
    m_ranks2 = ranks2 < C2
    chans = tl.arange(0, BLOCK_C)
    chans_p = tl.arange(0, BLOCK_P)  # the passes over all N points of a frame take narrower channel blocks
    eye1 = ranks1[:, None] == ranks1[None, :]
    eye2 = ranks2[:, None] == ranks2[None, :]
    for t in range(pid, T, tl.num_programs(0)):
        tl.debug_barrier()  # the previous frame's reads of the scratch are done
        t64 = pid.to(tl.int64) * 0 + t  # an int64 tensor in compiled code and in the interpreter (t: int)
        p_xt = p_x + t64 * stride_t
        # 1. The mean of the set (weights 1/N in the centred dtype, as common.centre_points), non-finite flag.
        b_bad = tl.zeros([N_PAD], tl.int32)
        for c0 in range(0, C, BLOCK_P):
            offs_c = c0 + chans_p
            m_c = offs_c < C
            b_x = tl.load(p_xt + cols[:, None] * stride_n + offs_c[None, :] * stride_c,
                          mask=m_cols[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            finite = (b_x == b_x) & (tl.abs(b_x) < float("inf"))
            b_bad = tl.maximum(b_bad, tl.max(tl.where(finite, 0, 1), axis=1))
            b_x = tl.where(finite, b_x, 0.0)
            tl.store(p_mean_mine + offs_c, _round(tl.sum(b_x * mean_w1, axis=0), CDT, UPCAST), mask=m_c)
        tl.store(p_bad + t, tl.max(b_bad, axis=0))
        tl.debug_barrier()
        # 2. The centred Gram, upper-triangle tiles mirrored into the scratch.
        num_tiles = tl.cdiv(N, BLOCK_G)
        for ti in range(0, num_tiles):
            offs_m = ti * BLOCK_G + tl.arange(0, BLOCK_G)
            m_m = offs_m < N
            for tj in range(ti, num_tiles):
                offs_n = tj * BLOCK_G + tl.arange(0, BLOCK_G)
                m_n = offs_n < N
                b_dot = tl.zeros([BLOCK_G, BLOCK_G], tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + chans
                    m_c = offs_c < C
                    b_mean = tl.load(p_mean_mine + offs_c, mask=m_c, other=0.0).to(tl.float32)
                    b_xm = tl.load(p_xt + offs_m[:, None] * stride_n + offs_c[None, :] * stride_c,
                                   mask=m_m[:, None] & m_c[None, :], other=0.0).to(tl.float32)
                    b_xn = tl.load(p_xt + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c,
                                   mask=m_n[:, None] & m_c[None, :], other=0.0).to(tl.float32)
                    # Centred and rounded to the centred dtype (the interpreter keeps it in fp32: it would multiply
                    # 16-bit floats as raw bits).
                    b_xm = _round(tl.where(m_m[:, None] & m_c[None, :], b_xm - b_mean[None, :], 0.0), CDT, UPCAST)
                    b_xn = _round(tl.where(m_n[:, None] & m_c[None, :], b_xn - b_mean[None, :], 0.0), CDT, UPCAST)
                    b_dot = tl.dot(b_xm, tl.trans(b_xn), b_dot, input_precision="ieee")
                m_tile = m_m[:, None] & m_n[None, :]
                tl.store(p_gram_mine + offs_m[:, None] * N_PAD + offs_n[None, :], b_dot, mask=m_tile)
                # Mirrored only off the diagonal: a diagonal tile holds both halves already (one writer each).
                tl.store(p_gram_mine + offs_n[None, :] * N_PAD + offs_m[:, None], b_dot, mask=m_tile & (tj != ti))
        tl.debug_barrier()
        sq_cols = tl.load(p_gram_mine + cols * (N_PAD + 1), mask=m_cols, other=0.0)
        # 3a. Density: the K1 smallest distances of each row, summed in ascending order; the set's farthest pair.
        b_far = tl.zeros([BLOCK_R], tl.float32)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m_rows = rows < N
            b_d2 = _gram_row_distances(p_gram_mine, rows, m_rows, cols, m_cols, sq_cols, N_PAD, inv_C, TIE)
            b_d2 = tl.where(m_cols[None, :], b_d2, float("inf"))
            b_far = tl.maximum(b_far, tl.max(tl.where(m_rows[:, None] & m_cols[None, :], b_d2, 0.0), axis=1))
            tl.store(p_rho + t64 * N + rows, _knn_rho_of_rows(b_d2, cols, K1), mask=m_rows)
        far = tl.max(b_far, axis=0)
        tl.debug_barrier()
        # 3b. Delta: the distance to the nearest denser point (ties: lower index); the densest gets the farthest.
        rho_cols = tl.load(p_rho + t64 * N + cols, mask=m_cols, other=0.0)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m_rows = rows < N
            rho_rows = tl.load(p_rho + t64 * N + rows, mask=m_rows, other=0.0)
            b_d2 = _gram_row_distances(p_gram_mine, rows, m_rows, cols, m_cols, sq_cols, N_PAD, inv_C, TIE)
            higher = _precedes(rho_cols, cols, rho_rows, rows)
            b_near = tl.min(tl.where(higher & m_cols[None, :], b_d2, float("inf")), axis=1)
            delta = _sqrt(tl.where(b_near == float("inf"), far, b_near), UPCAST)
            tl.store(p_delta + t64 * N + rows, delta, mask=m_rows)
        tl.debug_barrier()
        # 3c. Centres: a point's rank is the number of points of larger rho * delta (ties: lower index).
        # NaN scores (a non-finite frame) rank as -inf: the ranks stay a permutation and every centre slot is written.
        score_cols = rho_cols * tl.load(p_delta + t64 * N + cols, mask=m_cols, other=0.0)
        score_cols = tl.where(m_cols & (score_cols == score_cols), score_cols, -float("inf"))
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m_rows = rows < N
            score_rows = tl.load(p_rho + t64 * N + rows, mask=m_rows, other=0.0) * \
                tl.load(p_delta + t64 * N + rows, mask=m_rows, other=0.0)
            score_rows = tl.where(score_rows == score_rows, score_rows, -float("inf"))
            rank = tl.sum(tl.where(_precedes(score_cols, cols, score_rows, rows) & m_cols[None, :], 1, 0), axis=1)
            tl.store(p_centers1 + t64 * C1 + rank, rows.to(tl.int64), mask=m_rows & (rank < C1))
        tl.debug_barrier()
        # 3d. Assignment: the lowest centre rank within the tie slack of the nearest; a centre to itself.
        # Clamped: a NaN frame's ranks may collide and leave slots unwritten; its loads must stay in bounds.
        centres = tl.load(p_centers1 + t64 * C1 + ranks1, mask=m_ranks1, other=0)
        centres = tl.minimum(tl.maximum(centres, 0), N - 1).to(tl.int32)
        sq_centres = tl.load(p_gram_mine + centres * (N_PAD + 1), mask=m_ranks1, other=0.0)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m_rows = rows < N
            sq_rows = tl.load(p_gram_mine + rows * (N_PAD + 1), mask=m_rows, other=0.0)
            b_g = tl.load(p_gram_mine + rows[:, None] * N_PAD + centres[None, :],
                          mask=m_rows[:, None] & m_ranks1[None, :], other=0.0)
            b_d2 = _sq_dist_from_dot(b_g, sq_rows, sq_centres, rows, centres, inv_C, TIE)
            b_d2 = tl.where(m_ranks1[None, :], b_d2, float("inf"))
            b_slack = (sq_rows[:, None] + sq_centres[None, :]) * (TIE * inv_C)
            b_best = tl.min(b_d2, axis=1)
            # Clamped: with a NaN slack no centre is within it (a non-finite frame); C1 would index past Z1.
            tied = b_d2 <= b_best[:, None] + b_slack
            nearest = tl.minimum(tl.min(tl.where(tied, ranks1[None, :], C1), axis=1), C1 - 1)
            own = tl.max(tl.where((rows[:, None] == centres[None, :]) & m_ranks1[None, :], ranks1[None, :], -1),
                         axis=1)
            tl.store(p_assign1 + t64 * N + rows, tl.where(own >= 0, own, nearest).to(tl.int64), mask=m_rows)
        tl.debug_barrier()
        # 4. Z1: the mean of each cluster's patches, one-hot x points per channel block.
        a1_cols = tl.load(p_assign1 + t64 * N + cols, mask=m_cols, other=-1).to(tl.int32)
        onehot1 = tl.where(ranks1[:, None] == a1_cols[None, :], 1.0, 0.0)
        count1 = tl.maximum(tl.sum(onehot1, axis=1), 1.0)
        if not UPCAST:
            onehot1 = onehot1.to(p_x.dtype.element_ty)  # 0 and 1 are exact in every dtype: tensor cores
        p_first_t = p_first + t64 * C1 * C
        for c0 in range(0, C, BLOCK_P):
            offs_c = c0 + chans_p
            m_c = offs_c < C
            b_x = tl.load(p_xt + cols[:, None] * stride_n + offs_c[None, :] * stride_c,
                          mask=m_cols[:, None] & m_c[None, :], other=0.0)
            if UPCAST:
                b_x = b_x.to(tl.float32)
            b_z1 = tl.div_rn(tl.dot(onehot1, b_x, input_precision="ieee"), count1[:, None])
            tl.store(p_first_t + ranks1[:, None] * C + offs_c[None, :], _round(b_z1, ODT, UPCAST),
                     mask=m_ranks1[:, None] & m_c[None, :])
        tl.debug_barrier()
        # 5. Layer 2 on the C1 prototypes, in registers: mean, Gram, distances.
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + chans
            m_c = offs_c < C
            b_z = tl.load(p_first_t + ranks1[:, None] * C + offs_c[None, :],
                          mask=m_ranks1[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            tl.store(p_mean_mine + offs_c, _round(tl.sum(b_z * mean_w2, axis=0), CDT, UPCAST), mask=m_c)
        tl.debug_barrier()
        b_dot2 = tl.zeros([C1_PAD, C1_PAD], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + chans
            m_c = offs_c < C
            b_mean = tl.load(p_mean_mine + offs_c, mask=m_c, other=0.0).to(tl.float32)
            b_z = tl.load(p_first_t + ranks1[:, None] * C + offs_c[None, :],
                          mask=m_ranks1[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_z = _round(tl.where(m_ranks1[:, None] & m_c[None, :], b_z - b_mean[None, :], 0.0), CDT, UPCAST)
            b_dot2 = tl.dot(b_z, tl.trans(b_z), b_dot2, input_precision="ieee")
        sq2_rows = tl.sum(tl.where(eye1, b_dot2, 0.0), axis=1)
        sq2_cols = tl.sum(tl.where(eye1, b_dot2, 0.0), axis=0)
        valid2 = m_ranks1[:, None] & m_ranks1[None, :]
        b_d2 = _sq_dist_from_dot(b_dot2, sq2_rows, sq2_cols, ranks1, ranks1, inv_C, TIE)
        far2 = tl.max(tl.max(tl.where(valid2, b_d2, 0.0), axis=1), axis=0)
        rho2 = _knn_rho_of_rows(tl.where(m_ranks1[None, :], b_d2, float("inf")), ranks1, K2)
        rho2_cols = _column_of(rho2, eye1)
        higher = _precedes(rho2_cols, ranks1, rho2, ranks1)
        b_near = tl.min(tl.where(higher & m_ranks1[None, :], b_d2, float("inf")), axis=1)
        score2 = rho2 * _sqrt(tl.where(b_near == float("inf"), far2, b_near), UPCAST)
        score2 = tl.where(score2 == score2, score2, -float("inf"))  # NaN would make every rank 0
        score2_cols = tl.where(m_ranks1, _column_of(score2, eye1), -float("inf"))
        rank2 = tl.sum(tl.where(_precedes(score2_cols, ranks1, score2, ranks1) & m_ranks1[None, :], 1, 0), axis=1)
        tl.store(p_centers2 + t64 * C2 + rank2, ranks1.to(tl.int64), mask=m_ranks1 & (rank2 < C2))
        # Each Z1 token to the centre column of smallest distance (lowest rank within the slack); centres to self.
        rank2_cols = _column_of(rank2, eye1)
        is_centre_cols = m_ranks1 & (rank2_cols < C2)
        to_centre = tl.where(is_centre_cols[None, :], b_d2, float("inf"))
        b_slack = (sq2_rows[:, None] + sq2_cols[None, :]) * (TIE * inv_C)
        b_best = tl.min(to_centre, axis=1)
        tied = is_centre_cols[None, :] & (to_centre <= b_best[:, None] + b_slack)
        nearest2 = tl.minimum(tl.min(tl.where(tied, rank2_cols[None, :], C2), axis=1), C2 - 1)
        a2 = tl.where(rank2 < C2, rank2, nearest2)
        a2 = tl.where(m_ranks1, a2, -1)
        tl.store(p_assign2 + t64 * C1 + ranks1, a2.to(tl.int64), mask=m_ranks1)
        # Z2 (the mean of each layer-2 cluster of Z1 tokens) and its channel means for the modulation.
        a2_cols = _column_of(a2, eye1)
        onehot2 = tl.where(ranks2[:, None] == a2_cols[None, :], 1.0, 0.0)                # [C2_PAD, C1_PAD]
        count2 = tl.maximum(tl.sum(onehot2, axis=1), 1.0)
        if not UPCAST:
            onehot2 = onehot2.to(ODT)
        p_second_t = p_second + t64 * C2 * C
        b_channel_sum = tl.zeros([C2_PAD], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + chans
            m_c = offs_c < C
            b_z = tl.load(p_first_t + ranks1[:, None] * C + offs_c[None, :],
                          mask=m_ranks1[:, None] & m_c[None, :], other=0.0)
            if UPCAST:
                b_z = b_z.to(tl.float32)
            b_z2 = _round(tl.div_rn(tl.dot(onehot2, b_z, input_precision="ieee"), count2[:, None]), ODT, UPCAST)
            tl.store(p_second_t + ranks2[:, None] * C + offs_c[None, :], b_z2, mask=m_ranks2[:, None] & m_c[None, :])
            b_channel_sum += tl.sum(tl.where(m_c[None, :], b_z2.to(tl.float32), 0.0), axis=1)
        # a = softmax(W mean_C(Z2) + b), rounded where the composed path rounds (x's dtype, then W's).
        channel_mean = _round(_round(tl.div_rn(b_channel_sum, C + 0.0), ODT, UPCAST).to(tl.float32), WDT, UPCAST)
        channel_mean = channel_mean.to(tl.float32)
        b_w = tl.load(p_w + ranks2[:, None] * C2 + ranks2[None, :], mask=m_ranks2[:, None] & m_ranks2[None, :],
                      other=0.0).to(tl.float32)
        logits = tl.sum(b_w * _column_of(channel_mean, eye2)[None, :], axis=1)
        logits = _round(logits + tl.load(p_bias + ranks2, mask=m_ranks2, other=0.0).to(tl.float32), WDT, UPCAST)
        logits = tl.where(m_ranks2, logits.to(tl.float32), -float("inf"))
        b_exp = tl.exp(logits - tl.max(logits, axis=0))
        modulation = _round(tl.div_rn(b_exp, tl.sum(b_exp, axis=0)), WDT, UPCAST)
        tl.store(p_mod + t64 * C2 + ranks2, modulation, mask=m_ranks2)
        scale2 = _round(modulation.to(tl.float32), ODT, UPCAST).to(tl.float32)
        # G's order: cluster v at v + (Z1 tokens of clusters before v); Z1 token j after its cluster's Z2 and the
        # tokens of its cluster with lower index.
        earlier = (a2_cols[None, :] < a2[:, None]) | \
            ((a2_cols[None, :] == a2[:, None]) & (ranks1[None, :] < ranks1[:, None]))
        pos1 = a2 + 1 + tl.sum(tl.where(earlier & m_ranks1[None, :], 1, 0), axis=1)
        m_pos1 = m_ranks1 & (a2 >= 0) & (a2 < C2) & (pos1 < C1 + C2)  # always, unless the frame is not finite
        pos2 = ranks2 + tl.sum(tl.where((a2_cols[None, :] < ranks2[:, None]) & m_ranks1[None, :], 1, 0), axis=1)
        scale1 = tl.sum(tl.where(a2[:, None] == ranks2[None, :], _column_of(scale2, eye2)[None, :], 0.0), axis=1)
        tl.debug_barrier()
        p_out_t = p_out + t64 * (C1 + C2) * C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + chans
            m_c = offs_c < C
            b_z1 = tl.load(p_first_t + ranks1[:, None] * C + offs_c[None, :],
                           mask=m_ranks1[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            tl.store(p_out_t + pos1[:, None] * C + offs_c[None, :], _round(b_z1 * scale1[:, None], ODT, UPCAST),
                     mask=m_pos1[:, None] & m_c[None, :])
            b_z2 = tl.load(p_second_t + ranks2[:, None] * C + offs_c[None, :],
                           mask=m_ranks2[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            tl.store(p_out_t + pos2[:, None] * C + offs_c[None, :], _round(b_z2 * scale2[:, None], ODT, UPCAST),
                     mask=m_ranks2[:, None] & m_c[None, :])


def _pad(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def spatial_launch_config(T: int, N: int, C: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Programs, tiles and warps. GPU: one persistent program per SM (8 warps; compiled for sm_90 the kernel holds
    255 registers without spilling, so one program fits an SM), each with its own Gram scratch; 64 x 64 Gram tiles
    over 32 channels; row passes over 4,096-element tiles of Gram rows; passes over all N points of a frame in
    4,096-element channel blocks (bench/kernel_resources.py reports the registers; none of this is measured on a GPU
    yet). Interpreter: a few programs and wide tiles."""
    n_pad = _pad(N)
    if interpreter_tiles():
        programs, block_g, block_c = min(T, 4), min(n_pad, 128), min(256, _pad(C))
    else:
        sms = gpu_split_sms(device) or 132
        programs = min(T, sms)
        block_g = min(64, n_pad)
        block_c = min(32, _pad(C))
    block_r = min(n_pad, 512) if interpreter_tiles() else max(1, min(n_pad, 4096 // n_pad))
    return dict(programs=programs, N_PAD=n_pad, BLOCK_G=block_g, BLOCK_R=block_r,
                BLOCK_C=block_c, BLOCK_P=block_c if interpreter_tiles() else max(16, min(block_c, 4096 // n_pad)),
                UPCAST=interpreter_active(), num_warps=8,
                num_stages=2 if centred_dtype(dtype) == torch.float32 else 1)  # no spill on sm_80 or sm_90


def launch_spatial_merge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, c1: int, c2: int, k1: int,
                         k2: int) -> SpatialMergeResult:
    """The kernel on validated inputs (no host read). x [T, N, C]; weight [c2, c2] and bias [c2] of the score
    Linear."""
    T, N, C = x.shape
    device = x.device
    cfg = spatial_launch_config(T, N, C, x.dtype, device)
    programs = cfg.pop("programs")
    cdt = centred_dtype(x.dtype)
    empty = dict(device=device)
    gram = torch.empty(programs, cfg["N_PAD"], cfg["N_PAD"], dtype=torch.float32, **empty)
    mean = torch.empty(programs, C, dtype=cdt, **empty)
    result = SpatialMergeResult(
        grouped=torch.empty(T, c1 + c2, C, dtype=x.dtype, **empty),
        modulation=torch.empty(T, c2, dtype=weight.dtype, **empty),
        first=torch.empty(T, c1, C, dtype=x.dtype, **empty),
        first_centers=torch.empty(T, c1, dtype=torch.int64, **empty),
        first_assignment=torch.empty(T, N, dtype=torch.int64, **empty),
        second=torch.empty(T, c2, C, dtype=x.dtype, **empty),
        second_centers=torch.empty(T, c2, dtype=torch.int64, **empty),
        second_assignment=torch.empty(T, c1, dtype=torch.int64, **empty),
        rho=torch.empty(T, N, dtype=torch.float32, **empty),
        delta=torch.empty(T, N, dtype=torch.float32, **empty),
        bad=torch.empty(T, dtype=torch.int32, **empty))
    # The mean's weights 1/n rounded to the centred dtype, as common.centre_points' batched product uses them.
    mean_w1, mean_w2 = (torch.tensor(1.0 / n, dtype=cdt).item() for n in (N, c1))
    _spatial_merge_kernel[(programs,)](
        x, weight, bias, gram, mean, result.bad, result.rho, result.delta, result.first_centers,
        result.first_assignment, result.first, result.second_centers, result.second_assignment, result.second,
        result.modulation, result.grouped, T, N, C, *x.stride(), 1.0 / C, mean_w1, mean_w2,
        C1=c1, C2=c2, K1=min(k1, N), K2=min(k2, c1), C1_PAD=_pad(c1), C2_PAD=_pad(c2), TIE=TIE_EPS, **cfg)
    return result


def spatial_merge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_centers=(16, 6),
                  num_neighbours=(8, 3), *, check: bool = True) -> SpatialMergeResult:
    """Both DPC-KNN layers of the spatial merger, the modulation and G for every frame of x [T, N, C] in one launch
    (the custom op dynfocus::spatial_merge). weight [c2, c2], bias [c2]: the score Linear (merge.score).

    check=True validates shapes, dtypes and sizes and rejects non-finite x (one host read); with check=False a
    non-finite frame is flagged in `bad` (device tensor, no sync) and its outputs are meaningless."""
    (c1, c2), (k1, k2) = tuple(num_centers), tuple(num_neighbours)
    if check:
        _check(x, weight, bias, c1, c2, k1, k2)
    require_kernel_device(x, weight, bias)
    from .library import spatial_merge_op

    return SpatialMergeResult(*spatial_merge_op(x, weight, bias, c1, c2, k1, k2))


def _check(x, weight, bias, c1, c2, k1, k2) -> None:
    from .common import check_points

    check_points(x, k=k1, num_clusters=c1)
    T, N, C = x.shape
    if not 1 <= c2 <= c1 <= MAX_FIRST_CENTRES:
        raise ValueError(f"num_centers must satisfy 1 <= second ({c2}) <= first ({c1}) <= {MAX_FIRST_CENTRES}")
    if not isinstance(k2, int) or k2 < 1:
        raise ValueError(f"num_neighbours[1] must be an integer >= 1, got {k2!r}")
    if weight.shape != (c2, c2) or bias.shape != (c2,):
        raise ValueError(f"the score Linear must be weight [{c2}, {c2}] and bias [{c2}], got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if weight.dtype != bias.dtype or not weight.dtype.is_floating_point:
        raise TypeError(f"weight and bias must share one floating dtype, got {weight.dtype} and {bias.dtype}")

"""Perturbed top-K (Berthet et al. 2020; paper Sec. 3.2, Eqs. 6-7): the trainable stand-in for the hard top-K.

For a video with scores s [L] and K kept prototypes, slot k of the indicator is the k-th selected prototype in
centre-frame order (the order of `kept_ids` of the hard path), so slot k of the soft path and slot k of the hard
path describe the same keyframe when the noise does not reorder the top K:

    forward:  P[k, l] = 1/n sum_s onehot(k-th selected of topK(s + sigma Z_s))[l]          (Eq. 6)
    backward: dP[k, l] / ds[e] = 1/(n sigma) sum_s onehot_s[k, l] Z_s[e]                     (Eq. 7)

`jacobian="full"` uses Eq. 7 as written. `jacobian="diagonal"` keeps only the e = l terms, which is what the
official `PerturbedTopKFunction.backward` computes (einsum "bnkd,bnd->bkd"); it is there to reproduce the
authors' training. Ragged batches: prototypes at or past L_b never get selected and get no gradient; slots at or
past K_b are zero.
"""
from __future__ import annotations

from typing import Optional

import torch

JACOBIANS = ("full", "diagonal")


def _selected_ids(scores, noise, sigma, num_protos, num_keep, order_key, max_keep):
    """[B, n, K_max] ids of the perturbed top-K_b in order_key order, -1 in slots >= K_b."""
    B, L = scores.shape
    in_video = torch.arange(L, device=scores.device) < num_protos[:, None]
    perturbed = (scores[:, None, :] + sigma * noise).masked_fill(~in_video[:, None, :], float("-inf"))
    best = torch.topk(perturbed, min(max_keep, L), dim=-1, sorted=True).indices     # descending perturbed score
    slot_valid = torch.arange(best.shape[-1], device=scores.device) < num_keep[:, None]  # [B, K]
    key = order_key.gather(1, best.flatten(1)).view_as(best) * L + best                # (centre frame, id)
    key = torch.where(slot_valid[:, None, :], key, torch.iinfo(torch.int64).max)
    ids = best.gather(-1, torch.argsort(key, dim=-1, stable=True))
    return torch.where(slot_valid[:, None, :], ids, -1)


class PerturbedTopKFunction(torch.autograd.Function):
    """Soft top-K indicator [B, K_max, L] with the Monte-Carlo Jacobian of Berthet et al. as its backward."""

    @staticmethod
    def forward(ctx, scores, noise, sigma, num_protos, num_keep, order_key, max_keep, jacobian):
        ids = _selected_ids(scores.detach(), noise, sigma, num_protos, num_keep, order_key, max_keep)
        B, n, K = ids.shape
        L = scores.shape[1]
        accumulate = torch.promote_types(scores.dtype, torch.float32)  # fp32, or fp64 for gradcheck-style tests
        indicator = scores.new_zeros(B, K, L, dtype=accumulate)
        counts = (ids >= 0).to(accumulate)
        indicator.scatter_add_(2, ids.clamp_min(0).transpose(1, 2), counts.transpose(1, 2))
        ctx.save_for_backward(ids, noise, num_protos)
        ctx.sigma, ctx.jacobian = sigma, jacobian
        return (indicator / n).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_indicator):
        ids, noise, num_protos = ctx.saved_tensors
        B, n, K = ids.shape
        L = noise.shape[-1]
        accumulate = torch.promote_types(grad_indicator.dtype, torch.float32)
        grad = grad_indicator.to(accumulate)
        valid = ids >= 0
        safe_ids = ids.clamp_min(0)
        # g_s[b, s, k] = grad[b, k, id of slot k in sample s]: the only l with onehot_s[k, l] = 1.
        g_s = grad[:, None, :, :].expand(B, n, K, L).gather(3, safe_ids[..., None]).squeeze(-1)
        g_s = torch.where(valid, g_s, torch.zeros_like(g_s))
        if ctx.jacobian == "full":
            grad_scores = torch.einsum("bs,bse->be", g_s.sum(-1), noise.to(accumulate))
        else:
            z_at_id = noise.to(accumulate).gather(2, safe_ids)                              # Z_s[id]
            grad_scores = torch.zeros(B, L, dtype=accumulate, device=grad.device)
            grad_scores.scatter_add_(1, safe_ids.flatten(1), (g_s * z_at_id).flatten(1))
        grad_scores = grad_scores / (n * ctx.sigma)
        in_video = torch.arange(L, device=grad.device) < num_protos[:, None]
        grad_scores = torch.where(in_video, grad_scores, torch.zeros_like(grad_scores))
        return grad_scores.to(grad_indicator.dtype), None, None, None, None, None, None, None


def perturbed_topk(scores: torch.Tensor, num_protos: torch.Tensor, num_keep: torch.Tensor,
                   order_key: torch.Tensor, *, max_keep: int, num_samples: int = 500, sigma: float = 0.1,
                   noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   jacobian: str = "full") -> torch.Tensor:
    """Soft indicator [B, max_keep, L] of the perturbed top-K_b of each row of scores [B, L].

    num_protos / num_keep: int64 [B] (L_b, K_b <= L_b); order_key: int64 [B, L], the centre frame of each
    prototype (slots are sorted by it, ties by id). noise: fixed standard normal samples [B, num_samples, L]
    (tests), else drawn with `generator`. Differentiable in scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, L], got shape {tuple(scores.shape)}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (the perturbation's scale), got {sigma!r}")
    B, L = scores.shape
    if noise is None:
        noise = torch.randn(B, num_samples, L, device=scores.device, dtype=torch.float32, generator=generator)
    elif noise.shape[0] != B or noise.shape[2] != L or noise.dim() != 3:
        raise ValueError(f"noise must be [B={B}, num_samples, L={L}], got {tuple(noise.shape)}")
    return PerturbedTopKFunction.apply(scores, noise, float(sigma), num_protos.to(torch.int64),
                                       num_keep.to(torch.int64), order_key.to(torch.int64), int(max_keep),
                                       jacobian)

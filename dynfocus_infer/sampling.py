"""Sampling parameters and a batch sampler that is deterministic per request.

Every request draws its randomness from a counter-based hash of (seed, step, token id), turned into Gumbel noise:
argmax(logits / temperature + Gumbel) samples from softmax(logits / temperature). A request's tokens therefore
depend on its own seed and logits only, never on which other requests share its batch, and sampling needs no
host sync and no per-request torch.Generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import RequestError, is_integer, is_real

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (the default: answers are reproducible).

    top_k 0 and top_p 1.0 disable those filters; `stop` strings end the text (not included in it);
    `seed` fixes the draw of a sampled request (default 0, so the same input gives the same output run after run).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        def fail(name: str, expected: str):
            raise RequestError(f"SamplingParams.{name} = {getattr(self, name)!r}: expected {expected}")

        if not is_integer(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an integer >= 1")
        if not is_real(self.temperature) or not 0.0 <= self.temperature < float("inf"):
            fail("temperature", "a finite number >= 0 (0 is greedy)")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "a number in (0, 1] (1 disables it)")
        if not is_integer(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 disables it)")
        if self.seed is not None and (not is_integer(self.seed) or not 0 <= self.seed < 2**63):
            fail("seed", "an integer in [0, 2**63)")
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(not is_integer(t) or t < 0
                                                                     for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "True or False")
        self.stop, self.stop_token_ids = list(self.stop), [int(t) for t in self.stop_token_ids]
        self.max_tokens, self.top_k, self.temperature, self.top_p = (int(self.max_tokens), int(self.top_k),
                                                                     float(self.temperature), float(self.top_p))
        self.seed = None if self.seed is None else int(self.seed)



def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (no sign or overflow surprises)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] from (seed, step, token id); seeds and steps are int64 [B] on the device."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    seed = _hash32(seeds ^ _hash32(seeds >> 32))  # all 63 bits of the seed matter
    h = _hash32(seed[:, None] * 0x9E3779B1 + _hash32(steps[:, None] * 0x85EBCA77 + token[None, :]))
    u = ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


class BatchSampler:
    """Per-row temperature / top-k / top-p / seed for a fixed batch, kept on the device."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.greedy_only = all(p.temperature == 0.0 for p in params)
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.seeds = torch.tensor([0 if p.seed is None else p.seed for p in params], dtype=torch.int64, device=device)
        self.filtered = any(p.top_k > 0 or p.top_p < 1.0 for p in params)

    def __call__(self, logits: torch.Tensor, steps: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next token ids [n] for logits [n, vocab] of the batch rows `rows` (all rows when None) at `steps` [n]."""
        logits = logits.float()
        greedy = logits.argmax(-1)
        if self.greedy_only:
            return greedy
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        temperature, seeds = pick(self.temperature), pick(self.seeds)
        scaled = logits / temperature.clamp_min(1e-6)[:, None]
        if self.filtered:
            scaled = _filter_top_k_top_p(scaled, pick(self.top_k), pick(self.top_p))
        sampled = (scaled + gumbel_noise(seeds, steps.to(torch.int64), logits.shape[-1])).argmax(-1)
        return torch.where(temperature > 0, sampled, greedy)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k and smallest nucleus of mass >= top_p (the best token always stays)."""
    sorted_logits, order = scaled.sort(-1, descending=True)
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, -float("inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # top_p = 1 keeps everything: an fp32 cumsum may reach 1 before the tail, which must not depend on whether
    # another row of the batch asked for filtering.
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    filtered = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(scaled).scatter_(-1, order, filtered)

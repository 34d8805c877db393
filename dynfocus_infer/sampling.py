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
    `seed` fixes the draw of a sampled request (same input, same seed: same tokens, batched or alone); None draws
    fresh randomness per request (and per completion when n > 1).
    n: completions per request (completion i of a seeded request uses a seed derived from (seed, i)).
    logprobs: the top-N logprobs (of the raw model distribution) of every generated token, plus the sampled
    token's; prompt_logprobs: the same for every prompt text token. min_tokens: EOS and stop tokens are masked
    until that many tokens are out. repetition_penalty (> 0, 1 = off; HF's: over prompt and output tokens),
    presence_penalty and frequency_penalty (in [-2, 2], 0 = off; OpenAI's: over output tokens).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

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
        if not is_integer(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 0):
                fail(name, "None or an integer >= 0 (the number of top tokens besides the chosen one)")
        if not is_integer(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            fail("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        if not is_real(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            fail("repetition_penalty", "a number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                fail(name, "a number in [-2, 2] (0 disables it)")
        self.n, self.min_tokens = int(self.n), int(self.min_tokens)
        self.logprobs = None if self.logprobs is None else int(self.logprobs)
        self.prompt_logprobs = None if self.prompt_logprobs is None else int(self.prompt_logprobs)
        self.repetition_penalty, self.presence_penalty, self.frequency_penalty = (
            float(self.repetition_penalty), float(self.presence_penalty), float(self.frequency_penalty))
        self.stop, self.stop_token_ids = list(self.stop), [int(t) for t in self.stop_token_ids]
        self.max_tokens, self.top_k, self.temperature, self.top_p = (int(self.max_tokens), int(self.top_k),
                                                                     float(self.temperature), float(self.top_p))
        self.seed = None if self.seed is None else int(self.seed)


    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Logprob:
    """vLLM's Logprob: the log-probability of a token and its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


def fresh_seed() -> int:
    """A seed for a request that gave none: fresh randomness, fixed for that request's lifetime (a preempted request
    recomputes with it and continues with the same tokens)."""
    import secrets
    return secrets.randbits(63)


def child_seed(seed: int, index: int) -> int:
    """Seed of completion `index` of a request with n > 1 (completion 0 keeps the request's seed)."""
    if index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63   # the noise hashes all 63 bits: neighbours are unrelated


def _num_generated(seq) -> int:
    """Tokens generated so far, counting any still on their way to the host (the engine's output lag)."""
    return len(seq.output_ids) + getattr(seq, "num_pending", 0)


def sampling_masks(logits: torch.Tensor, seqs, eos_token_ids) -> torch.Tensor:
    """logits [R, vocab] (fp32) after min_tokens (EOS and stop tokens masked until min_tokens are out) and the
    repetition / presence / frequency penalties of each row's sequence; untouched when no row asks for either."""
    blocked = [i for i, s in enumerate(seqs) if _num_generated(s) < s.params.min_tokens]
    penalised = [i for i, s in enumerate(seqs) if s.params.penalised]
    if not blocked and not penalised:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in blocked:  # per sequence, not per token: a few rows early in their answers
        params = seqs[i].params
        stop = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
        stop = [t for t in stop if t < vocab]
        if stop:
            logits[i, stop] = -float("inf")
    if penalised:
        logits[penalised] = _penalise(logits[penalised], [seqs[i] for i in penalised], vocab)
    return logits


def _token_counts(id_lists: list, vocab: int, device: torch.device) -> torch.Tensor:
    """counts [R, vocab] of the ids of each list (ids < 0, e.g. visual prompt rows, ignored)."""
    width = max(1, max(len(ids) for ids in id_lists))
    padded = torch.full((len(id_lists), width), vocab, dtype=torch.int64)
    for row, ids in enumerate(id_lists):
        if ids:
            padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    padded = padded.masked_fill(padded < 0, vocab).to(device)
    counts = torch.zeros(len(id_lists), vocab + 1, device=device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))[:, :vocab]


def _penalise(logits: torch.Tensor, seqs, vocab: int) -> torch.Tensor:
    device = logits.device
    output_counts = _token_counts([s.output_ids for s in seqs], vocab, device)
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    if (repetition != 1.0).any():
        seen = _token_counts([s.prompt_token_ids for s in seqs], vocab, device).add_(output_counts) > 0
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).to(logits.dtype)


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

    def __init__(self, params: list[SamplingParams], device: torch.device, seeds: Optional[list] = None):
        """seeds: one per row, replacing the params' own (the engine's per-completion seeds); by default each
        params' seed, 0 where it is None."""
        self.greedy_only = all(p.temperature == 0.0 for p in params)
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        if seeds is None:
            seeds = [0 if p.seed is None else p.seed for p in params]
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
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

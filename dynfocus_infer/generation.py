"""Prefill + decode loop for a batch of prompts given as packed embeddings.

The loop keeps every token on the device and reads back only every `sync_interval` steps: then it detokenises,
applies stop strings, yields the new text of every request, and drops finished requests from the batch (their
cache slots stay, unread). Requests finish independently: EOS, a stop token or string, or their own max_tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .models.llama import KVCache, LlamaForCausalLM
from .sampling import BatchSampler, SamplingParams


@dataclass
class SequenceState:
    """Host-side view of one sequence: its tokens so far, text, and why it ended."""

    params: SamplingParams
    max_new_tokens: int
    token_ids: list = field(default_factory=list)
    text: str = ""
    emitted: int = 0           # characters of `text` already streamed
    finish_reason: Optional[str] = None


@dataclass
class GenerationEvent:
    """After a sync point: which sequences (rows of `run`) have new text or have finished."""

    updated: list
    first_token_ms: Optional[float]
    run: "GenerationRun"


def _ends_with_partial(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (held back from streams)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class GenerationRun:
    """Host-side state of one batch's generation: its sequences, and the token bookkeeping at sync points.
    Each `Generator.run` call has its own, so interleaved runs (two streams on one engine) never mix."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], params: Sequence[SamplingParams],
                 max_new_tokens: Sequence[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, list(eos_token_ids)
        self.states = [SequenceState(p, m) for p, m in zip(params, max_new_tokens)]

    def absorb(self, chunk: list, rows: list) -> list:
        """Append the synced tokens of live rows (chunk[i] belongs to rows[i]); apply EOS, stop tokens, stop strings
        and max_tokens. Returns the rows that changed."""
        updated = []
        for row, new_tokens in zip(rows, chunk):
            state = self.states[row]
            if state.finish_reason is not None:
                continue
            eos = set() if state.params.ignore_eos else set(self.eos_token_ids)
            stop_ids = set(state.params.stop_token_ids) | eos
            synced_before = len(state.token_ids)
            for token in new_tokens:
                if len(state.token_ids) >= state.max_new_tokens:
                    state.finish_reason = "length"
                    break
                state.token_ids.append(token)
                if token in stop_ids:
                    state.finish_reason = "stop"
                    break
            else:
                if len(state.token_ids) >= state.max_new_tokens:
                    state.finish_reason = "length"
            state.text = self._decode(state.token_ids, stop_ids)
            if state.params.stop:
                self._apply_stop_strings(state, stop_ids, synced_before)
            updated.append(row)
        return updated

    def _decode(self, token_ids: list, stop_ids: set) -> str:
        return self.tokenizer.decode([t for t in token_ids if t not in stop_ids], skip_special_tokens=True)

    def _apply_stop_strings(self, state: SequenceState, stop_ids: set, synced_before: int) -> None:
        """Cut the text before the first stop string and the tokens after the one that completed it."""
        cuts = [c for c in (state.text.find(stop) for stop in state.params.stop) if c >= 0]
        if not cuts:
            return
        state.text, state.finish_reason = state.text[:min(cuts)], "stop"
        for end in range(synced_before + 1, len(state.token_ids) + 1):
            prefix = self._decode(state.token_ids[:end], stop_ids)
            if any(stop in prefix for stop in state.params.stop):
                del state.token_ids[end:]
                break

    def new_text(self, row: int) -> str:
        """Text of `row` not streamed yet, holding back a possible partial stop string or UTF-8 fragment."""
        state = self.states[row]
        end = len(state.text)
        if state.finish_reason is None:
            # First the unfinished UTF-8 character, then a stop string that may be completing before it: held
            # back in the other order, the text before the fragment could end a stop string and be sent.
            while end > state.emitted and state.text[end - 1] == "\ufffd":
                end -= 1
            end -= _ends_with_partial(state.text[:end], state.params.stop)
            end = max(end, state.emitted)
        delta, state.emitted = state.text[state.emitted:end], max(state.emitted, end)
        return delta


class Generator:
    """Prefill + decode for batches of packed prompt embeddings; `run` yields a GenerationEvent per sync point."""

    def __init__(self, llm: LlamaForCausalLM, tokenizer, eos_token_ids: Sequence[int], *, sync_interval: int = 8):
        self.llm, self.tokenizer = llm, tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.sync_interval = max(1, sync_interval)

    def _sync_step_at_or_after(self, step: int, most_new: int) -> int:
        """The first step >= `step` at which the loop reads back (step 1, multiples of sync_interval, the last)."""
        if step <= 1:
            return 1
        return min(-(-step // self.sync_interval) * self.sync_interval, most_new)

    def run(self, inputs_embeds: torch.Tensor, prompt_lengths: Sequence[int], params: Sequence[SamplingParams],
            max_new_tokens: Sequence[int]) -> Iterator[GenerationEvent]:
        device = inputs_embeds.device
        n = len(prompt_lengths)
        run = GenerationRun(self.tokenizer, self.eos_token_ids, params, max_new_tokens)
        longest_prompt, most_new = max(prompt_lengths), max(max_new_tokens)
        # A row decodes until the sync point that sees it finish, so it may write KV past its own budget.
        cache_len = max(p + self._sync_step_at_or_after(m, most_new) - 1
                        for p, m in zip(prompt_lengths, max_new_tokens))
        cache = KVCache.for_model(self.llm.config, n, cache_len, inputs_embeds.dtype, device)
        cu_seqlens = torch.tensor([0, *prompt_lengths], device=device).cumsum(0).to(torch.int32)
        sampler = BatchSampler(list(params), device)
        tokens = torch.zeros(n, most_new, dtype=torch.int64, device=device)
        start = time.perf_counter()
        logits = self.llm.prefill(cu_seqlens, longest_prompt, inputs_embeds=inputs_embeds, cache=cache)
        live = list(range(n))                       # host copy of the rows still generating
        rows = torch.arange(n, device=device)
        next_tokens = sampler(logits, torch.zeros(n, dtype=torch.int64, device=device))
        tokens[:, 0] = next_tokens
        first_token_ms = None
        synced, step = 0, 1
        while True:
            # Step 1 syncs once so the first token (time to first token) is seen right after the prefill.
            if step == 1 or step % self.sync_interval == 0 or step == most_new:
                chunk = tokens[rows, synced:step].tolist()  # the one host read per sync_interval steps
                if first_token_ms is None:
                    first_token_ms = (time.perf_counter() - start) * 1e3
                updated = run.absorb(chunk, live)
                synced = step
                yield GenerationEvent(updated, first_token_ms, run)
                live = [i for i in live if run.states[i].finish_reason is None]
                if not live or step == most_new:
                    break
                rows = torch.tensor(live, device=device)
                next_tokens = tokens[rows, step - 1]
            logits = self.llm.decode(cache, input_ids=next_tokens, slots=rows, max_cache_len=longest_prompt + step + 1)
            next_tokens = sampler(logits, torch.full_like(rows, step), rows=rows)
            tokens[rows, step] = next_tokens
            step += 1

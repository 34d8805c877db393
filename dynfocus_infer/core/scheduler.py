"""Continuous batching: which sequences compute which positions in the next step (vLLM / nano-vllm's scheduler).

Every step packs, under a token budget (max_num_batched_tokens): first the running sequences in admission order
(a decode is one row, an unfinished prefill its next chunk), then new sequences from the waiting queue while slots
(max_num_seqs) and KV blocks allow. A waiting sequence is admitted only when the blocks of its whole remaining
prefill are free, so a chunked prefill never stalls half-way; at admission it takes the cached blocks of its prompt's
longest known prefix (block_manager's prefix caching) and computes from there. Each chunk publishes the full prompt
blocks it computes, for sequences admitted after it, in this step or later ones. A suspect computes everything. When a running sequence needs a block and none is
free, the most recently admitted running sequence is preempted: its blocks are freed and it goes back to the front
of the waiting queue, to be recomputed from its prompt and the tokens it already generated (same seed and step
counters, so it continues with the same tokens).

A sequence marked `suspect` (its batch's step raised) is scheduled alone until it ends, so a failure that follows
one request is pinned on it and spares the others.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Positions [start, start + length) of seq computed this step; `samples` when they reach its last token."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop seq wherever it is (finished or aborted); its blocks are free at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledChunk]:
        suspects = [s for s in self.running if s.suspect] or [s for s in self.waiting if s.suspect][:1]
        if suspects:
            return self._schedule_alone(suspects[0])
        budget, chunks, preemptions = self.max_num_batched_tokens, [], self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.awaits_last_token:
                index += 1
                continue
            length = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed + length):
                break                          # seq itself was the last one and got preempted
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            self.blocks.register(seq, seq.num_computed + length)
            budget -= length
            index += 1
        preempted = self.num_preemptions != preemptions   # no admission in a step that had to preempt
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.admit(seq):     # its cached prompt prefix, and room for the rest of its prefill
                break
            length = min(seq.num_uncomputed, budget)
            self.blocks.ensure(seq, seq.num_computed + length)
            self._admit(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            self.blocks.register(seq, seq.num_computed + length)
            budget -= length
        return chunks

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for seq up to num_tokens, preempting running sequences from the most recent; False when seq
        itself had to go."""
        while not self.blocks.ensure(seq, num_tokens):
            victim = next((s for s in reversed(self.running) if not s.suspect), None)
            if victim is None or victim is seq:
                if seq.status is SequenceStatus.RUNNING:
                    self.preempt(seq)
                return False
            self.preempt(victim)
        return True

    def _schedule_alone(self, seq: Sequence) -> list[ScheduledChunk]:
        if seq.awaits_last_token:
            return []
        length = min(seq.num_uncomputed, self.max_num_batched_tokens)
        if seq.status is SequenceStatus.WAITING:
            if not self._make_room(seq, seq.num_tokens):
                return []
            self._admit(seq)
        elif not self._make_room(seq, seq.num_computed + length):
            return []
        return [ScheduledChunk(seq, seq.num_computed, length)]

"""One generated sequence as the scheduler sees it: its prompt, its tokens so far, its blocks, its state.

With the engine's one-step output lag (llm_engine), a sampled token is known on the device a step before its id
reaches the host: `num_pending` counts those, and the next decode reads its input id from the device."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # prompt ready, no KV yet (new, or preempted: everything recomputed)
    RUNNING = "running"        # owns blocks; prefilling in chunks or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """prompt_embeds [P, hidden] on the device stays until the sequence ends (a preempted sequence recomputes from
    it); prompt_token_ids [P] holds -1 at visual rows. Positions >= P are generated tokens (output_ids)."""

    seq_id: int
    request_id: str
    child_index: int
    params: SamplingParams
    seed: int
    prompt_embeds: torch.Tensor
    prompt_token_ids: list
    max_new_tokens: int
    output_ids: list = field(default_factory=list)
    num_pending: int = 0                   # tokens sampled on the device whose ids are not on the host yet (0-2)
    num_computed: int = 0                  # positions whose K/V are in the cache
    block_table: list = field(default_factory=list)
    prompt_hashes: list = field(default_factory=list)   # content hash of each full prompt block (block_manager)
    num_registered: int = 0                # leading prompt blocks whose hashes are published for reuse
    cached_prompt_tokens: Optional[int] = None   # prompt positions found cached at its first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    suspect: bool = False                  # was in a batch whose step failed: runs alone until it ends
    logprobs: list = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    first_token_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting those still on their way to the host."""
        return len(self.output_ids) + self.num_pending

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output_tokens

    @property
    def awaits_last_token(self) -> bool:
        """Its max_new_tokens-th token is sampled but not on the host yet: nothing left to compute."""
        return self.num_pending > 0 and self.num_output_tokens >= self.max_new_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

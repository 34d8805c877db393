"""One generated sequence as the scheduler sees it: its prompt, its tokens so far, its blocks, its state."""
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
    num_computed: int = 0                  # positions whose K/V are in the cache
    block_table: list = field(default_factory=list)
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
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

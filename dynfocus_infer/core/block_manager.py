"""Which KV blocks are free and which sequence owns which (nano-vllm's BlockManager, without prefix sharing)."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    """A free list of num_blocks blocks of block_size tokens. A sequence holds exactly the blocks its computed
    tokens need; `ensure` grows it, `free` returns them all."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq lacks to hold num_tokens positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for num_tokens positions; False (nothing taken) when the free list is too short."""
        need = self.missing(seq, num_tokens)
        if need > len(self._free):
            return False
        seq.block_table.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

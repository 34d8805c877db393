"""Which KV blocks are free, which sequence holds which, and which hold a prompt prefix another sequence can reuse.

Prefix caching (vLLM's automatic prefix caching): every full block of a prompt has a content hash chained from the
first block (`prompt_block_hashes`: the token ids, -1 at visual rows, and the bytes of the visual rows' embeddings),
so two prompts share a block exactly when everything up to its end is the same. Once a step computes a full prompt
block its hash is registered; a sequence admitted later (or in the same step: each layer writes every row's K/V
before any row attends) takes the cached blocks of its longest matching prefix instead of computing them. A block
is shared read-only: only full prompt blocks are shared and at least the last prompt position is always computed,
so no sequence writes into a block another holds. Blocks no sequence holds keep their hash and stay reusable until
a new block is needed and none is free: then the least recently released is evicted.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Optional

import numpy as np
import torch

from .sequence import Sequence


def prompt_block_hashes(prompt_ids: list, visual_rows: Optional[torch.Tensor], block_size: int) -> list[bytes]:
    """Chained content hashes of the prompt's full blocks: block i's hash covers positions [0, (i + 1) x block_size).
    prompt_ids: the prompt's token ids with -1 at visual rows; visual_rows [V, hidden] on the host: the visual rows'
    embeddings in prompt order (their bytes are hashed, so equal hashes mean equal inputs, not merely equal videos)."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    visual_at = np.cumsum(ids < 0) - 1            # row of visual_rows each visual position reads
    num_visual = int((ids < 0).sum())
    if num_visual != (0 if visual_rows is None else visual_rows.shape[0]):
        raise ValueError(f"prompt_block_hashes: the prompt has {num_visual} visual positions but "
                         f"{0 if visual_rows is None else visual_rows.shape[0]} visual rows were given")
    rows = None
    if num_visual:
        rows = visual_rows.contiguous().view(torch.uint8).reshape(num_visual, -1).numpy()
    hashes, digest = [], b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        h = hashlib.blake2b(digest, digest_size=16)
        block = ids[start:start + block_size]
        h.update(block.tobytes())
        visual = block < 0
        if visual.any():
            h.update(rows[visual_at[start:start + block_size][visual]].tobytes())
        digest = h.digest()
        hashes.append(digest)
    return hashes


class BlockManager:
    """num_blocks blocks of block_size tokens. A sequence holds exactly the blocks its computed tokens need; `ensure`
    grows it, `free` releases them. With prefix caching, `admit` first gives a waiting sequence the cached blocks of
    its prompt's longest known prefix and `register` publishes the full prompt blocks a step computes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = deque(range(num_blocks))          # held by no sequence, no reusable content
        self._cached: OrderedDict[int, None] = OrderedDict()   # held by none, content reusable; oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.prefix_queries = 0                         # prompt tokens looked up at admissions (re-admissions too)
        self.prefix_hits = 0                            # of those, tokens found cached (not computed)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take now (free, or cached and held by none)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose content a later prompt can reuse (held or not)."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq lacks to hold num_tokens positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest known prompt prefix, leaving its last prompt position to compute (its
        logits are sampled). Empty for a sequence that asks for prompt logprobs (every row must be computed)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        found = []
        for digest in seq.prompt_hashes[:(seq.prompt_len - 1) // self.block_size]:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def admit(self, seq: Sequence) -> bool:
        """Blocks for the whole remaining prefill of a waiting sequence (which holds none): its cached prefix, then
        new blocks; sets seq.num_computed to the cached positions. False (nothing taken) when they are not free."""
        assert not seq.block_table and seq.num_computed == 0
        prefix = self._cached_prefix(seq)
        idle = sum(1 for block in prefix if self._refs[block] == 0)
        if self.blocks_for(seq.num_tokens) - len(prefix) > self.num_free - idle:
            return False
        for block in prefix:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        seq.block_table = list(prefix)
        seq.num_computed = len(prefix) * self.block_size
        seq.num_registered = len(prefix)
        if seq.cached_prompt_tokens is None:
            seq.cached_prompt_tokens = seq.num_computed
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.prefix_queries += seq.prompt_len
            self.prefix_hits += seq.num_computed
        return True

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for num_tokens positions; False (nothing taken) when the free list is too short."""
        need = self.missing(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:                                           # evict the least recently released cached block
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def register(self, seq: Sequence, computed: int) -> None:
        """seq's K/V up to position `computed` is (being) written: publish the hashes of its full prompt blocks
        below it. A block whose content another block already holds stays private."""
        if not self.enable_prefix_caching:
            return
        full = min(computed, seq.prompt_len) // self.block_size
        for index in range(seq.num_registered, min(full, len(seq.prompt_hashes))):
            digest, block = seq.prompt_hashes[index], seq.block_table[index]
            if digest not in self._block_of and block not in self._hash_of:
                self._block_of[digest], self._hash_of[block] = block, digest
        seq.num_registered = max(seq.num_registered, full)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (the last first, so a prompt's tail is evicted before its head)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a failed step, whose blocks may hold K/V never written)."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._hash_of.clear()
        self._block_of.clear()

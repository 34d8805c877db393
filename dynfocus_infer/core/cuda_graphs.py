"""CUDA graphs of the decode-only step, one per batch-size bucket (nano-vllm's capture scheme).

A decode step launches ~30 kernels per layer; replaying a captured graph launches them as one, which is what
batch-1 decode latency needs on a GPU. Each bucket's graph reads static buffers: the step copies its token ids and
metadata into them, padding rows write their K/V to a reserved dummy block and read one position of it, and
their logits are dropped. Steps with a prefill chunk, prompt logprobs, or more rows than the largest bucket run
eagerly.

NOT RUN ON A GPU YET: this session had none. It is built on CUDA unless LLM(enforce_eager=True). The CPU tests run
the same buffers, padding and bucket logic with an eager stand-in for graph capture (`capture=`), against the
plain eager step; the GPU round must repeat that comparison with real graphs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.llama import LlamaForCausalLM
from ..models.paged_cache import PagedKVCache, StepMetadata


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (vLLM's spacing), max_num_seqs itself included."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return buckets + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, llm: LlamaForCausalLM, cache: PagedKVCache, max_num_seqs: int, max_model_len: int,
                 dummy_block: int, capture: Optional[Callable] = None):
        """capture(forward) -> (replay, output): records `forward` (default: into a CUDA graph) and returns a
        function that re-runs it on the current buffer contents and the tensor it writes its logits to."""
        device = cache.k.device
        self.llm, self.cache, self.max_model_len = llm, cache, max_model_len
        self.buckets = batch_buckets(max_num_seqs)
        largest, max_blocks = self.buckets[-1], -(-max_model_len // cache.block_size)
        self.dummy_slot = dummy_block * cache.block_size
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), self.dummy_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.full((largest, max_blocks), dummy_block, dtype=torch.int32, device=device)
        self.seq_index = torch.arange(largest, device=device)
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.cu_seqlens_k = torch.zeros(largest + 1, dtype=torch.int32, device=device)
        self.replays, self.logits, self._pool = {}, {}, None
        llm.rope_table(device, cache.k.dtype)           # built before capture, read inside it
        capture = capture or self._capture_cuda_graph
        for bucket in reversed(self.buckets):           # largest first: the others reuse its memory pool
            meta = self._meta(bucket)
            self.replays[bucket], self.logits[bucket] = capture(lambda b=bucket, m=meta: self._forward(b, m))

    def _capture_cuda_graph(self, forward: Callable[[], torch.Tensor]):
        forward()                                       # warm-up outside the graph (allocator, lazy inits)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward()
        self._pool = graph.pool()
        torch.cuda.synchronize()
        return graph.replay, logits

    def _meta(self, bucket: int) -> StepMetadata:
        return StepMetadata(self.positions[:bucket], self.seq_index[:bucket], self.slot_mapping[:bucket],
                            self.cu_seqlens_q[:bucket + 1], self.cu_seqlens_k[:bucket + 1],
                            self.context_lens[:bucket], self.block_tables[:bucket], self.seq_index[:bucket],
                            1, self.max_model_len)

    def _forward(self, bucket: int, meta: StepMetadata) -> torch.Tensor:
        hidden = self.llm.step(self.llm.embed(self.input_ids[:bucket]), self.cache, meta)
        return self.llm.logits(hidden)

    def fits(self, rows: int) -> bool:
        return rows <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only step (B rows, one per sequence) by graph replay."""
        rows = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= rows)
        self.input_ids[:rows] = input_ids
        self.positions[:rows] = meta.positions
        self.slot_mapping[:rows] = meta.slot_mapping
        self.slot_mapping[rows:bucket] = self.dummy_slot
        self.context_lens[:rows] = meta.context_lens
        self.context_lens[rows:bucket] = 1
        width = meta.block_tables.shape[1]
        self.block_tables[:rows, :width] = meta.block_tables
        self.block_tables[rows:bucket].fill_(self.dummy_slot // self.cache.block_size)
        self.cu_seqlens_k[1:bucket + 1] = self.context_lens[:bucket].cumsum(0)
        self.replays[bucket]()
        return self.logits[bucket][:rows]

"""The engine's KV cache: one pool of fixed-size blocks per layer, allocated once, and the metadata of one step.

k, v: [num_layers, num_blocks, block_size, num_kv_heads, head_dim] (each layer's pool is flash_attn's paged layout).
A sequence owns a list of blocks (its block table); its token at position p lives in block table[p // block_size],
row p % block_size. Flat index ("slot") of that row: block * block_size + row.

Zero-filled once at allocation, not per batch: the SDPA path reads whole blocks and masks the rows past a sequence's
length, and 0 * NaN from uninitialised memory would poison the weighted sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import LlamaConfig


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V of one token over every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


class PagedKVCache:
    """K/V block pools of every layer (see the module docstring)."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_index], self.v[layer_index]

    def write(self, layer_index: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows k/v [N, Hkv, D] to the flat slots slot_mapping [N] of one layer."""
        heads, dim = k.shape[1:]
        self.k[layer_index].view(-1, heads, dim)[slot_mapping] = k.to(self.k.dtype)
        self.v[layer_index].view(-1, heads, dim)[slot_mapping] = v.to(self.v.dtype)


@dataclass
class StepMetadata:
    """Where the packed rows of one step go: B sequences, each with query rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
    at its positions context_lens[b] - query_len .. context_lens[b] - 1. Tensors on the model's device; the two
    maxima are host ints the engine knows without a device sync, as are the optional per-sequence host lengths (the
    engine's own steps give them; the SDPA fallback then splits decode rows from prefill chunks: sdpa_groups)."""

    positions: torch.Tensor       # [T] int64, position of each row in its sequence
    seq_index: torch.Tensor       # [T] int64, which of the B sequences each row belongs to
    slot_mapping: torch.Tensor    # [T] int64, flat cache slot of each row
    cu_seqlens_q: torch.Tensor    # [B + 1] int32
    cu_seqlens_k: torch.Tensor    # [B + 1] int32, cumulative context lengths (flash_attn varlen)
    context_lens: torch.Tensor    # [B] int32, tokens in the cache per sequence after this step
    block_tables: torch.Tensor    # [B, max_blocks] int32, padded with 0 (masked)
    logits_rows: torch.Tensor     # [R] int64, rows whose next-token logits are wanted
    max_query_len: int
    max_context_len: int
    host_query_lens: Optional[tuple] = None      # [B] host ints: query rows of each sequence this step
    host_context_lens: Optional[tuple] = None    # [B] host ints: context_lens on the host

    def sdpa_groups(self) -> Optional[list]:
        """For a step that mixes decode rows (one query) with prefill chunks, and knows its host lengths: [(rows,
        StepMetadata)] of the decode sequences and of the others, `rows` the packed rows of each group. Padded
        together, every decode row would be padded to the longest chunk's query length (B x Q x S scores for
        B + Q rows); apart, the decodes cost B x 1 x S, each group gathering its own context only. None otherwise.
        Built on the host once per step, not per layer."""
        if "_sdpa_groups" not in self.__dict__:
            self._sdpa_groups = None
            if self.host_query_lens is not None:
                decodes = np.asarray(self.host_query_lens) == 1
                if decodes.any() and not decodes.all():
                    self._sdpa_groups = [self._subset(np.flatnonzero(decodes)),
                                         self._subset(np.flatnonzero(~decodes))]
        return self._sdpa_groups

    def _subset(self, seqs: np.ndarray) -> tuple:
        """(rows, metadata) of sequences `seqs` alone, renumbered 0..len(seqs) - 1."""
        query, context = np.asarray(self.host_query_lens), np.asarray(self.host_context_lens)
        lens = query[seqs]
        starts = np.concatenate([[0], np.cumsum(query)])[seqs]
        sub_starts = np.concatenate([[0], np.cumsum(lens)])
        rows = np.arange(sub_starts[-1]) - np.repeat(sub_starts[:-1] - starts, lens)
        device = self.positions.device
        rows_t, seqs_t = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (rows, seqs))
        cu_k = np.concatenate([[0], np.cumsum(context[seqs])])
        sub = StepMetadata(
            positions=self.positions[rows_t], slot_mapping=self.slot_mapping[rows_t],
            seq_index=torch.from_numpy(np.repeat(np.arange(len(seqs)), lens)).to(device),
            cu_seqlens_q=torch.from_numpy(sub_starts.astype(np.int32)).to(device),
            cu_seqlens_k=torch.from_numpy(cu_k.astype(np.int32)).to(device),
            context_lens=self.context_lens[seqs_t], block_tables=self.block_tables[seqs_t], logits_rows=rows_t[:0],
            max_query_len=int(lens.max()), max_context_len=int(context[seqs].max()),
            host_query_lens=tuple(lens.tolist()), host_context_lens=tuple(context[seqs].tolist()))
        return rows_t, sub

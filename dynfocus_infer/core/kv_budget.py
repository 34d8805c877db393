"""How many KV blocks the engine allocates, once, from a memory budget (DESIGN.md 10).

CUDA: `gpu_memory_utilization` of the device's memory, minus what the weights and a warm-up forward at the largest
step (max_num_batched_tokens rows) used at peak (nano-vllm's model_runner does the same). CPU (or when given):
`kv_cache_memory` bytes. Never more than max_num_seqs full-length sequences need; never fewer than one sequence of
max_model_len: then the settings cannot serve the model and the error says what to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import ConfigError, is_integer, is_real

DEFAULT_CPU_KV_MEMORY = 1 << 30   # 1 GiB
FLASH_BLOCK_SIZE = 256


@dataclass
class CacheConfig:
    """Engine capacity. max_model_len: prompt + answer of one sequence (default: the model's context);
    max_num_batched_tokens: rows one step computes (prefill chunks + decodes; default max(2048, max_model_len)).
    block_size: tokens per KV block (default 16; 256 where flash_attn reads the cache, whose paged kernels need a
    multiple of 256). enable_prefix_caching: prompts reuse the K/V of full blocks another prompt already computed
    (block_manager)."""

    block_size: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if not is_integer(self.max_num_seqs) or self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs = {self.max_num_seqs!r} is invalid: expected an integer >= 1")
        for name in ("block_size", "kv_cache_memory", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):
                raise ConfigError(f"{name} = {value!r} is invalid: expected None or an integer >= 1")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching = {self.enable_prefix_caching!r} is invalid: expected True or "
                              f"False")
        if not is_real(self.gpu_memory_utilization) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization = {self.gpu_memory_utilization!r} is invalid: expected a "
                              f"fraction in (0, 1]")

    def resolved(self, context_length: int, flash_attn: bool = False) -> "CacheConfig":
        """Defaults filled in for a model of `context_length` (flash_attn: the paged cache is read by flash_attn)."""
        max_model_len = self.max_model_len or context_length
        if max_model_len > context_length:
            raise ConfigError(f"max_model_len = {max_model_len} is over the model's context of {context_length}")
        block_size = self.block_size or (FLASH_BLOCK_SIZE if flash_attn else 16)
        if flash_attn and block_size % FLASH_BLOCK_SIZE:
            raise ConfigError(f"block_size = {block_size} is invalid with flash_attn: its paged KV kernels need a "
                              f"multiple of {FLASH_BLOCK_SIZE} (leave block_size unset)")
        batched = self.max_num_batched_tokens or max(2048, max_model_len)
        return CacheConfig(block_size, self.gpu_memory_utilization, self.kv_cache_memory, max_model_len,
                           self.max_num_seqs, batched, self.enable_prefix_caching)


def kv_budget_bytes(config: CacheConfig, device: torch.device, warm_up: Callable[[], None]) -> int:
    """Bytes the KV cache may take: kv_cache_memory when given (or on CPU: 1 GiB by default), else the CUDA budget
    measured around `warm_up` (a forward at the largest step)."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type != "cuda":
        return DEFAULT_CPU_KV_MEMORY
    # Not run on a GPU yet (no GPU this session): follows nano-vllm's accounting.
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    warm_up()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
    return int(total * config.gpu_memory_utilization - (total - free) - (peak - current))


def num_blocks_for(config: CacheConfig, budget: int, bytes_per_token: int) -> int:
    """Blocks the budget holds, capped at what max_num_seqs sequences of max_model_len need; a ConfigError when not
    even one sequence of max_model_len fits."""
    per_block = bytes_per_token * config.block_size
    blocks_per_seq = -(-config.max_model_len // config.block_size)
    num_blocks = min(max(budget, 0) // per_block, blocks_per_seq * config.max_num_seqs)
    if num_blocks < blocks_per_seq:
        raise ConfigError(f"the KV cache budget of {budget / 2**20:.1f} MiB holds {num_blocks * config.block_size} "
                          f"tokens, fewer than one sequence of max_model_len = {config.max_model_len} "
                          f"({blocks_per_seq * per_block / 2**20:.1f} MiB): raise kv_cache_memory / "
                          f"gpu_memory_utilization or lower max_model_len")
    return int(num_blocks)

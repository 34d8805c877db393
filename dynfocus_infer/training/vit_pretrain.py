"""`pretrain_vit(...)`: the first stage of training dynfocus-smol's visual path (issue 17): the ViT alone, on single
frames of many synthetic videos, with dense labels computed from the scene and no LLM.

Why a stage of its own: a ViT trained from scratch inside `train` sees 12 videos per step at ~3 s a step (the frozen
LLM is most of it), and after 2,000 steps its patch probe still could not tell shape kind (40% of shape patches,
below the most frequent kind; README). Without the LLM a step of 64 frames from 64 new videos costs well under a
second here, and the same ViT, on the same patch labels, then learns shape kind (README, issue 17: run 4's ViT saw
12,000 videos in its 1,000 steps, alongside the answer and scene-probe losses; this stage sees 64,000 in as many).
Two heads, used only here and never exported:

- the patch probe (training/probe.PatchProbe): each patch's colour and shape kind;
- the frame probe (probe.FrameProbe): which (shape, colour) pairs the frame shows, from the mean of its patch tokens,
  so that pooled tokens (the connector's) carry which shape has which colour. It is not what teaches shape kind: a
  scratch run without it (--frame-weight 0) reached a higher patch kind accuracy in the same time (README).

`train --init-vit OUT/vit.safetensors` then starts the whole visual path from this ViT. Seeded and resumable as
`train` is: step s draws videos (2 << 40) + s * frames + i of the seed (disjoint from train's answered and
probe-only videos), each one frame chosen by a generator seeded with (seed, video, 2).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DynFocusError
from ..preprocess import preprocess_frames
from ..synthetic.render import render_frames
from ..synthetic.scene import sample_scene
from .checkpoint import atomic_write, read_checkpoint
from .probe import FrameProbe, PatchProbe, frame_pairs, patch_loss, patch_targets
from .trainer import learning_rate

CHECKPOINT = "vit_checkpoint.pt"
EXPORT = "vit.safetensors"
FORMAT = 1
FIRST_VIDEO = 2 << 40
SAME_ON_RESUME = ("model", "seed", "frames", "lr", "weight_decay", "frame_weight")


@dataclass
class PretrainConfig:
    """One ViT pretraining run. steps: total optimizer steps (a resumed run continues up to it)."""

    out: str
    model: str = "dynfocus-smol-shapes"
    steps: int = 1500
    frames: int = 64               # frames per step, each from a new video
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 20
    seed: int = 0
    frame_weight: float = 5.0      # the frame probe's loss weight (0: the patch probe alone)
    checkpoint_every: int = 50
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps", "frames", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 1")
        for name in ("seed", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 0")
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ConfigError(f"--lr {self.lr!r} is invalid: expected a number in (0, 1)")
        if not self.frame_weight >= 0 or not self.weight_decay >= 0 or not self.grad_clip > 0:
            raise ConfigError("--frame-weight and --weight-decay must be >= 0 and the gradient clip > 0")


def pretrain_batch(seed: int, step: int, frames: int, image_size: int, grid: int):
    """(pixels [frames, 3, S, S], patch colour and kind labels [frames, grid^2], pairs [frames, 18]) of step `step`:
    one frame of each of `frames` new videos (module doc)."""
    pixels, colours, kinds, pairs = [], [], [], []
    for video in range(FIRST_VIDEO + step * frames, FIRST_VIDEO + (step + 1) * frames):
        scene = sample_scene(seed, video)
        frame = int(np.random.default_rng([seed, video, 2]).integers(scene.num_frames))
        pixels.append(preprocess_frames(torch.from_numpy(render_frames(scene, [frame])), image_size=image_size))
        colour, kind = patch_targets(scene, [frame], grid)
        colours.append(colour)
        kinds.append(kind)
        pairs.append(frame_pairs(scene, frame))
    return torch.cat(pixels), torch.cat(colours), torch.cat(kinds), torch.stack(pairs)


def pretrain_loss(vit, patch_probe, frame_probe, batch, frame_weight: float):
    """(total, patch loss, frame loss) of one batch (pretrain_batch's tuple, on the ViT's device)."""
    pixels, colours, kinds, pairs = batch
    tokens = vit(pixels)[:, 1:]
    patch = patch_loss(patch_probe(tokens), [{"patch_colour": colours, "patch_kind": kinds}])
    frame = F.binary_cross_entropy_with_logits(frame_probe(tokens), pairs)
    return patch + frame_weight * frame, patch, frame


@torch.no_grad()
def held_out_accuracy(vit, patch_probe, frame_probe, seed: int, frames: int = 256) -> dict:
    """The heads' accuracy on `frames` frames of videos of data seed `seed` (one per video, as in training):
    patch_colour / patch_kind over the patches a shape covers (kind among background and the three kinds), the
    share of the most frequent kind among them (patch_kind_majority), and frame_kind: for each colour a frame shows,
    whether the frame probe scores a present kind highest among the three kinds of that colour."""
    was_training = vit.training
    vit.eval()
    device = next(vit.parameters()).device
    config = vit.config
    pixels, colours, kinds, pairs = (t.to(device) for t in pretrain_batch(seed, 0, frames, config.image_size,
                                                                          config.grid))
    tokens = vit(pixels)[:, 1:]
    logits = patch_probe(tokens)
    shape = kinds.flatten() > 0
    kind_labels = kinds.flatten()[shape]
    pair_logits = frame_probe(tokens).view(frames, 3, -1)            # [frame, kind, colour]
    present = pairs.view(frames, 3, -1) > 0
    shown = present.any(dim=1)                                      # [frame, colour]
    best = pair_logits.argmax(dim=1, keepdim=True)                  # the highest-scored kind of each colour
    hit = present.gather(1, best).squeeze(1)
    vit.train(was_training)
    return {"frames": frames, "seed": seed, "shape_patches": int(shape.sum()),
            "patch_colour": (logits["patch_colour"].argmax(-1)[shape]
                             == colours.flatten()[shape]).float().mean().item(),
            "patch_kind": (logits["patch_kind"].argmax(-1)[shape] == kind_labels).float().mean().item(),
            "patch_kind_majority": torch.bincount(kind_labels).max().item() / max(1, len(kind_labels)),
            "frame_kind": hit[shown].float().mean().item(), "frame_colours": int(shown.sum())}


def _save_checkpoint(out: Path, vit, heads, optimizer, step: int, losses: list, settings: dict) -> None:
    payload = {"format": FORMAT, "kind": "vit-pretrain", "step": step, "config": settings,
               "vit": {k: v.detach().clone() for k, v in vit.state_dict().items()},
               "heads": [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads],
               "optimizer": optimizer.state_dict(), "losses": list(losses), "torch_rng": torch.get_rng_state()}
    atomic_write(out / CHECKPOINT, lambda name: torch.save(payload, name))
    atomic_write(out / "vit_losses.jsonl", lambda name: Path(name).write_text(
        "".join(json.dumps({"step": i + 1, **loss}) + "\n" for i, loss in enumerate(losses))))


def export_vit(out: Path, vit, settings: dict) -> Path:
    """out/vit.safetensors (keys as in the ViT's state dict) with the run's settings in its metadata, and
    out/vit_config.json."""
    from safetensors.torch import save_file

    path = out / EXPORT
    state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    metadata = {"kind": "vit-pretrain", "config": json.dumps(settings, sort_keys=True)}
    atomic_write(path, lambda name: save_file(state, name, metadata=metadata))
    atomic_write(out / "vit_config.json", lambda name: Path(name).write_text(json.dumps(settings, indent=2) + "\n"))
    return path


def read_pretrained_vit(path: str, *, model: str, seed: int) -> tuple[dict, dict]:
    """(state dict, settings) of a vit.safetensors that pretrain_vit exported for preset `model` on data seed `seed`;
    CheckpointError / ConfigError naming the file and what is wrong otherwise (weights pretrained on another seed are
    refused: eval's held-out check reads the training seed alone)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"--init-vit {path!r} does not exist (pretrain-vit writes OUT/{EXPORT})")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(f"--init-vit {path!r} is not a readable safetensors file: {error}") from error
    if metadata.get("kind") != "vit-pretrain":
        raise CheckpointError(f"--init-vit {path!r} was not written by pretrain-vit (no vit-pretrain metadata)")
    settings = json.loads(metadata["config"])
    if settings.get("model") != model or settings.get("seed") != seed:
        raise ConfigError(f"--init-vit {path!r} was pretrained for --model {settings.get('model')!r} on seed "
                          f"{settings.get('seed')!r}; this run is --model {model!r}, --seed {seed}: use the same")
    return state, settings


def load_vit_state(vit, state: dict, path: str) -> None:
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"--init-vit {path!r} does not fit this ViT ({error})") from error


def pretrain_vit(config: PretrainConfig, *, resume: bool = False, progress: bool = True,
                 on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Runs (or resumes) ViT pretraining to config.steps; returns {"losses", "step", "steps_run", "seconds_per_step",
    "weights", "held_out"}."""
    from ..presets import load_model

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    payload = (read_checkpoint(out, CHECKPOINT, "ViT pretraining checkpoint", FORMAT, "vit-pretrain") if resume
               else None)
    if payload is not None:
        different = [k for k in SAME_ON_RESUME if payload["config"].get(k) != getattr(config, k)]
        if different:
            shown = ", ".join(f"{k} {payload['config'].get(k)!r} there, {getattr(config, k)!r} here" for k in different)
            raise ConfigError(f"--resume: the checkpoint in {out} was pretrained with other settings ({shown})")
    elif (out / CHECKPOINT).exists():
        raise ConfigError(f"--out {str(out)!r} already holds a ViT checkpoint: pass --resume to continue it, or "
                          f"choose another folder")
    loaded = load_model(config.model, device=config.device, dtype=torch.float32, seed=config.seed)
    if loaded.model.text_only:
        raise ConfigError(f"--model {config.model!r} has no ViT to pretrain")
    out.mkdir(parents=True, exist_ok=True)
    vit = loaded.model.vit.train().requires_grad_(True)
    del loaded  # the LLM is not used here
    width, image_size, grid = vit.config.width, vit.config.image_size, vit.config.grid
    torch.manual_seed(config.seed)
    heads = [PatchProbe(width).to(config.device), FrameProbe(width).to(config.device)]
    parameters = list(vit.parameters()) + [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    step, losses = 0, []
    if payload is not None:
        vit.load_state_dict(payload["vit"])
        for head, state in zip(heads, payload["heads"]):
            head.load_state_dict(state)
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        step, losses = payload["step"], list(payload["losses"])
    settings = asdict(config)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=step, unit="step", desc="pretrain-vit", dynamic_ncols=True)
    started, first_step = time.perf_counter(), step
    try:
        while step < config.steps:
            batch = [t.to(config.device) for t in pretrain_batch(config.seed, step, config.frames, image_size, grid)]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            total, patch, frame = pretrain_loss(vit, *heads, batch, config.frame_weight)
            if not torch.isfinite(total):
                raise DynFocusError(f"step {step + 1}: the loss is {total.item()}; lower --lr")
            total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            step += 1
            losses.append({"loss": total.item(), "patch": patch.item(), "frame": frame.item()})
            if bar is not None:
                bar.set_postfix(patch=f"{patch.item():.3f}", frame=f"{frame.item():.3f}")
                bar.update(1)
            if on_step is not None:
                on_step(step, total.item())
            if step % config.checkpoint_every == 0 or step == config.steps:
                _save_checkpoint(out, vit, heads, optimizer, step, losses, settings)
    except KeyboardInterrupt:
        if step > first_step and step % config.checkpoint_every:
            _save_checkpoint(out, vit, heads, optimizer, step, losses, settings)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    held_out = held_out_accuracy(vit, *heads, seed=config.seed + 1)
    weights = export_vit(out, vit, {**settings, "held_out": held_out})
    return {"losses": losses, "step": step, "weights": str(weights), "held_out": held_out,
            "steps_run": step - first_step,
            "seconds_per_step": elapsed / max(1, step - first_step)}

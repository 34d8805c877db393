"""Training checkpoints: the visual weights, the optimizer, the step, the loss history and the RNG state, written
to a temporary file and renamed (an interrupted write leaves the previous checkpoint whole). The frozen LLM is not
saved: it comes from its package. `export_visual` writes the trained visual path as safetensors + config.json."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
VISUAL_PARTS = ("vit", "qformer", "connector")
FORMAT = 2                        # 2: the probes' weights and per-part losses


def visual_state(model) -> dict:
    return {f"{part}.{name}": tensor.detach().clone() for part in VISUAL_PARTS
            for name, tensor in getattr(model, part).state_dict().items()}


def load_visual_state(model, state: dict, source: str) -> None:
    for part in VISUAL_PARTS:
        prefix = f"{part}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(model, part).load_state_dict(sub, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{source}: its {part} weights do not fit this model ({error}); was it trained "
                                  f"with another --model?") from error


def atomic_write(path: Path, write) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(handle)
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _state(module):
    return None if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, *, model, optimizer, step: int, losses: list, config: dict, probe=None,
                    patch_probe=None) -> Path:
    """losses: one {"loss", "answer", "probe", "patch", "norm"} per step."""
    payload = {"format": FORMAT, "step": step, "visual": visual_state(model), "optimizer": optimizer.state_dict(),
               "losses": list(losses), "config": dict(config), "torch_rng": torch.get_rng_state(),
               "probe": _state(probe), "patch_probe": _state(patch_probe)}
    path = Path(out) / CHECKPOINT
    atomic_write(path, lambda name: torch.save(payload, name))
    atomic_write(Path(out) / "losses.jsonl", lambda name: Path(name).write_text(
        "".join(json.dumps({"step": i + 1, **loss}) + "\n" for i, loss in enumerate(losses))))
    return path


def read_checkpoint(out: Path, name: str = CHECKPOINT, what: str = "training checkpoint", fmt: int = FORMAT,
                    kind: str = None) -> dict:
    """The payload of out/name; CheckpointError naming the file when it is missing, unreadable, or not a `what` of
    format `fmt` (and, when given, whose "kind" is `kind`)."""
    path = Path(out) / name
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} does not exist; start without --resume to begin from scratch")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(f"{path} is not a readable {what}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != fmt or (kind and payload.get("kind") != kind):
        raise CheckpointError(f"{path} is not a {what} of format {fmt}")
    return payload


def export_visual(out: Path, model, config: dict) -> Path:
    """out/visual.safetensors (the trained ViT, Q-Former and connector) and out/visual_config.json (the preset,
    its sizes and the training settings that produced the weights)."""
    from safetensors.torch import save_file

    path = Path(out) / "visual.safetensors"
    state = {k: v.contiguous() for k, v in visual_state(model).items()}
    atomic_write(path, lambda name: save_file(state, name, metadata={"model": str(config.get("model"))}))
    sizes = model.config
    described = {"training": config, "vit": vars(sizes.vit), "qformer": vars(sizes.qformer),
                 "connector": {k: v for k, v in vars(sizes.connector).items()}}
    atomic_write(Path(out) / "visual_config.json",
                  lambda name: Path(name).write_text(json.dumps(described, indent=2, default=list) + "\n"))
    return path

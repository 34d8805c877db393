"""Training the visual path of a small DynFocus preset on synthetic shape videos (issue 17): data.py (batches in
memory), loss.py (the training forward through the engine's prompt and connector), checkpoint.py (atomic
checkpoints, safetensors export), trainer.py (`train`)."""
from .trainer import TrainConfig, prepare_model, train

__all__ = ["TrainConfig", "prepare_model", "train"]

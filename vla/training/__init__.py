"""Training with Accelerate: the loop, atomic resumable checkpoints, EMA, fine-tuning, logging.

`train(cfg)` is what `train.py` calls; the pieces are importable for tests and tools:
`vla.training.layout` (where a run keeps its checkpoints, `resolve_pretrained`; no torch import),
`vla.training.checkpoint` (saving and exact resume), `vla.training.finetune`, `vla.training.ema`.

The loop is imported on first use, so tools that only locate checkpoints stay light.
"""

from typing import Any

from vla.training.layout import resolve_pretrained

__all__ = ["TrainingDiverged", "fit", "resolve_pretrained", "train"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "train"):
        from vla.training import loop

        return getattr(loop, name)
    if name == "TrainingDiverged":
        from vla.training.metrics import TrainingDiverged

        return TrainingDiverged
    raise AttributeError(f"module 'vla.training' has no attribute {name!r}")

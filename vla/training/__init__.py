"""Training with Accelerate: the loop, atomic resumable checkpoints, EMA, fine-tuning, logging.

`train(cfg)` is what `train.py` calls; the pieces are importable for tests and tools:
`vla.training.checkpoint` (layout, `resolve_pretrained`), `vla.training.finetune`, `vla.training.ema`.
"""

from vla.training.checkpoint import resolve_pretrained
from vla.training.loop import fit, train
from vla.training.metrics import TrainingDiverged

__all__ = ["TrainingDiverged", "fit", "resolve_pretrained", "train"]

"""Exponential moving average of a policy's trainable weights.

Diffusion and flow heads sample noticeably better from averaged weights, so when `train.ema_decay > 0` the
checkpoint's `pretrained_model/` holds the EMA weights (what evaluation loads) while the raw weights travel in
`training_state/` for resuming. The shadow copy lives in fp32 on the parameters' device and is keyed by parameter
name, so it saves to safetensors and reloads exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class EMA:
    """Shadow weights `s <- d * s + (1 - d) * p`, stepped once per optimiser step.

    The decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates, so early in training (and in short
    fine-tuning runs) the average is not dominated by the random initialisation.

    Args:
        model: the unwrapped policy; only parameters with `requires_grad` are averaged (frozen ones never change).
        decay: the asymptotic decay, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("EMA: the model has no trainable parameters")

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def _tracked(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the model does not have: {missing[:5]}")
        return [params[n] for n in self.shadow]

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        params = [p.detach().float() for p in self._tracked(model)]
        torch._foreach_lerp_(list(self.shadow.values()), params, weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (e.g. to save or evaluate it), then restore the raw ones."""
        params = self._tracked(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow.values(), strict=True):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.shadow.items()}
        save_file(tensors, str(path), metadata={"decay": repr(self.decay), "num_updates": str(self.num_updates)})

    def load(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if set(tensors) != set(self.shadow):
            extra, missing = sorted(set(tensors) - set(self.shadow)), sorted(set(self.shadow) - set(tensors))
            raise KeyError(f"EMA state in {path} does not match the model: unexpected {extra[:5]}, missing {missing[:5]}")
        for name, t in tensors.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state in {path}: '{name}' has shape {tuple(t.shape)}, "
                                 f"the model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(t)
        self.num_updates = int(meta.get("num_updates", 0))

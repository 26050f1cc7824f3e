"""The hand-off between a backbone and the action transformer.

It belongs to neither side: backbones produce a `Prefix`, the action head consumes one, and the two meet only in
the policy, so `vla.backbones` and `vla.action` both import this module and never each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prefix:
    """Image + instruction features the action tokens attend to.

    Attributes:
        tokens: (B, P, D) the backbone's final prefix tokens.
        mask: (B, P) bool, True for tokens that may be attended to (missing cameras and padding are False).
        layers: optional per-layer hidden states [(B, P, D_l)] of the backbone, for pi0-style layerwise attention
            where action layer i attends to backbone layer i * len(layers) // depth.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    layers: list[torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return self.tokens.shape[-1]

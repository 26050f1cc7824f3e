"""What every backbone promises the policy: one call signature, checked inputs, a `Prefix` out.

A backbone turns the cameras of a batch and its instructions into the prefix tokens the action transformer
attends to. The contract lives here so the compact encoder and the Hugging Face VLM wrapper differ only in how they
encode, never in what they accept or return:

    prefix = backbone(images, image_mask, tasks)
    images      (B, n_cam, 3, H, W) float in [0, 1], cameras in the order given at construction, H = W = image_size
    image_mask  (B, n_cam) bool, False where the sample has no such camera (its pixels are ignored)
    tasks       list of B instruction strings
    prefix      Prefix(tokens (B, P, width), mask (B, P) bool, layers: num_layers x (B, P, D_l) or None)

Tokens of a missing camera are either never produced or produced with mask False: they are never attended to.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from vla.backbones.prefix import Prefix

EXTRA_DIR = "backbone"
"""Sub-folder of a checkpoint directory where `save_extra` writes the backbone's non-weight files."""

_RANGE_TOLERANCE = 1e-3
"""Slack on the [0, 1] pixel range check (resampling and colour jitter can overshoot by a rounding error)."""


class Backbone(nn.Module, abc.ABC):
    """Base class of every backbone: validates the inputs, then calls `encode`.

    Attributes:
        cameras: canonical camera names, in the order of the `images` camera axis.
        image_size: the square resolution every camera arrives at.
        width: width D of `Prefix.tokens`.
        num_layers: length of `Prefix.layers` when the backbone exposes per-layer states, else None.

    Trainable parameters are exactly those with `requires_grad=True` (frozen parts are switched off at
    construction), so `trainable_parameters()` is what an optimiser should receive. Parts that are not weights
    (tokenizers, processors, model configs) are written by `save_extra(checkpoint_dir)` and read back by
    `make_backbone(..., checkpoint_dir=checkpoint_dir)`; weights always travel in the policy's state_dict.
    """

    width: int
    num_layers: int | None = None

    def __init__(self, cameras: Sequence[str], image_size: int) -> None:
        super().__init__()
        if not cameras:
            raise ValueError("a backbone needs at least one camera name")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"camera names must be unique, got {list(cameras)}")
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: Sequence[str]) -> Prefix:
        """Encode a batch; see the module docstring for shapes. Raises ValueError on malformed inputs."""
        self.check_inputs(images, image_mask, tasks)
        return self.encode(images, image_mask, list(tasks))

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: list[str]) -> Prefix:
        """Encode inputs that `check_inputs` accepted."""

    def check_inputs(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: Sequence[str]) -> None:
        """Raise ValueError naming the first problem with the inputs, before any work is done."""
        n, s = len(self.cameras), self.image_size
        expected = f"(B, {n}, 3, {s}, {s}) for cameras {list(self.cameras)}"
        if not isinstance(images, torch.Tensor) or images.ndim != 5:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape {expected}, got {got}")
        b = images.shape[0]
        if images.shape[1] != n:
            raise ValueError(f"images has {images.shape[1]} cameras, expected {n}: shape {expected}, "
                             f"got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (3, s, s):
            raise ValueError(f"images must be {expected}, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype} (convert uint8 with /255)")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"images must be in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
        if not isinstance(image_mask, torch.Tensor) or image_mask.dtype != torch.bool:
            got = image_mask.dtype if isinstance(image_mask, torch.Tensor) else type(image_mask).__name__
            raise ValueError(f"image_mask must be a bool tensor of shape ({b}, {n}), got {got}")
        if tuple(image_mask.shape) != (b, n):
            raise ValueError(f"image_mask must have shape ({b}, {n}), got {tuple(image_mask.shape)}")
        if isinstance(tasks, str) or len(tasks) != b:
            got = "a single string" if isinstance(tasks, str) else f"{len(tasks)} tasks"
            raise ValueError(f"tasks must be a list of {b} instruction strings (one per sample), got {got}")
        bad = [i for i, t in enumerate(tasks) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"tasks must be strings; entry {bad[0]} is {type(tasks[bad[0]]).__name__}")

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for every parameter that receives gradients."""
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)

    def save_extra(self, checkpoint_dir: str | Path) -> Path:
        """Write what the state_dict does not hold into `checkpoint_dir/backbone/` (created) and return that
        folder; `make_backbone(..., checkpoint_dir=checkpoint_dir)` rebuilds from it without downloading."""
        path = Path(checkpoint_dir) / EXTRA_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

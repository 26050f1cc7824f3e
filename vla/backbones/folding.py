"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a per-channel affine map of its convolution's output, so it can be merged into that
convolution's weights and bias: one pass over the feature map less per block, the same function to float rounding.
On the tiny-cpu encoder (RegNetX-200MF, 2 cameras x 128 px, 44 conv-BN pairs) that saves 2-3 ms of a batch-1
query's 16-18 ms on this CPU (15.9 -> 13.6, 16.0 -> 13.1, 17.9 -> 15.7 ms in three side-by-side runs). The folded
encoder is a separate copy: the trained module, its state_dict and its checkpoints never change, and the copy is
rebuilt whenever the source's weights do.
"""

from __future__ import annotations

import copy
import logging

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vla.weight_version import WeightVersion

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-4
"""Largest accepted difference between folded and source outputs, relative to the outputs' largest magnitude."""


class _AfterNorm(nn.Module):
    """What a timm norm-act layer still does once its normalisation moved into the convolution."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


_NORMS = (nn.BatchNorm2d, BatchNormAct2d)
"""Exact types folded (a subclass may do something else in its forward)."""

_PAIRS = (("conv", "bn"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
"""Attribute names of a convolution and the BatchNorm applied directly to its output (timm's ConvNormAct and
ResNet blocks); `nn.Sequential` children are paired when a BatchNorm directly follows a convolution."""


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a convolution merged into it.

    Returns (copy, number of folded pairs). Pairs are found by position (named pairs, consecutive Sequential
    children), which is where timm's CNNs put them; `FoldedCopy` compares the result with the source once, so a
    model whose forward does something else between the pair is caught and served unfolded.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        names = list(module._modules)
        pairs = zip(names, names[1:], strict=False) if isinstance(module, nn.Sequential) else _PAIRS
        for conv_name, norm_name in pairs:
            conv, norm = module._modules.get(conv_name), module._modules.get(norm_name)
            if (isinstance(conv, nn.Conv2d) and type(norm) in _NORMS and norm.track_running_stats
                    and norm.running_mean is not None):
                module._modules[conv_name] = _fused(conv, norm)
                module._modules[norm_name] = _AfterNorm(norm)
                count += 1
    return folded, count


def _fused(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    fused = fuse_conv_bn_eval(conv, norm)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
    return fused


class FoldedCopy:
    """Serves a BatchNorm-folded copy of a module, rebuilt when the source's weights or statistics change.

    Held as a plain attribute (not a submodule), so it is in no state_dict and no optimiser.
    `get(source, forward_name, x)` returns the module to call `forward_name(x)` on: on a rebuild the copy is checked
    against the source on this very input, and a copy that does not reproduce the source (a model that does more
    than conv -> BatchNorm between the pair) is dropped for good, with a warning, and the source is served.
    """

    def __init__(self) -> None:
        self._version = WeightVersion(buffers=True)
        self._key = None
        self._copy: nn.Module | None = None
        self.usable = True

    def clear(self) -> None:
        self._key, self._copy = None, None

    def get(self, source: nn.Module, forward_name: str, x: torch.Tensor) -> nn.Module:
        if not self.usable:
            return source
        key = self._version.key(source)
        if key != self._key:  # clear() resets the key too
            self._copy, self._key = None, key
            folded, count = fold_batchnorm(source)
            if count == 0:
                self.usable = False
                return source
            ref, out = getattr(source, forward_name)(x), getattr(folded, forward_name)(x)
            err = (ref - out).abs().max().item() / max(ref.abs().max().item(), 1.0)
            if err > _TOLERANCE:
                logger.warning("BatchNorm folding changed %s's output by %.2g (relative); serving it unfolded",
                               type(source).__name__, err)
                self.usable = False
                return source
            self._copy = folded
        return self._copy

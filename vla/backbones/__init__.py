"""Backbones: cameras + instruction -> `Prefix` tokens for the action transformer.

    backbone = make_backbone(cfg.backbone, cameras=cfg.data.cameras, image_size=cfg.data.image_size)
    prefix = backbone(images, image_mask, tasks)        # see vla/backbones/base.py for shapes

Checkpoints: the weights are in the policy's state_dict; `backbone.save_extra(checkpoint_dir)` writes the rest
(processor, model config, a HF text encoder) into `checkpoint_dir/backbone/`, and
`make_backbone(..., checkpoint_dir=checkpoint_dir)` rebuilds the same architecture from those files alone (nothing
is downloaded; the weights are fresh until the policy loads its state_dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vla.backbones.base import EXTRA_DIR, Backbone
from vla.backbones.prefix import Prefix
from vla.config import BackboneConfig, ConfigError

__all__ = ["EXTRA_DIR", "Backbone", "Prefix", "make_backbone"]


def make_backbone(cfg: BackboneConfig, cameras: Sequence[str], image_size: int,
                  checkpoint_dir: str | Path | None = None) -> Backbone:
    """Build the backbone `cfg.kind` for `cameras` at `image_size` px.

    Args:
        cfg: backbone settings (validated here).
        cameras: canonical camera names, in the order of the images' camera axis.
        image_size: square resolution of every camera image.
        checkpoint_dir: a directory given to `backbone.save_extra`: rebuild from its `backbone/` files instead of
            `cfg.model_name_or_path` / pretrained timm weights (the policy's state_dict then provides the weights).
    """
    cfg.validate()
    if checkpoint_dir is not None and not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    if cfg.kind == "compact":
        from vla.backbones.compact import CompactBackbone

        return CompactBackbone(cfg, cameras, image_size, checkpoint_dir=checkpoint_dir)
    if cfg.kind == "hf_vlm":
        from vla.backbones.hf_vlm import HFVLMBackbone

        return HFVLMBackbone(cfg, cameras, image_size, checkpoint_dir=checkpoint_dir)
    raise ConfigError(f"backbone.kind must be 'compact' or 'hf_vlm', got '{cfg.kind}'")

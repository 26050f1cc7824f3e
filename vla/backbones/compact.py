"""The compact backbone: one timm image encoder shared by all cameras + a small instruction encoder.

    images (B, n_cam, 3, H, W) --present cameras only--> timm features (M, C, h, w)
        --adaptive pool--> (M, g*g, C) --linear--> (M, T, width) + camera embedding + grid position embedding
    tasks (B strings) --> text tokens (B, L, width)
    prefix = [image tokens of every camera, text tokens]                  (B, n_cam * T + L, width)

The encoder runs only on cameras a sample has; a missing camera's T tokens are zeros with mask False. One encoder
for every camera keeps the parameter count and the per-step cost of a second camera low; the learned per-camera
embedding tells the action transformer which view a token came from. Tokens are not layer-normalised here: a
per-token LayerNorm discards each token's magnitude, which is where a from-scratch CNN first encodes "something is
in this cell" (it slowed the localisation probe in bench/bench_backbones.py about threefold).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla.backbones.base import EXTRA_DIR, Backbone
from vla.backbones.folding import FoldedCopy
from vla.backbones.prefix import Prefix
from vla.backbones.text import FrozenTextEncoder, HashedWordEmbedding, minilm_path
from vla.config import BackboneConfig

logger = logging.getLogger(__name__)

TEXT_ENCODER_DIR = "text_encoder"
"""Folder inside the backbone's extra files holding a Hugging Face text encoder given by hub id or path."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CompactBackbone(Backbone):
    """timm vision encoder per camera (shared weights) + text encoder -> `Prefix` of width `cfg.width`.

    Args:
        cfg: backbone settings; uses vision_model, vision_pretrained, text_model, width, tokens_per_image,
            max_text_tokens, freeze ("vision" freezes the timm encoder, "language" the text encoder's own
            weights; the projections to `width` always train), gradient_checkpointing, dtype (of the timm
            encoder), channels_last.
        cameras: canonical camera names, in the order of the images' camera axis.
        image_size: square input resolution.
        checkpoint_dir: a directory given to `save_extra`: rebuild without downloading (pretrained timm weights
            are not fetched, the policy's state_dict overwrites them; a HF text encoder is read from there).
    """

    def __init__(self, cfg: BackboneConfig, cameras: Sequence[str], image_size: int,
                 checkpoint_dir: str | Path | None = None) -> None:
        super().__init__(cameras, image_size)
        self._folded = FoldedCopy()  # BatchNorm folded into the convolutions, for gradient-free eval calls
        self.cfg = cfg
        self.width = cfg.width
        self.num_layers = None
        self.grid = math.isqrt(cfg.tokens_per_image)
        self.tokens_per_image = self.grid**2
        self.channels_last = cfg.channels_last

        pretrained = cfg.vision_pretrained and checkpoint_dir is None
        self.vision = timm.create_model(cfg.vision_model, pretrained=pretrained, num_classes=0, global_pool="")
        data_cfg = timm.data.resolve_model_data_config(self.vision)
        self.register_buffer("pixel_mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        if cfg.gradient_checkpointing:
            self.vision.set_grad_checkpointing(True)
        self.vision.to(_DTYPES[cfg.dtype])
        if self.channels_last:
            self.vision.to(memory_format=torch.channels_last)

        self.image_proj = nn.Linear(self.vision.num_features, self.width)
        self.camera_embed = nn.Parameter(torch.zeros(len(self.cameras), self.width))
        # 2-D sin-cos init: where a token sits in the image is legible from the first step (learned after)
        self.image_pos_embed = nn.Parameter(_sincos_2d(self.grid, self.width))
        nn.init.normal_(self.camera_embed, std=0.02)

        extra = Path(checkpoint_dir) / EXTRA_DIR if checkpoint_dir is not None else None
        self.text = _make_text_encoder(cfg, extra)

        if cfg.freeze in ("vision", "all"):
            self.vision.requires_grad_(False)
        if cfg.freeze in ("language", "all") and isinstance(self.text, HashedWordEmbedding):
            self.text.requires_grad_(False)  # a pretrained text encoder is frozen whatever `freeze` says
        self.train()

    # ---- nn.Module ---------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> CompactBackbone:
        """A frozen vision encoder stays in eval mode, so its BatchNorm statistics stay fixed too. The folded
        inference copy is dropped on every switch (weights written through `.data`, as EMA swaps may do, leave no
        trace a version check could see)."""
        super().train(mode)
        self._folded.clear()
        if self.cfg.freeze in ("vision", "all"):
            self.vision.eval()
        return self

    # ---- encoding ----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: list[str]) -> Prefix:
        b, n = image_mask.shape
        t = self.tokens_per_image
        flat = rearrange(images, "b n c h w -> (b n) c h w")
        present = rearrange(image_mask, "b n -> (b n)")
        if bool(present.all()):
            image_tokens = self.encode_images(flat)
        else:  # run the encoder only on cameras that exist; the others keep zero, masked tokens
            image_tokens = self.image_proj.weight.new_zeros(b * n, t, self.width)
            if bool(present.any()):
                image_tokens = image_tokens.index_put((present,), self.encode_images(flat[present]))
        image_tokens = rearrange(image_tokens, "(b n) t d -> b n t d", b=b)
        image_tokens = image_tokens + self.camera_embed[None, :, None] + self.image_pos_embed[None, None]
        image_tokens = rearrange(image_tokens, "b n t d -> b (n t) d")
        image_tokens_mask = repeat(image_mask, "b n -> b (n t)", t=t)

        text_tokens, text_mask = self.text(tasks)
        tokens = torch.cat([image_tokens, text_tokens.to(image_tokens.dtype)], dim=1)
        return Prefix(tokens=tokens, mask=torch.cat([image_tokens_mask, text_mask], dim=1))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (M, 3, H, W) in [0, 1] -> image tokens (M, tokens_per_image, width), before embeddings."""
        dtype = next(self.vision.parameters()).dtype  # read, not stored: `.to(dtype)` may change it later
        x = ((pixels - self.pixel_mean) / self.pixel_std).to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        vision = self.vision
        if not torch.is_grad_enabled() and not vision.training and dtype == torch.float32:
            vision = self._folded.get(vision, "forward_features", x)
        feats = vision.forward_features(x)
        feats = _as_feature_map(feats, self.vision)  # (M, C, h, w)
        feats = F.adaptive_avg_pool2d(feats.to(self.image_proj.weight.dtype), self.grid)
        return self.image_proj(rearrange(feats, "m c h w -> m (h w) c"))

    # ---- extra files -------------------------------------------------------------------------------------------
    def save_extra(self, checkpoint_dir: str | Path) -> Path:
        """Save a Hugging Face text encoder given by hub id/path (MiniLM ships with vla; the hash embedding has
        no files); the timm encoder is fully described by its name and its weights live in the state_dict."""
        path = super().save_extra(checkpoint_dir)
        if isinstance(self.text, FrozenTextEncoder) and self.cfg.text_model != "minilm":
            self.text.tokenizer.save_pretrained(path / TEXT_ENCODER_DIR)
            self.text.encoder.save_pretrained(path / TEXT_ENCODER_DIR)
        return path


def _make_text_encoder(cfg: BackboneConfig, extra_dir: str | Path | None) -> nn.Module:
    if cfg.text_model == "embedding":
        return HashedWordEmbedding(cfg.width, cfg.max_text_tokens)
    if cfg.text_model == "minilm":
        return FrozenTextEncoder(minilm_path(), cfg.width, cfg.max_text_tokens)
    source = cfg.text_model
    if extra_dir is not None and (Path(extra_dir) / TEXT_ENCODER_DIR).is_dir():
        source = str(Path(extra_dir) / TEXT_ENCODER_DIR)
    logger.info("compact backbone: frozen text encoder from %s", source)
    return FrozenTextEncoder(source, cfg.width, cfg.max_text_tokens)


def _as_feature_map(feats: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """timm `forward_features` output -> (M, C, h, w): CNNs give NCHW, some hierarchical models NHWC, ViTs give
    (M, prefix + h*w, C) token sequences."""
    if feats.ndim == 4:
        return feats.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else feats
    if feats.ndim == 3:
        patches = feats[:, getattr(model, "num_prefix_tokens", 0):]
        side = math.isqrt(patches.shape[1])
        if side * side == patches.shape[1]:
            return rearrange(patches, "m (h w) c -> m c h w", h=side)
    raise ValueError(f"cannot read a square feature map from {type(model).__name__} features of shape "
                     f"{tuple(feats.shape)}; choose a CNN or a ViT with a square patch grid")


def _sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2-D sine-cosine position table: half the channels encode the row, half the column."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    table = [f(c.flatten()[:, None] * freqs[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    out = torch.zeros(grid * grid, width)
    out[:, : 4 * quarter] = torch.cat(table, dim=1)
    return out

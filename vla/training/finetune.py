"""Starting a run from another run's weights (fine-tuning onto new data or a new embodiment) and freezing parts.

The policy is built for the NEW run (its config, its data's embodiment registry and normalization statistics), then
every checkpoint tensor whose name and shape match is copied in. Whatever the checkpoint does not provide in the
right shape keeps its fresh initialisation and is reported by name. Building for the new run rather than loading
the old policy and patching it keeps the new run's choices (freezing, dropout, loss weights) and writes the new
config, registry and statistics into every checkpoint of the fine-tuned run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vla.config import VLAConfig
from vla.training.checkpoint import config_changes
from vla.training.layout import CONFIG_NAME, resolve_pretrained

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
ROUTER_TAG = "router"
"""Router parameters carry this in their names (`...ffn.router.proj.weight`)."""


@dataclass
class TransferReport:
    """Which tensors of the new policy came from the checkpoint and which were newly initialised."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    """Parameters/buffers the checkpoint lacks or has in another shape: freshly initialised."""
    unused: list[str] = field(default_factory=list)
    """Checkpoint tensors the new policy has no place for."""

    def summary(self) -> str:
        head = (f"initialised from {self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} newly "
                f"initialised, {len(self.unused)} checkpoint tensors unused")
        lines = [head]
        if self.new:
            lines.append("newly initialised: " + ", ".join(self.new))
        if self.unused:
            lines.append("unused from checkpoint: " + ", ".join(self.unused))
        return "\n".join(lines)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> TransferReport:
    """Copy every tensor of `state` whose name and shape match into `model`; report the rest.

    Raises ValueError if nothing matches (the checkpoint belongs to a different architecture altogether).
    """
    own = model.state_dict()
    report = TransferReport(source=source)
    matched = {}
    for name, target in own.items():
        src = state.get(name)
        if src is not None and src.shape == target.shape:
            matched[name] = src.to(dtype=target.dtype)
            report.loaded.append(name)
        else:
            report.new.append(name)
    report.unused = sorted(k for k in state if k not in own or state[k].shape != own[k].shape)
    if not matched:
        raise ValueError(f"no tensor of {source} matches the policy built from this run's config: "
                         "is it a vla checkpoint of a compatible architecture?")
    model.load_state_dict(matched, strict=False)
    return report


MODEL_DATA_FIELDS = ("unified_action_dim", "unified_state_dim", "cameras", "image_size")
"""Data settings that shape the model's tensors or inputs."""


def model_config_differences(cfg: VLAConfig, source_cfg: VLAConfig) -> list[str]:
    """Settings of the model sections (backbone, action, objective, model-shaping data fields) that differ, as
    "section.field: checkpoint -> now" lines."""
    old, new = source_cfg.to_dict(), cfg.to_dict()
    diffs = []
    for section in ("backbone", "action", "objective"):
        diffs += config_changes(old[section], new[section], prefix=f"{section}.")
    data_old = {k: old["data"][k] for k in MODEL_DATA_FIELDS}
    data_new = {k: new["data"][k] for k in MODEL_DATA_FIELDS}
    return diffs + config_changes(data_old, data_new, prefix="data.")


def init_from_checkpoint(model: nn.Module, path: str | Path, cfg: VLAConfig) -> TransferReport:
    """Load the weights of checkpoint `path` (a run dir, `last`, a step dir or a pretrained_model dir) into
    `model`, which was built for this run; log what was newly initialised and how the model configs differ."""
    src = resolve_pretrained(path)
    weights = src / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"train.init_from={path}: {weights} does not exist")
    if (src / CONFIG_NAME).is_file():
        for d in model_config_differences(cfg, VLAConfig.from_json(src / CONFIG_NAME)):
            logger.warning("fine-tuning with a changed model setting (checkpoint -> now): %s", d)
    report = load_matching(model, load_file(str(weights), device="cpu"), src)
    logger.info(report.summary())
    return report


def freeze_routers(model: nn.Module) -> list[str]:
    """Stop gradients to every router (MoDE fine-tunes with routers fixed); returns the frozen names.

    Raises ValueError if the model has no router (a config asking to freeze something that does not exist).
    """
    frozen = [name for name, p in model.named_parameters() if ROUTER_TAG in name]
    if not frozen:
        raise ValueError("train.freeze_routers is set but the policy has no router parameters "
                         "(action.layers has no 'as', 'hb' or 'nm' layer)")
    for name, p in model.named_parameters():
        if ROUTER_TAG in name:
            p.requires_grad_(False)
    return frozen

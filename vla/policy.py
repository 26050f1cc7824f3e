"""VLAPolicy: one vision-language-action policy whose parts are chosen by config.

    observation ──► prepare (normalize, unify, resize) ──► backbone ──► Prefix ──► action head ──► chunk
                                                                                   (MoE layers, flow/EDM, MoH)

Training calls `policy(batch)` with a batch from `vla.data.mixture` (already normalized and unified) and gets a
dict of losses. Inference calls `select_action(observation)` with a raw observation in the embodiment's own units
(LeRobot keys, see `vla.constants`); the same normalization statistics and embodiment registry that shaped the
training data turn it into model inputs and the predicted chunk back into the robot's own action space.

A checkpoint directory holds `config.json`, `model.safetensors`, the normalization statistics and the embodiment
registry, and is written atomically (temp dir + rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vla.action.head import ActionHead
from vla.backbones import make_backbone
from vla.config import VLAConfig, apply_overrides
from vla.constants import (
    ACTION,
    ACTION_IS_PAD,
    ACTION_MASK,
    EMBODIMENT,
    OBS_IMAGE_MASK,
    OBS_STATE,
    STATE_MASK,
    TASK,
    image_key,
)
from vla.data.embodiments import EmbodimentRegistry, default_registry
from vla.data.normalize import Normalizer
from vla.data.transforms import prepare_observation
from vla.layout import resolve_pretrained
from vla.prefix import Prefix

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match the code."""


class VLAPolicy(nn.Module):
    """Backbone + action head + the data conventions (registry, normalization) they were trained with.

    Args:
        config: the run's configuration (the model is built from `backbone`, `action`, `objective`, `data`).
        registry: embodiments the policy knows; defaults to the built-in registry.
        normalizer: per-embodiment statistics; required for inference on raw observations (training batches
            arrive normalized already).
        checkpoint_dir: rebuild the backbone from the files a checkpoint saved (no download, no pretrained
            weights: the state_dict provides them).
    """

    def __init__(
        self,
        config: VLAConfig,
        registry: EmbodimentRegistry | None = None,
        normalizer: Normalizer | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.config = config.validate()
        self.registry = registry if registry is not None else default_registry()
        self.normalizer = normalizer
        data = config.data
        self.backbone = make_backbone(config.backbone, tuple(data.cameras), data.image_size, checkpoint_dir=checkpoint_dir)
        self.head = ActionHead(
            config.action,
            config.objective,
            prefix_width=self.backbone.width,
            prefix_layers=self.backbone.num_layers,
            action_dim=data.unified_action_dim,
            state_dim=data.unified_state_dim,
        )
        self._queue: deque[torch.Tensor] = deque()

    # ---- training ----------------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses for a training batch (normalized, unified; see `vla.constants`). "loss" is the total."""
        prefix = self.encode(batch)
        return self.head.compute_loss(
            prefix,
            batch[OBS_STATE],
            batch[STATE_MASK],
            batch[ACTION],
            batch[ACTION_MASK],
            batch[ACTION_IS_PAD],
            noise=batch.get("noise"),
            time=batch.get("time"),
        )

    def encode(self, batch: Mapping[str, Any]) -> Prefix:
        """Backbone features of the batch's cameras (stacked in `config.data.cameras` order) and instructions."""
        images = torch.stack([batch[image_key(cam)] for cam in self.config.data.cameras], dim=1)
        return self.backbone(images, batch[OBS_IMAGE_MASK], list(batch[TASK]))

    def routing_stats(self, reset: bool = False) -> dict:
        """Per-layer expert usage (by embodiment descriptor and noise level) and MoH horizon weights."""
        return self.head.routing_stats(reset=reset)

    # ---- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(
        self, observation: Mapping[str, Any], noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, H, action_dim) actions in the embodiment's own units for a raw observation (batched or not)."""
        return self._predict(observation, noise)[0]

    @torch.no_grad()
    def _predict(
        self, observation: Mapping[str, Any], noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.normalizer is None:
            raise RuntimeError(
                "this policy has no normalization statistics: train it on a dataset or load it from a checkpoint"
            )
        batch, embodiment = prepare_observation(
            observation,
            registry=self.registry,
            normalizer=self.normalizer,
            data_cfg=self.config.data,
            default_embodiment=self.default_embodiment,
            device=self.device,
        )
        prefix = self.encode(batch)
        out = self.head.sample(prefix, batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK], noise=noise)
        emb = self.registry.get(embodiment)
        native = emb.action_from_unified(out.actions.float())
        native = self.normalizer.unnormalize(native, embodiment, "action")
        return native, getattr(out, "num_execute", None)

    @torch.no_grad()
    def select_action(self, observation: Mapping[str, Any]) -> torch.Tensor:
        """Next action (action_dim,) — or (B, action_dim) for a batched observation — from an action queue.

        A new chunk is predicted when the queue is empty; `action.n_action_steps` of it are queued, or with Mixture
        of Horizons dynamic inference as many as the horizons agree on (at least `moh.min_execute`).
        """
        if not self._queue:
            chunk, num_execute = self._predict(observation)
            n = self.config.action.n_action_steps
            if num_execute is not None and self.config.action.moh.dynamic:
                n = int(num_execute.min().item())
            self.last_num_execute = n
            for t in range(n):
                self._queue.append(chunk[:, t])
        action = self._queue.popleft()
        return action[0] if _is_unbatched(observation) else action

    def needs_observation(self) -> bool:
        """True when the next `select_action` will run the model (so a simulator only renders then)."""
        return not self._queue

    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()

    @property
    def default_embodiment(self) -> str | None:
        """The embodiment used when an observation names none: the only one with statistics, if unique."""
        names = self.normalizer.embodiments if self.normalizer is not None else []
        return names[0] if len(names) == 1 else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- fine-tuning -------------------------------------------------------------------------------------------
    def adapt_to(self, registry: EmbodimentRegistry, normalizer: Normalizer) -> list[str]:
        """Switch to new embodiments/statistics (fine-tuning). Unified dims are unchanged, so no weight is
        re-initialised; returns the names of re-initialised parameters (always empty here, kept for the trainer)."""
        self.registry = registry
        self.normalizer = normalizer
        return []

    # ---- save / load -------------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> Path:
        """Write config, weights (safetensors), normalization and registry; atomic: a crash leaves the old copy.

        `state_dict` replaces the module's own weights (the gathered full weights under FSDP, or EMA weights).
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self.config.to_json(tmp / CONFIG_NAME)
            weights = self.state_dict() if state_dict is None else state_dict
            state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            save_file(_unshare(state), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            self.registry.save(tmp)
            if self.normalizer is not None:
                self.normalizer.save(tmp)
            self.backbone.save_extra(tmp)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        revision: str | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> VLAPolicy:
        """Load a checkpoint from a local directory or a Hugging Face Hub repo id, in eval mode.

        `overrides` sets dotted config fields before the model is built, as strings like the command line
        (`{"action.moh.dynamic": "true", "objective.num_inference_steps": "10"}`): inference settings that leave
        the weights as they are. One that changes a weight shape fails like any mismatched checkpoint.

        Raises CheckpointError naming the problem: no such directory, pickle-only weights (refused: unsafe),
        corrupt files, or weights that do not match the model the config builds (missing/unexpected keys,
        shape mismatches — all listed).
        """
        directory = resolve_checkpoint(path_or_repo_id, revision=revision)
        try:
            config = VLAConfig.from_json(directory / CONFIG_NAME)
        except (ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{directory / CONFIG_NAME} is not a valid vla config: {e}") from e
        if overrides:
            config = apply_overrides(config, dict(overrides))
        registry, normalizer = _load_processor_files(directory)
        try:
            state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
        except Exception as e:  # safetensors raises several types on truncated/corrupt files
            raise CheckpointError(f"{directory / WEIGHTS_NAME} cannot be read (corrupt or truncated?): {e}") from e
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # every action would be NaN
            raise CheckpointError(f"{directory / WEIGHTS_NAME} holds non-finite values in {len(bad)} tensor(s) "
                                  f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): saved after training "
                                  "diverged; use an earlier checkpoint")
        policy = cls(config, registry=registry, normalizer=normalizer, checkpoint_dir=directory)
        check_state_dict(policy, state, strict=strict, source=str(directory / WEIGHTS_NAME))
        policy.load_state_dict(state, strict=strict)
        return policy.to(map_location).eval()


def _load_processor_files(directory: Path) -> tuple[EmbodimentRegistry, Normalizer | None]:
    """The checkpoint's embodiment registry and normalization statistics; CheckpointError naming a bad file."""
    from vla.data.embodiments import REGISTRY_FILE

    try:
        registry = EmbodimentRegistry.load(directory)
    except FileNotFoundError:
        raise CheckpointError(f"{directory / REGISTRY_FILE} is missing: not a complete vla checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{directory / REGISTRY_FILE} cannot be read (corrupt?): {type(e).__name__}: {e}") from e
    if not Normalizer.exists(directory):
        return registry, None
    try:
        normalizer = Normalizer.load(directory)
    except Exception as e:  # JSON, safetensors and key errors alike: name the files
        raise CheckpointError(f"the normalization statistics in {directory} (normalization.json / "
                              f".safetensors) cannot be read (corrupt?): {type(e).__name__}: {e}") from e
    bad = [k for k, v in normalizer.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the normalization statistics in {directory} hold non-finite values ({', '.join(bad[:3])})")
    return registry, normalizer


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading a Hub repo id first when it is not a local path."""
    path = Path(path_or_repo_id)
    if not path.exists():
        text = str(path_or_repo_id)
        if text.count("/") == 1 and not text.startswith((".", "/")):
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(text, revision=revision))
            except Exception as e:
                raise CheckpointError(f"no local checkpoint at '{text}' and the Hub download failed: {e}") from e
        else:
            raise CheckpointError(f"no checkpoint directory at '{text}'")
    if not (path / CONFIG_NAME).exists():  # a training run, its `last` (link or pointer file) or a step-N/ directory
        with contextlib.suppress(FileNotFoundError):
            path = resolve_pretrained(path)
    if not (path / WEIGHTS_NAME).exists():
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle weights {pickles}; vla loads safetensors only (pickle can run code)"
            )
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}: not a vla checkpoint")
    if not (path / CONFIG_NAME).exists():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a vla checkpoint")
    return path


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool, source: str) -> None:
    """Raise one CheckpointError listing every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if shapes:
        problems.append("shape mismatches:\n  " + "\n  ".join(shapes))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}):\n  " + "\n  ".join(missing))
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}):\n  " + "\n  ".join(unexpected))
    if problems:
        raise CheckpointError(f"{source} does not match the model built from its config:\n" + "\n".join(problems))
    if missing or unexpected:
        logger.warning("non-strict load from %s: %d missing, %d unexpected keys", source, len(missing), len(unexpected))


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): clone the later duplicates."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`, replacing an existing directory with at most a moment where neither name exists
    in its final state (the old copy is renamed aside first, then deleted)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _is_unbatched(observation: Mapping[str, Any]) -> bool:
    state = observation.get(OBS_STATE)
    if state is None:
        return isinstance(observation.get(TASK), str)
    return np.ndim(state) == 1 if not isinstance(state, torch.Tensor) else state.dim() == 1


__all__ = ["EMBODIMENT", "CheckpointError", "VLAPolicy", "check_state_dict", "resolve_checkpoint"]

"""Checkpoints that survive crashes: atomic step directories, a `last` pointer, exact resume.

The run layout (step directories, `pretrained_model/`, `training_state/`, `last`) is described and located by
`vla.training.layout`. A checkpoint is written into `.tmp-step-<N>/` and renamed into place only when every file
is on disk, so a `step-*` directory is always complete and a crash mid-save leaves the previous one (and `last`)
untouched. Resuming takes the newest complete step directory, which `last` points at unless the process died
between the rename and the pointer update.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from vla.config import VLAConfig
from vla.training.ema import EMA
from vla.training.layout import (
    CONFIG_NAME,
    EMA_NAME,
    PRETRAINED_DIR,
    TMP_PREFIX,
    TRAINER_STATE_NAME,
    TRAINING_STATE_DIR,
    checkpoint_name,
    list_checkpoints,
    point_last_to,
    prune_checkpoints,
    rank_state_name,
)

logger = logging.getLogger(__name__)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states of this process, as JSON-serialisable values."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- saving --------------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """What a resume needs besides the tensors: where training stood and how it was laid out."""

    step: int
    world_size: int
    batch_size: int
    grad_accum: int
    rank_state: dict[str, Any]
    """This process's `rank_<r>.json`: {"rng": capture_rng(), "data": BatchStream.state_dict()}."""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _fsync_tree(root: Path) -> None:
    """Flush every file (and directory entry) under root to disk, so the rename publishes durable data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_pretrained(accelerator: Accelerator, policy: nn.Module, ema: EMA | None, out: Path) -> None:
    """Every rank calls this (FSDP gathers the full state dict collectively); the main process writes."""
    model = accelerator.unwrap_model(policy)
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(policy)
        if accelerator.is_main_process:
            model.save_pretrained(out, state_dict=state)
        return
    if not accelerator.is_main_process:
        return
    if ema is None:
        model.save_pretrained(out)
    else:
        with ema.swapped_into(model):
            model.save_pretrained(out)


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    cfg: VLAConfig,
    policy: nn.Module,
    ema: EMA | None,
    data_state: dict[str, Any],
) -> Path:
    """Write `run_dir/step-<step>` atomically, repoint `last`, prune to `cfg.train.keep_last`. Call on every rank.

    Args:
        policy: the prepared (possibly wrapped) policy; the optimizer/scheduler are the ones `accelerator.prepare`d.
        data_state: this rank's data position (`BatchStream.state_dict()`).
    """
    rank_state = {"rng": capture_rng(), "data": data_state}  # first, before anything could draw a random number
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / TRAINING_STATE_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp / TRAINING_STATE_DIR), safe_serialization=True)
    _write_json(tmp / TRAINING_STATE_DIR / rank_state_name(accelerator.process_index), rank_state)
    _save_pretrained(accelerator, policy, ema, tmp / PRETRAINED_DIR)
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / TRAINING_STATE_DIR / EMA_NAME)
        _write_json(tmp / TRAINING_STATE_DIR / TRAINER_STATE_NAME, {
            "step": step,
            "world_size": accelerator.num_processes,
            "batch_size": cfg.data.batch_size,
            "grad_accum": cfg.train.grad_accum,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved by an earlier, abandoned attempt: replace it
            trash = run_dir / f"{TMP_PREFIX}old-{final.name}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        point_last_to(run_dir, final)
        for p in prune_checkpoints(run_dir, cfg.train.keep_last):
            logger.info("removed old checkpoint %s", p)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# ---- loading -------------------------------------------------------------------------------------------------


RESUME_SETTINGS = ("train.resume", "train.stop_at")
"""Settings expected to change from one invocation of a run to the next (not worth a warning)."""


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "", ignore: tuple[str, ...] = ()) -> list[str]:
    """Leaf settings that differ between two config dicts, as "section.field: old -> new" lines."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if f"{prefix}{key}" in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.", ignore)
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out



def load_checkpoint(accelerator: Accelerator, ckpt: Path, cfg: VLAConfig, ema: EMA | None) -> TrainerState:
    """Restore raw weights, optimizer, scheduler and EMA from `ckpt` into the prepared objects (every rank).

    The RNG and data position are returned in `TrainerState.rank_state` for the caller to apply right before the
    first step. Raises ValueError if the process layout differs from the one that wrote the checkpoint (the data
    position and per-rank RNG streams would not line up, so the continuation would not be the same run).
    """
    state_dir = ckpt / TRAINING_STATE_DIR
    meta_path = state_dir / TRAINER_STATE_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a resumable checkpoint: {meta_path} is missing")
    meta = _read_json(meta_path)
    now = {"world_size": accelerator.num_processes, "batch_size": cfg.data.batch_size,
           "grad_accum": cfg.train.grad_accum}
    differs = [f"{k}: checkpoint {meta[k]}, now {v}" for k, v in now.items() if meta.get(k) != v]
    if differs:
        raise ValueError(f"cannot resume {ckpt} exactly, the run layout changed ({'; '.join(differs)}); "
                         f"use the original layout, or start a new run with --train.init_from {ckpt}")
    if ema is not None and not (state_dir / EMA_NAME).is_file():
        raise FileNotFoundError(f"train.ema_decay > 0 but {ckpt} has no {EMA_NAME} (it was trained without EMA)")

    saved_cfg = ckpt.parent / CONFIG_NAME  # the run's config as of its previous invocation
    if saved_cfg.is_file():
        for change in config_changes(json.loads(saved_cfg.read_text()), cfg.to_dict(), ignore=RESUME_SETTINGS):
            logger.warning("resuming %s with a changed setting: %s", ckpt.name, change)
    try:
        accelerator.load_state(str(state_dir))
        if ema is not None:
            ema.load(state_dir / EMA_NAME)
    except Exception as e:  # torch, safetensors and accelerate raise many types on truncated or corrupt files
        raise _checkpoint_error(f"{state_dir} cannot be restored (corrupt or truncated?): {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
    rank_path = state_dir / rank_state_name(accelerator.process_index)
    rank_state = _read_json(rank_path)
    logger.info("resumed from %s at step %d", ckpt, meta["step"])
    return TrainerState(step=int(meta["step"]), world_size=meta["world_size"], batch_size=meta["batch_size"],
                        grad_accum=meta["grad_accum"], rank_state=rank_state)


# ---- integrity -----------------------------------------------------------------------------------------------


def _checkpoint_error(message: str) -> Exception:
    """The policy's CheckpointError (imported on use: loading the trainer must not build the policy module)."""
    from vla.policy import CheckpointError

    return CheckpointError(message)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _checkpoint_error(f"{path} cannot be read (corrupt or truncated?): {e}") from None


def nonfinite_names(tensors: dict[str, torch.Tensor] | Any) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (a mapping, or an optimizer's state)."""
    if isinstance(tensors, torch.optim.Optimizer) or hasattr(tensors, "optimizer"):
        states = getattr(tensors, "state", None) or {}  # a prepared optimizer proxies its wrapped one's state
        flat = {f"state[{i}].{k}": v for i, st in enumerate(states.values()) if isinstance(st, dict)
                for k, v in st.items()}
        return nonfinite_names(flat)
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def _training_weights(ckpt: Path) -> Path:
    return ckpt / TRAINING_STATE_DIR / "model.safetensors"


def check_resumable(ckpt: Path) -> None:
    """Raise one CheckpointError naming the first file of `ckpt` that a resume could not use.

    Reads the trainer and per-rank state, the raw weights (which must be finite), the optimizer state and the
    normalization statistics: the files a resume restores. Sharded weights are left to `load_checkpoint`.
    """
    from safetensors.torch import load_file

    state_dir = ckpt / TRAINING_STATE_DIR
    meta = _read_json(state_dir / TRAINER_STATE_NAME)
    for rank in range(int(meta.get("world_size", 1)) if isinstance(meta, dict) else 1):
        _read_json(state_dir / rank_state_name(rank))
    weights = _training_weights(ckpt)
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except Exception as e:
            raise _checkpoint_error(f"{weights} cannot be read (corrupt or truncated?): {e}") from None
        bad = nonfinite_names(tensors)
        if bad:
            raise _checkpoint_error(f"{weights} holds non-finite weights ({_few(bad)}): saved after the run diverged")
    optimizer = state_dir / "optimizer.bin"
    if optimizer.is_file():
        try:
            state = torch.load(optimizer, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _checkpoint_error(f"{optimizer} cannot be read (corrupt or truncated?): {type(e).__name__}") from None
        bad = nonfinite_names({f"state[{i}].{k}": v for i, st in state.get("state", {}).items() for k, v in st.items()})
        if bad:
            raise _checkpoint_error(f"{optimizer} holds non-finite optimizer state ({_few(bad)})")
    pretrained = ckpt / PRETRAINED_DIR
    for name in ("normalization.json", "embodiments.json"):
        if (pretrained / name).is_file():
            _read_json(pretrained / name)


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose raw weights are finite (what "last good" may name after a divergence)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            check_resumable(ckpt)
        except RuntimeError:
            continue
        return ckpt
    return None


def pick_resumable(run_dir: Path) -> Path:
    """The newest checkpoint of `run_dir` that `check_resumable` accepts; each newer one skipped gets a warning.

    Raises CheckpointError listing every checkpoint's problem when none can be resumed.
    """
    problems = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            check_resumable(ckpt)
        except RuntimeError as e:
            problems.append(str(e))
            logger.warning("cannot resume %s: %s; trying the previous checkpoint", ckpt.name, e)
            continue
        if problems:
            logger.warning("resuming from %s, the newest complete checkpoint that can be restored", ckpt)
        return ckpt
    raise _checkpoint_error(f"no checkpoint of {run_dir} can be resumed: " + "; ".join(problems))

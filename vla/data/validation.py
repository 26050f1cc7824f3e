"""Checks on a raw observation before it reaches the model: bad input is one clear error, never NaN actions.

`validate_observation` is what `VLAPolicy.select_action` / `predict_action_chunk` run first (through
`vla.data.transforms.prepare_observation`), and what a policy server can run on each request. Every problem raises
`ObservationError` (a `ValueError`) whose one-line message names the key and what was expected.

Accepted (the documented conversions): images as uint8 (H, W, C) or float in [0, 1] ((C, H, W) or (H, W, C)),
optionally with a leading batch dim B; `observation.state` as (S,) or (B, S); `task` a string (or B strings).
Cameras of the policy that are absent are masked, as in training.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vla.constants import OBS_IMAGES, OBS_STATE, TASK


class ObservationError(ValueError):
    """An observation cannot be used as policy input; the message names the key and what was expected."""


def validate_observation(
    observation: Mapping[str, Any],
    cameras: Sequence[str],
    *,
    optional_cameras: Collection[str] = (),
) -> int | None:
    """Raise ObservationError on the first problem of `observation`; return its batch size (None if unbatched).

    Args:
        observation: the raw observation (`vla.constants` keys: `observation.images.<camera>`,
            `observation.state`, `task`, `embodiment`).
        cameras: the policy's canonical camera names (`DataConfig.cameras`); an image key naming any other camera
            (a typo, or a simulator's native name such as `agentview`) is an error listing these.
        optional_cameras: further camera names that are accepted and ignored.
    """
    if not isinstance(observation, Mapping):
        raise ObservationError(f"an observation must be a mapping of keys to values, got {type(observation).__name__}")
    if OBS_STATE not in observation:
        raise ObservationError(f"missing '{OBS_STATE}': expected the robot state as (state_dim,) or (B, state_dim)")
    state = _numeric(observation[OBS_STATE], OBS_STATE)
    if state.ndim not in (1, 2) or state.shape[-1] == 0 or state.numel() == 0:
        raise ObservationError(f"'{OBS_STATE}' must be (state_dim,) or (B, state_dim) with state_dim > 0, "
                               f"got shape {tuple(state.shape)}")
    _finite(state, OBS_STATE)
    batch = int(state.shape[0]) if state.ndim == 2 else None

    _check_task(observation, batch)

    prefix = OBS_IMAGES + "."
    for key, value in observation.items():
        if not key.startswith(prefix):
            continue
        camera = key[len(prefix):]
        if camera not in cameras:
            if camera in optional_cameras:
                continue
            raise ObservationError(f"image key '{key}' names no camera of this policy: expected "
                                   f"{', '.join(repr(prefix + c) for c in cameras)} (canonical names; map a "
                                   "simulator's native camera names to them)")
        if value is None:
            continue  # an absent camera, masked like a missing one
        _check_image(_numeric(value, key), key, batch)
    return batch


def _numeric(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise ObservationError(f"'{key}' must be a numeric array, got {type(value).__name__} ({e})") from None
        if arr.dtype.kind not in "biuf":
            raise ObservationError(f"'{key}' must be a numeric array, got dtype {arr.dtype} ({type(value).__name__})")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ObservationError(f"'{key}' must be real numbers, got {t.dtype}")
    return t


def _finite(t: torch.Tensor, key: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ObservationError(f"'{key}' holds {bad} NaN/inf value(s): expected finite numbers")


def _check_task(observation: Mapping[str, Any], batch: int | None) -> None:
    if TASK not in observation:
        raise ObservationError(f"missing '{TASK}': expected the language instruction as a string")
    task = observation[TASK]
    if isinstance(task, str):
        return
    if batch is None:
        raise ObservationError(f"'{TASK}' must be a string (the instruction), got {type(task).__name__}")
    if isinstance(task, list | tuple) and len(task) == batch and all(isinstance(t, str) for t in task):
        return
    raise ObservationError(f"'{TASK}' must be a string or a list of {batch} strings for a batch of {batch}, got "
                           f"{type(task).__name__}" + (f" of length {len(task)}" if isinstance(task, list | tuple)
                                                       else ""))


def _check_image(img: torch.Tensor, key: str, batch: int | None) -> None:
    want = 3 if batch is None else 4
    if img.ndim != want:
        layout = "(H, W, C) or (C, H, W)" if batch is None else f"(B={batch}, H, W, C) or (B={batch}, C, H, W)"
        kind = "unbatched" if batch is None else "batched"
        raise ObservationError(f"'{key}' must be {layout} like the {kind} '{OBS_STATE}', got shape {tuple(img.shape)}")
    if batch is not None and img.shape[0] != batch:
        raise ObservationError(f"'{key}' has a batch of {img.shape[0]} but '{OBS_STATE}' has {batch}")
    if img.numel() == 0:
        raise ObservationError(f"'{key}' is empty (shape {tuple(img.shape)}): expected an image with H, W > 0")
    if img.is_floating_point():
        _finite(img, key)
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ObservationError(f"'{key}' is a float image with values in [{lo:.4g}, {hi:.4g}]: float images must "
                                   "be in [0, 1] (pass 0-255 pixels as uint8)")
    elif img.dtype != torch.uint8:
        raise ObservationError(f"'{key}' must be uint8 (0-255) or float in [0, 1], got {img.dtype}")

"""What a served policy accepts: client keys renamed to vla batch keys, then every field checked.

Each bad message gets one `ObservationError` naming the field in the client's own key names and what was wrong
(missing key, unknown key, dtype, shape, non-finite value, image size), so a client learns its mistake from the
first answer. The checks every policy input gets (`vla.data.validation.validate_observation`: dtypes, layouts,
finite values, float range) run first; the server adds what only it knows: the key map, that every camera and the
instruction are present, the embodiment's exact state size, one observation per frame, and size limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla.constants import EMBODIMENT, OBS_IMAGES, OBS_STATE, TASK, image_key
from vla.data.validation import ObservationError, validate_observation


def parse_key_map(text: str) -> dict[str, str]:
    """'observation/image=observation.images.base,prompt=task' -> {client key: vla key}."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--key-map expects CLIENT_KEY=VLA_KEY items separated by commas, got {item!r}")
        out[src.strip()] = dst.strip()
    return out


@dataclass(frozen=True)
class ObservationSpec:
    """The observation a policy takes, and the client key map in front of it.

    Args:
        embodiment: the registry name of the served robot (observations may omit it).
        cameras: canonical cameras the policy reads; each must be sent.
        state_dim: native state size of the embodiment.
        key_map: client key -> vla key; vla keys are accepted as they are.
        max_image_side: largest image height/width accepted (bounds memory and preprocessing time).
        min_image_side: smallest image height/width accepted.
        max_prompt_chars: longest instruction accepted.
    """

    embodiment: str
    cameras: tuple[str, ...]
    state_dim: int
    key_map: dict[str, str] = field(default_factory=dict)
    max_image_side: int = 1024
    min_image_side: int = 8
    max_prompt_chars: int = 2000

    @property
    def vla_keys(self) -> list[str]:
        return [*(image_key(c) for c in self.cameras), OBS_STATE, TASK]

    def client_name(self, vla_key: str) -> str:
        """How the client calls a vla key (for error messages in the client's own terms)."""
        inverse = {v: k for k, v in self.key_map.items()}
        return inverse.get(vla_key, vla_key)

    def rename(self, message: Any) -> dict[str, Any]:
        """Client dict -> dict with vla keys; unknown keys and a key sent under two names are errors."""
        if not isinstance(message, Mapping):
            raise ObservationError(f"an observation must be a map of keys to values, got {type(message).__name__}")
        out: dict[str, Any] = {}
        known = set(self.vla_keys) | {EMBODIMENT}
        for key, value in message.items():
            name = key.decode() if isinstance(key, bytes) else key
            target = self.key_map.get(name, name)
            if target not in known:
                accepted = sorted({*self.key_map, *known})
                raise ObservationError(f"unknown observation key {name!r}; accepted keys: {', '.join(accepted)}")
            if target in out:
                raise ObservationError(f"observation key {target!r} was sent twice (as {self.client_name(target)!r} "
                                       f"and {target!r})")
            out[target] = value
        return out

    def validate(self, message: Any) -> dict[str, Any]:
        """Rename and check one observation; returns {images..., state float32, task str, embodiment}."""
        obs = self.rename(message)
        missing = [self.client_name(k) for k in self.vla_keys if k not in obs]
        if missing:
            raise ObservationError(f"observation is missing key(s) {missing}")
        name = obs.get(EMBODIMENT, self.embodiment)
        if name != self.embodiment:
            raise ObservationError(f"this server serves embodiment {self.embodiment!r}, the observation names {name!r}")
        out: dict[str, Any] = {EMBODIMENT: self.embodiment, TASK: self._task(obs[TASK])}
        for key in self.vla_keys:
            if isinstance(obs[key], list | tuple):
                obs[key] = np.asarray(obs[key])
        shape = np.shape(obs[OBS_STATE])
        if shape != (self.state_dim,):  # one observation per frame, of the served embodiment
            raise ObservationError(f"{self.client_name(OBS_STATE)!r} has shape {shape}, expected "
                                   f"({self.state_dim},) for {self.embodiment}")
        try:
            validate_observation({k: obs[k] for k in self.vla_keys if k != TASK} | {TASK: out[TASK]}, self.cameras)
        except ObservationError as e:
            message = str(e)
            for key in self.vla_keys:
                message = message.replace(f"'{key}'", repr(self.client_name(key)))
            raise ObservationError(message) from None
        out[OBS_STATE] = self._state(obs[OBS_STATE])
        for cam in self.cameras:
            key = image_key(cam)
            out[key] = self._image(obs[key], self.client_name(key))
        return out

    def _task(self, value: Any) -> str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, np.ndarray) and value.dtype.kind in "SU" and value.size == 1:
            value = str(value.item())
        if not isinstance(value, str):
            raise ObservationError(f"{self.client_name(TASK)!r} must be a string, got {type(value).__name__}")
        if len(value) > self.max_prompt_chars:
            raise ObservationError(f"{self.client_name(TASK)!r} has {len(value)} characters; at most "
                                   f"{self.max_prompt_chars} are accepted")
        return value

    def _state(self, value: Any) -> np.ndarray:
        name = self.client_name(OBS_STATE)
        if isinstance(value, list | tuple):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
            raise ObservationError(f"{name!r} must be a numeric array, got {_describe(value)}")
        state = value.astype(np.float32)
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"{name!r} has non-finite values {state.tolist()}")
        return state

    def _image(self, value: Any, name: str) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise ObservationError(f"{name!r} must be an image array, got {_describe(value)}")
        if value.ndim != 3 or 3 not in (value.shape[0], value.shape[-1]):
            raise ObservationError(f"{name!r} has shape {tuple(value.shape)}, expected (H, W, 3) or (3, H, W)")
        h, w = value.shape[:2] if value.shape[-1] == 3 else value.shape[1:]
        lo, hi = self.min_image_side, self.max_image_side
        if not (lo <= h <= hi and lo <= w <= hi):
            raise ObservationError(f"{name!r} is {h}x{w} pixels; each side must be in [{lo}, {hi}]")
        if value.dtype == np.uint8:
            return value
        if value.dtype.kind != "f":
            raise ObservationError(f"{name!r} has dtype {value.dtype}, expected uint8 (or float in [0, 1])")
        if not np.all(np.isfinite(value)):
            raise ObservationError(f"{name!r} has non-finite pixel values")
        if value.min() < 0.0 or value.max() > 1.0:
            raise ObservationError(f"{name!r} is float with values outside [0, 1]")
        return value.astype(np.float32)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


__all__ = ["OBS_IMAGES", "ObservationError", "ObservationSpec", "parse_key_map"]

"""One path from a raw robot observation to model-ready tensors, shared by training and inference.

`Processor` holds what that path needs (the data config, the embodiment registry and the normalizer) and is saved
with every checkpoint. The training dataset calls `Processor.frame` once per sample; the policy calls
`Processor.observation` on what a simulator or robot hands it, and `Processor.actions_to_native` on what it predicts.
Nothing else converts images, states or actions, so the two sides cannot drift apart.

Images: uint8 HWC (numpy or torch) or float CHW in [0, 1] -> (3, S, S) float32 in [0, 1], S = `DataConfig.image_size`.
At training time a random crop of `crop_scale`..1 of the area (aspect kept) and brightness/contrast/saturation
jitter are drawn from a per-sample seed, so a batch is a pure function of the sampler position (resumable, and the
same for any number of workers); at evaluation the centre crop of the mean training area keeps objects at the scale
the policy learned. Hue jitter is left out: it costs ~3 ms per 128 px image on one core, 10x the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from vla.config import DataConfig
from vla.constants import (
    ACTION_MASK,
    EMBODIMENT,
    EMBODIMENT_ID,
    OBS_IMAGE_MASK,
    OBS_STATE,
    STATE_MASK,
    TASK,
    image_key,
)
from vla.data.embodiments import Embodiment, EmbodimentRegistry
from vla.data.normalize import Normalizer
from vla.data.validation import validate_observation

ImageLike = np.ndarray | torch.Tensor


def to_chw(image: ImageLike) -> torch.Tensor:
    """Any single RGB image -> (3, H, W) tensor, dtype kept (uint8 or float).

    Accepts HWC or CHW, numpy or torch, grayscale (H, W) / (H, W, 1) (repeated to 3 channels) and RGBA (alpha
    dropped). uint8 images are read as HWC when the last dim looks like channels (what cameras and LeRobot
    produce), float images as CHW when the first dim does (what torch produces).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else torch.as_tensor(image)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and not (x.is_floating_point() and x.shape[0] in (1, 3, 4)):
        x = x.permute(2, 0, 1)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected one image as (H, W, C) or (C, H, W) with C in 1/3/4, got shape {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3]


class ImageTransform:
    """(3, H, W) or HWC image -> (3, S, S) float32 in [0, 1], augmented when `train`.

    Args:
        image_size: output side S.
        train: random resized crop + color jitter (deterministic given `seed`); off = the centre crop of the mean
            training area, (1 + crop_scale) / 2, resized.
        crop_scale: smallest crop area fraction (crops keep the image's aspect ratio; 1 = never crop).
        color_jitter: brightness/contrast/saturation factors are drawn from [1 - j, 1 + j] (0 = off).
    """

    def __init__(self, image_size: int, *, train: bool, crop_scale: float = 0.9, color_jitter: float = 0.2) -> None:
        if not 0 < crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.size = int(image_size)
        self.train = train
        self.crop_scale = crop_scale
        self.color_jitter = color_jitter

    def __call__(self, image: ImageLike, seed: int | None = None) -> torch.Tensor:
        x = to_chw(image)
        if x.dtype.is_floating_point:
            x = x.float().clamp(0.0, 1.0)
        elif x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        if self.train:
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            x = self._augment(x, gen)
        else:
            x = self._center(x)
        return TF.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        side = math.sqrt((1 + self.crop_scale) / 2)
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        if (ch, cw) != (h, w):
            x = TF.center_crop(x, [ch, cw])
        if (ch, cw) != (self.size, self.size):
            x = TF.resize(x, [self.size, self.size], antialias=True)
        return x

    def _augment(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        u = torch.rand(6, generator=gen).tolist()
        area = self.crop_scale + (1 - self.crop_scale) * u[0]
        ch, cw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
        top, left = int(u[1] * (h - ch + 1)), int(u[2] * (w - cw + 1))
        x = TF.resized_crop(x, top, left, ch, cw, [self.size, self.size], antialias=True)
        if self.color_jitter > 0:
            j = self.color_jitter
            x = TF.adjust_brightness(x, 1 - j + 2 * j * u[3])
            x = TF.adjust_contrast(x, 1 - j + 2 * j * u[4])
            x = TF.adjust_saturation(x, 1 - j + 2 * j * u[5])
        return x


class Processor:
    """Raw observation <-> model tensors for every embodiment of a run.

    Args:
        data_cfg: cameras, image size, unified dims, augmentation settings.
        registry: embodiment definitions; `embodiment_id` is the index in it.
        normalizer: per-embodiment state/action statistics.
    """

    def __init__(self, data_cfg: DataConfig, registry: EmbodimentRegistry, normalizer: Normalizer) -> None:
        self.cfg = data_cfg
        self.registry = registry
        self.normalizer = normalizer
        self.cameras = tuple(data_cfg.cameras)
        crop = data_cfg.crop_scale if data_cfg.augment else 1.0  # without augmentation, whole frames everywhere
        self.train_images = ImageTransform(data_cfg.image_size, train=data_cfg.augment, crop_scale=crop,
                                           color_jitter=data_cfg.color_jitter)
        self.eval_images = ImageTransform(data_cfg.image_size, train=False, crop_scale=crop)

    # ---- one sample (the training dataset calls this per frame) -------------------------------------------------
    def frame(
        self,
        images: Mapping[str, ImageLike | None],
        state: torch.Tensor | np.ndarray,
        task: str,
        embodiment: str,
        *,
        train: bool = False,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """One observation -> unbatched model inputs.

        Args:
            images: canonical camera name -> image; cameras of `data.cameras` that are absent (or None) are zeros
                with mask False. Names outside `data.cameras` are ignored.
            state: (state_dim,) in the embodiment's native units.
            task: the language instruction.
            embodiment: registry name.
            train: apply augmentation (only if `data.augment`).
            seed: augmentation seed; each camera draws its own crop from it.

        Returns: {observation.images.<cam>: (3, S, S) float, observation.image_mask: (n_cam,) bool,
            observation.state: (U_s,) normalized, observation.state_mask: (U_s,), action_mask: (U_a,),
            task: str, embodiment_id: () long}
        """
        emb = self.registry.get(embodiment)
        out: dict[str, Any] = {}
        present = []
        tf = self.train_images if train else self.eval_images
        size = self.cfg.image_size
        for i, cam in enumerate(self.cameras):
            img = images.get(cam)
            present.append(img is not None)
            cam_seed = None if seed is None else seed * 16 + i  # independent crops per camera, same sample seed
            out[image_key(cam)] = torch.zeros(3, size, size) if img is None else tf(img, cam_seed)
        out[OBS_IMAGE_MASK] = torch.tensor(present, dtype=torch.bool)
        out[OBS_STATE] = self.state_to_model(torch.as_tensor(state).float(), emb)
        out[STATE_MASK] = emb.state_mask(self.cfg.unified_state_dim)
        out[ACTION_MASK] = emb.action_mask(self.cfg.unified_action_dim)
        out[TASK] = task
        out[EMBODIMENT_ID] = torch.tensor(self.registry.index(embodiment), dtype=torch.long)
        return out

    # ---- vectors ------------------------------------------------------------------------------------------------
    def state_to_model(self, state: torch.Tensor, emb: Embodiment | str) -> torch.Tensor:
        """(..., state_dim) native -> (..., U_s) normalized unified."""
        emb = self.registry.get(emb) if isinstance(emb, str) else emb
        return emb.state_to_unified(self.normalizer.normalize(state, emb.name, "state"), self.cfg.unified_state_dim)

    def actions_to_model(self, actions: torch.Tensor, emb: Embodiment | str) -> torch.Tensor:
        """(..., action_dim) native -> (..., U_a) normalized unified (training targets)."""
        emb = self.registry.get(emb) if isinstance(emb, str) else emb
        return emb.action_to_unified(self.normalizer.normalize(actions, emb.name, "action"),
                                     self.cfg.unified_action_dim)

    def actions_to_native(self, unified: torch.Tensor, emb: Embodiment | str) -> torch.Tensor:
        """(..., U_a) normalized unified (model output) -> (..., action_dim) in the robot's own units."""
        emb = self.registry.get(emb) if isinstance(emb, str) else emb
        return self.normalizer.unnormalize(emb.action_from_unified(unified.float()), emb.name, "action")

    # ---- inference ----------------------------------------------------------------------------------------------
    def observation(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """A raw observation (one or a batch of B) -> batched model inputs, exactly as training batches look.

        `obs` uses the batch keys of `vla.constants`: `observation.images.<canonical cam>` (HWC uint8 or CHW float,
        optionally with a leading B), `observation.state` ((S,) or (B, S) native), `task` (str or list of B) and
        `embodiment` (registry name, or a list of B names). Cameras of `data.cameras` that are missing are masked.
        """
        if OBS_STATE not in obs or EMBODIMENT not in obs:
            raise KeyError(f"an observation needs '{OBS_STATE}' and '{EMBODIMENT}'; got keys {sorted(obs)}")
        state = torch.as_tensor(np.asarray(obs[OBS_STATE]) if not isinstance(obs[OBS_STATE], torch.Tensor)
                                else obs[OBS_STATE])
        batched = state.ndim == 2
        states = state if batched else state.unsqueeze(0)
        b = states.shape[0]
        tasks = _per_sample(obs.get(TASK, ""), b, TASK)
        embodiments = _per_sample(obs[EMBODIMENT], b, EMBODIMENT)
        frames = []
        for i in range(b):
            images = {}
            for cam in self.cameras:
                img = obs.get(image_key(cam))
                if img is not None:
                    images[cam] = img[i] if batched else img
            frames.append(self.frame(images, states[i], tasks[i], embodiments[i]))
        return collate_frames(frames)

    # ---- persistence --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """embodiments.json + normalization.{safetensors,json}; the DataConfig lives in the run's config.json."""
        self.registry.save(directory)
        self.normalizer.save(directory)

    @classmethod
    def load(cls, directory: str | Path, data_cfg: DataConfig) -> Processor:
        return cls(data_cfg, EmbodimentRegistry.load(directory), Normalizer.load(directory, mode=data_cfg.normalization))


def prepare_observation(
    observation: Mapping[str, Any],
    *,
    registry: EmbodimentRegistry,
    normalizer: Normalizer,
    data_cfg: DataConfig,
    default_embodiment: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Any], str]:
    """A raw observation of one embodiment (single or batched) -> (batched model inputs on `device`, its name).

    The policy's inference entry point; see `Processor.observation` for the accepted keys. `embodiment` may be
    omitted when `default_embodiment` is given (a policy trained on a single robot). The observation is checked
    (`vla.data.validation.validate_observation`) before any model input is made: a malformed one raises
    ObservationError naming the key. Images of canonical cameras that the embodiment declares but the policy was
    not trained with (a simulator rendering `wrist` for a `base`-only policy) are ignored.
    """
    name = observation.get(EMBODIMENT, default_embodiment)
    if name is None:
        raise KeyError(f"the observation names no '{EMBODIMENT}' and there is no default; known embodiments: "
                       f"{', '.join(registry.names)}")
    names = {name} if isinstance(name, str) else set(name)
    if len(names) != 1:
        raise ValueError(f"one embodiment per call, got {sorted(names)}")
    (name,) = names
    declared = registry.get(name).cameras.values() if name in registry else ()
    validate_observation(observation, data_cfg.cameras, optional_cameras=set(declared) - set(data_cfg.cameras))
    batch = Processor(data_cfg, registry, normalizer).observation({**observation, EMBODIMENT: name})
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch, name


def _per_sample(value: Any, b: int, name: str) -> list:
    if isinstance(value, str):
        return [value] * b
    values = list(value)
    if len(values) != b:
        raise ValueError(f"observation '{name}' has {len(values)} entries for a batch of {b}")
    return values


def collate_frames(frames: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts: tensors along a new dim 0, strings into a list."""
    out: dict[str, Any] = {}
    for key in frames[0]:
        vals = [f[key] for f in frames]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else list(vals)
    return out

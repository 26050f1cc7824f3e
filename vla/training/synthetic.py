"""Generated training batches and statistics, for benchmarks and checks that must not depend on any dataset.

A batch has the keys and shapes of `vla.data.mixture` (see `vla.constants`), drawn from a seeded generator, so
two processes (or a resumed run) asking for the same (seed, step, rank) get the same batch. The samples cycle
through several registered embodiments, so action-space routers see more than one descriptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vla.config import VLAConfig
from vla.constants import (
    ACTION,
    ACTION_IS_PAD,
    ACTION_MASK,
    EMBODIMENT_ID,
    OBS_IMAGE_MASK,
    OBS_STATE,
    STATE_MASK,
    TASK,
    image_key,
)
from vla.data.embodiments import EmbodimentRegistry
from vla.data.normalize import Normalizer

DEFAULT_EMBODIMENTS = ("libero_panda", "robosuite_ur5e_osc")
TASKS = ("put the bowl on the plate", "lift the red cube", "open the top drawer", "push the plate to the front")


def usable_embodiments(cfg: VLAConfig, registry: EmbodimentRegistry,
                       names: Sequence[str] = DEFAULT_EMBODIMENTS) -> list[str]:
    """The embodiments of `names` that are registered and fit the config's unified vectors."""
    fit = [n for n in names if n in registry and registry.get(n).action_extent <= cfg.data.unified_action_dim
           and registry.get(n).state_extent <= cfg.data.unified_state_dim]
    if not fit:
        raise ValueError(f"none of the embodiments {list(names)} is registered and fits data.unified_action_dim="
                         f"{cfg.data.unified_action_dim} / unified_state_dim={cfg.data.unified_state_dim}")
    return fit


def synthetic_normalizer(cfg: VLAConfig, registry: EmbodimentRegistry, seed: int = 0) -> Normalizer:
    """Statistics of random state/action arrays for every usable embodiment (as if from a dataset)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in usable_embodiments(cfg, registry):
        emb = registry.get(name)
        arrays[name] = {"state": [rng.normal(size=(256, emb.state_dim))],
                        "action": [rng.uniform(-1, 1, size=(256, emb.action_dim))]}
    return Normalizer.from_arrays(arrays, mode=cfg.data.normalization)


def synthetic_batch(cfg: VLAConfig, registry: EmbodimentRegistry, batch_size: int, seed: int = 0,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """One normalized, unified training batch of `batch_size` samples, a pure function of `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    names = usable_embodiments(cfg, registry)
    d, h, s = cfg.data, cfg.action.chunk_size, cfg.data.image_size
    which = torch.arange(batch_size) % len(names)
    action_mask = torch.stack([registry.get(names[int(i)]).action_mask(d.unified_action_dim) for i in which])
    state_mask = torch.stack([registry.get(names[int(i)]).state_mask(d.unified_state_dim) for i in which])
    batch: dict[str, Any] = {
        image_key(cam): torch.rand(batch_size, 3, s, s, generator=g) for cam in d.cameras
    }
    batch[OBS_IMAGE_MASK] = torch.ones(batch_size, len(d.cameras), dtype=torch.bool)
    batch[OBS_STATE] = torch.randn(batch_size, d.unified_state_dim, generator=g) * state_mask
    batch[STATE_MASK] = state_mask
    batch[ACTION] = (torch.rand(batch_size, h, d.unified_action_dim, generator=g) * 2 - 1) * action_mask[:, None]
    batch[ACTION_MASK] = action_mask
    batch[ACTION_IS_PAD] = torch.zeros(batch_size, h, dtype=torch.bool)
    batch[TASK] = [TASKS[i % len(TASKS)] for i in range(batch_size)]
    batch[EMBODIMENT_ID] = torch.tensor([registry.names.index(names[int(i)]) for i in which])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

"""A vla checkpoint as the server's backend: the observation spec, the batched predict function and the metadata.

The key map in front of the policy comes, in order of precedence, from `--key-map`, from the embodiment's
`obs_keys` in the checkpoint's registry, or from the built-in registry's entry of the same name (checkpoints
written before `obs_keys` existed); vla's own batch keys are always accepted too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla.serve.engine import PredictFn
from vla.serve.observation import ObservationSpec

logger = logging.getLogger(__name__)

PROTOCOL = "openpi-websocket"


@dataclass
class Backend:
    """What `PolicyServer` needs from a policy."""

    spec: ObservationSpec
    predict: PredictFn
    metadata: dict[str, Any]


def key_map_for(policy: Any, embodiment: str) -> dict[str, str]:
    from vla.data.embodiments import default_registry

    own = policy.registry.get(embodiment).obs_keys
    if own:
        return dict(own)
    builtin = default_registry()
    return dict(builtin.get(embodiment).obs_keys) if embodiment in builtin else {}


def load_backend(path: str, *, embodiment: str | None = None, key_map: dict[str, str] | None = None,
                 overrides: dict[str, str] | None = None, max_image_side: int = 1024) -> Backend:
    """Load a checkpoint and describe it; ValueError names a bad embodiment or key map."""
    import torch

    from vla.policy import VLAPolicy
    from vla.sim.results import policy_identity

    policy = VLAPolicy.from_pretrained(path, overrides=overrides or None)
    name = embodiment or policy.default_embodiment
    if name is None:
        raise ValueError(f"the checkpoint has statistics for several embodiments "
                         f"({', '.join(policy.normalizer.embodiments)}): choose one with --embodiment")
    if policy.normalizer is None or name not in policy.normalizer.embodiments:
        known = ", ".join(policy.normalizer.embodiments) if policy.normalizer else "none"
        raise ValueError(f"the checkpoint has no statistics for embodiment {name!r} (it has: {known})")
    emb = policy.registry.get(name)
    keys = dict(key_map) if key_map else key_map_for(policy, name)
    spec = ObservationSpec(embodiment=name, cameras=tuple(policy.config.data.cameras), state_dim=emb.state_dim,
                           key_map=keys, max_image_side=max_image_side)
    bad = sorted(v for v in keys.values() if v not in [*spec.vla_keys, "embodiment"])
    if bad:
        raise ValueError(f"the key map sends client keys to {bad}, which this policy does not read; "
                         f"its keys are {', '.join(spec.vla_keys)}")

    def predict(batch: dict[str, Any]) -> np.ndarray:
        with torch.inference_mode():
            return policy.predict_action_chunk(batch).float().cpu().numpy()

    cfg = policy.config
    metadata = {
        "server": "vla", "protocol": PROTOCOL, "policy": policy_identity(path), "overrides": dict(overrides or {}),
        "embodiment": name, "action_dim": emb.action_dim, "action_type": emb.action_type, "fps": emb.fps,
        "action_horizon": cfg.action.chunk_size, "n_action_steps": cfg.action.n_action_steps,
        "state_dim": emb.state_dim, "cameras": list(cfg.data.cameras), "image_size": cfg.data.image_size,
        "obs_keys": keys,
    }
    return Backend(spec, predict, metadata)

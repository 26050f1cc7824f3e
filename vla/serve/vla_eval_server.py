"""A vla checkpoint as a `vla-eval` model server (its `PredictModelServer` interface; `pip install vla[serve-eval]`).

vla-eval's benchmarks (LIBERO, CALVIN, SimplerEnv, ...) send observations as `{"images": {camera: uint8 HWC},
"states" | "state": (S,), "task_description": str}` over vla-eval's own websocket protocol (hello, episode_start,
observation -> action, episode_end). Cameras are renamed by the embodiment's native -> canonical camera map of the
registry (LIBERO's `agentview` / `wrist` -> `base` / `wrist`), checked by the same `ObservationSpec` as the openpi
front end, and answered with the checkpoint's `(H, action_dim)` chunk; vla-eval buffers `n_action_steps` of it per
session and batches simultaneous sessions into one `predict_batch` call.

    python -m vla.serve.vla_eval_server --policy checkpoints/<run>/last --port 8001
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from vla_eval.model_servers.base import SessionContext
from vla_eval.model_servers.predict import PredictModelServer
from vla_eval.specs import (
    GRIPPER_CLOSE_POS,
    IMAGE_RGB,
    LANGUAGE,
    POSITION_DELTA,
    RAW,
    ROTATION_AA,
    STATE_EEF_POS_AA_GRIP,
    DimSpec,
)

from vla.constants import OBS_STATE, TASK, image_key
from vla.serve.backend import load_backend
from vla.serve.engine import collate

logger = logging.getLogger(__name__)

SPECS: dict[str, tuple[dict[str, DimSpec], DimSpec]] = {
    "libero_panda": ({"position": POSITION_DELTA, "rotation": ROTATION_AA, "gripper": GRIPPER_CLOSE_POS},
                     STATE_EEF_POS_AA_GRIP),
}
"""Embodiment -> (action spec, state spec) in vla-eval's terms, so its spec check can compare conventions;
other embodiments declare RAW (no convention checked)."""


class VlaModelServer(PredictModelServer):
    """vla-eval front end of a vla checkpoint.

    Args:
        policy: checkpoint directory.
        embodiment: embodiment served (default: the checkpoint's only one).
        max_batch_size: most simultaneous sessions in one forward pass.
    """

    def __init__(self, policy: str, embodiment: str | None = None, max_batch_size: int = 8, **kwargs: Any) -> None:
        self.backend = load_backend(policy, embodiment=embodiment)
        meta = self.backend.metadata
        from vla.data.embodiments import default_registry

        registry = default_registry()
        name = meta["embodiment"]
        self.cameras = dict(registry.get(name).cameras) if name in registry else {}
        super().__init__(chunk_size=meta["n_action_steps"], max_batch_size=max_batch_size, **kwargs)
        logger.info("vla-eval model server for %s (%s)", policy, name)

    def _to_vla(self, obs: dict[str, Any]) -> dict[str, Any]:
        images = obs.get("images") or {}
        if not isinstance(images, dict):
            raise ValueError(f"'images' must be a map of camera name -> image, got {type(images).__name__}")
        out: dict[str, Any] = {}
        for camera, image in images.items():
            canonical = self.cameras.get(camera, camera)
            if canonical in self.backend.spec.cameras:
                out[image_key(canonical)] = np.asarray(image)
        state = obs.get("states", obs.get("state"))
        if state is not None:
            out[OBS_STATE] = np.asarray(state)
        out[TASK] = obs.get("task_description", "")
        return self.backend.spec.validate(out)

    def predict_batch(self, obs_batch: list[dict[str, Any]], ctx_batch: list[SessionContext]) -> list[dict]:
        checked = [self._to_vla(o) for o in obs_batch]
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(checked):
            groups.setdefault(tuple((k, v.shape) for k, v in sorted(o.items()) if isinstance(v, np.ndarray)),
                              []).append(i)
        out: list[dict] = [{}] * len(checked)
        for idx in groups.values():
            actions = self.backend.predict(collate([checked[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = {"actions": np.asarray(actions[j], dtype=np.float32)}
        return out

    def get_action_spec(self) -> dict[str, DimSpec]:
        known = SPECS.get(self.backend.metadata["embodiment"])
        return dict(known[0]) if known else {"actions": RAW}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        native = {canonical: cam for cam, canonical in self.cameras.items()}
        known = SPECS.get(self.backend.metadata["embodiment"])
        spec = {native.get(c, c): IMAGE_RGB for c in self.backend.spec.cameras}
        return {**spec, "state": known[1] if known else RAW, "language": LANGUAGE}

    def get_observation_params(self) -> dict[str, Any]:
        return {"send_wrist_image": len(self.backend.spec.cameras) > 1, "send_state": True}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vla.serve.vla_eval_server",
                                description="Serve a vla checkpoint to vla-eval's benchmarks (its websocket protocol).")
    p.add_argument("--policy", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="TCP port (default 8001)")
    p.add_argument("--embodiment", default=None, help="embodiment served (default: the checkpoint's only one)")
    p.add_argument("--max-batch", type=int, default=8, help="most simultaneous sessions in one forward pass")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vla_eval.model_servers.serve import serve

    server = VlaModelServer(args.policy, embodiment=args.embodiment, max_batch_size=args.max_batch)
    serve(server, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""Batch keys shared by the data pipeline, the policy and the simulators (LeRobot naming).

A training batch from `vla.data.mixture` and an observation handed to `VLAPolicy` use the same keys, so the
policy has one input path. Shapes are for a batch of B samples; `n_cam` follows `DataConfig.cameras`.
"""

OBS_IMAGES = "observation.images"
"""Prefix of per-camera images: f"{OBS_IMAGES}.{camera}" -> (B, 3, H, W) float in [0, 1] (canonical camera names)."""
OBS_IMAGE_MASK = "observation.image_mask"
"""(B, n_cam) bool, True where the camera exists for the sample; missing cameras are masked, never attended to."""
OBS_STATE = "observation.state"
"""Training batch: (B, unified_state_dim) normalized, zero outside the embodiment's slots.
Raw observation: (state_dim,) or (B, state_dim) in the embodiment's own units."""
STATE_MASK = "observation.state_mask"
"""(B, unified_state_dim) bool: the unified slots the embodiment fills."""
ACTION = "action"
"""Training batch: (B, H, unified_action_dim) normalized, zero outside the embodiment's slots."""
ACTION_MASK = "action_mask"
"""(B, unified_action_dim) bool: the unified slots the embodiment uses (also the action-space descriptor)."""
ACTION_IS_PAD = "action_is_pad"
"""(B, H) bool: chunk steps past the end of the episode (excluded from the loss)."""
TASK = "task"
"""list[str] of length B: the language instruction."""
EMBODIMENT = "embodiment"
"""Raw observation: the embodiment's registry name (str)."""
EMBODIMENT_ID = "embodiment_id"
"""(B,) long: index of the embodiment in the registry."""
DATASET_ID = "dataset_id"
"""(B,) long: index of the source dataset in the mixture."""


def image_key(camera: str) -> str:
    return f"{OBS_IMAGES}.{camera}"

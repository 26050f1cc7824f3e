#!/usr/bin/env python
"""Scripted-expert robosuite demonstrations of a second embodiment (UR5e, OSC_POSITION), as a LeRobot v3 dataset.

A different robot and action space than LIBERO's Panda, so that a real two-embodiment mixture exists: a UR5e
with a Robotiq 85 gripper under robosuite's OSC_POSITION controller, whose action is 4-dim (dx, dy, dz in
[-1, 1] with 1.0 = 0.05 m, gripper -1 open / +1 close); the orientation is held by the controller. The expert
reads the cube poses from the simulator and moves through waypoints: above the cube, down, close, up, and for
`stack` over the other cube, down, open. Each episode draws a small style (grasp offset, speed, heights) and
adds per-step noise. Only successful episodes are kept.

Recorded per step at 20 fps: cameras `frontview` and `robot0_eye_in_hand` (upright), state (8,) = eef position
(3) + eef axis-angle (3) + the two driven gripper joints (2), the 4-dim action as sent, and the task string.
Embodiment name in the registry: `robosuite_ur5e_osc`.

    python datasets/robosuite_expert.py --tasks lift --episodes 50
    python datasets/robosuite_expert.py --tasks lift,stack --episodes 20 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from vla.data.recording import (
    Episode,
    demo_features,
    parse_recording_args,
    record_from_args,
    recording_parser,
)
from vla.sim.libero_env import disable_msaa, quat_to_axis_angle

EMBODIMENT = "robosuite_ur5e_osc"
ROBOT = "UR5e"
CONTROLLER = "OSC_POSITION"
CONTROL_FREQ = 20
CAMERAS = ("frontview", "robot0_eye_in_hand")
STATE_NAMES = ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_left", "gripper_right"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]
GRIPPER_JOINTS = (0, 3)
"""Indices of the Robotiq 85's two driven joints (finger_joint, right_outer_knuckle_joint) in robot0_gripper_qpos."""
POS_SCALE = 0.05
"""OSC_POSITION: an action of 1.0 moves the position set-point by 0.05 m."""
OPEN, CLOSE = -1.0, 1.0
SETTLE_STEPS = 5

TASKS = {
    "lift": ("Lift", "lift the red cube"),
    "stack": ("Stack", "stack the red cube on the green cube"),
}
"""Task name -> (robosuite environment, instruction). Task ids are positions in this dict."""
TASK_NAMES = list(TASKS)


def make_env(env_name: str, image_size: int, render: bool = True):
    """A robosuite env of the UR5e under OSC_POSITION with the two recorded cameras (rendered on demand)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import robosuite
    from robosuite import load_controller_config

    env = robosuite.make(
        env_name,
        robots=ROBOT,
        controller_configs=load_controller_config(default_controller=CONTROLLER),
        has_renderer=False,
        has_offscreen_renderer=render,
        use_camera_obs=False,  # cameras are rendered only for recorded frames, see `render_upright`
        control_freq=CONTROL_FREQ,
        horizon=10_000,
        ignore_done=True,
        hard_reset=False,  # reset re-samples the cubes in place instead of rebuilding the model
    )
    if render:
        disable_msaa(env.sim)  # ~1.5x faster software rendering, same look at 128 px
    return env


def render_upright(env, image_size: int) -> dict[str, np.ndarray]:
    """Camera name -> uint8 (S, S, 3) image, flipped upright (MuJoCo renders bottom-up)."""
    return {
        cam: np.ascontiguousarray(env.sim.render(camera_name=cam, width=image_size, height=image_size)[::-1])
        for cam in CAMERAS
    }


def robot_state(obs: dict) -> np.ndarray:
    """float32 (8,): eef position, eef axis-angle, the two driven gripper joint positions."""
    gripper = np.asarray(obs["robot0_gripper_qpos"])[list(GRIPPER_JOINTS)]
    return np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]), gripper]).astype(
        np.float32
    )


# ---- the expert ----------------------------------------------------------------------------------------------------


@dataclass
class Style:
    """Per-episode variation of the expert."""

    grasp_offset: np.ndarray  # (3,) m added to the cube centre at the grasp
    place_offset: np.ndarray  # (2,) m added to the lower cube's centre when stacking
    lift_height: float  # m above the table while carrying
    speed: float  # max translation action
    noise: float  # std of per-step action noise

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Style:
        return cls(
            grasp_offset=np.r_[rng.normal(0.0, 0.003, 2), rng.uniform(-0.008, 0.0)],
            place_offset=rng.normal(0.0, 0.004, 2),
            lift_height=float(rng.uniform(0.10, 0.14)),
            speed=float(rng.uniform(0.6, 0.8)),
            noise=0.04,
        )


class CubeExpert:
    """Waypoints for Lift (approach, descend, close, lift) and Stack (+ carry, lower, open, retreat)."""

    GAIN = 1.5
    BUDGET: ClassVar[dict[str, int]] = {
        "approach": 60, "descend": 40, "close": 12, "lift": 60, "carry": 60, "lower": 40, "open": 8, "retreat": 10_000,
    }
    NEXT: ClassVar[dict[str, str]] = {
        "approach": "descend", "descend": "close", "close": "lift", "lift": "carry", "carry": "lower", "lower": "open",
        "open": "retreat", "retreat": "retreat",
    }

    def __init__(self, env, task: str, rng: np.random.Generator, style: Style | None = None):
        self.env, self.task, self.rng = env, task, rng
        self.style = style or Style.sample(rng)
        self.table_z = float(env.model.mujoco_arena.table_offset[2])
        self.pick_body = env.cube_body_id if task == "lift" else env.cubeA_body_id
        self.phase, self.phase_steps, self._hold = "approach", 0, np.zeros(3)

    def _pos(self, body: int) -> np.ndarray:
        return np.array(self.env.sim.data.body_xpos[body])

    def _waypoint(self) -> tuple[np.ndarray, float, float]:
        cube = self._pos(self.pick_body) + self.style.grasp_offset
        carry_z = self.table_z + self.style.lift_height
        p = self.phase
        if p == "approach":
            return np.r_[cube[:2], cube[2] + 0.08], OPEN, 0.01
        if p == "descend":
            return cube, OPEN, 0.005
        if p == "close":
            return self._hold, CLOSE, -1.0
        if p == "lift":
            return np.r_[self._hold[:2], carry_z], CLOSE, 0.02
        base = self._pos(self.env.cubeB_body_id)
        over = base[:2] + self.style.place_offset
        if p == "carry":
            return np.r_[over, carry_z], CLOSE, 0.01
        if p == "lower":  # cube A (4 cm) resting on cube B (5 cm): centres 0.045 m apart, release 1 cm above
            return np.r_[over, base[2] + 0.045 + 0.01 + self.style.grasp_offset[2]], CLOSE, 0.006
        if p == "open":
            return self._hold, OPEN, -1.0
        return np.r_[self._hold[:2], carry_z], OPEN, -1.0

    def act(self, obs: dict) -> np.ndarray:
        """The next 4-dim action (float32)."""
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        target, gripper, tol = self._waypoint()
        if (tol > 0 and np.linalg.norm(target - eef) < tol) or self.phase_steps >= self.BUDGET[self.phase]:
            if self.phase in ("descend", "lower"):
                self._hold = eef.copy()
            self.phase, self.phase_steps = self.NEXT[self.phase], 0
            target, gripper, tol = self._waypoint()
        self.phase_steps += 1
        move = self.GAIN * (target - eef) / POS_SCALE
        norm = np.linalg.norm(move)
        if norm > self.style.speed:
            move *= self.style.speed / norm
        if self.phase not in ("close", "open"):
            move = move + self.rng.normal(0.0, self.style.noise, 3)
        return np.clip(np.r_[move, gripper], -1.0, 1.0).astype(np.float32)

    @property
    def may_succeed(self) -> bool:
        """Lift succeeds while lifting; Stack only counts once the cube is released."""
        return self.phase in ("lift", "carry") if self.task == "lift" else self.phase in ("open", "retreat")


class RobosuiteExpertRunner:
    """Seeded expert episodes of the robosuite tasks; keeps one env per task between episodes."""

    def __init__(self, image_size: int, max_steps: int):
        self.image_size, self.max_steps = image_size, max_steps
        self.env, self.task_id = None, None

    def __call__(self, task_id: int, seed: int, record: bool = True) -> Episode:
        name = TASK_NAMES[task_id]
        env_name, language = TASKS[name]
        if task_id != self.task_id:
            self.close()
            self.env, self.task_id = make_env(env_name, self.image_size, render=record), task_id
        env = self.env
        start = time.perf_counter()
        np.random.seed(seed)  # robosuite's placement samplers draw from numpy's global generator
        obs = env.reset()
        for _ in range(SETTLE_STEPS):
            obs, _, _, _ = env.step(np.r_[np.zeros(3), OPEN])
        expert = CubeExpert(env, name, np.random.default_rng(seed))
        images: dict[str, list] = {cam: [] for cam in CAMERAS}
        states, actions = [], []
        success = False
        for _ in range(self.max_steps):
            action = expert.act(obs)
            if record:
                for cam, img in render_upright(env, self.image_size).items():
                    images[cam].append(img)
                states.append(robot_state(obs))
            actions.append(action)
            obs, _, _, _ = env.step(action)
            if expert.may_succeed and env._check_success():
                success = True
                break
        frames = None
        if success and record:
            frames = {f"observation.images.{cam}": np.stack(v) for cam, v in images.items()}
            frames["observation.state"] = np.stack(states)
            frames["action"] = np.stack(actions)
        return Episode(task_id, seed, success, len(actions), time.perf_counter() - start, language, frames)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env, self.task_id = None, None


# ---- command line --------------------------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[int]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--tasks must list distinct names from {TASK_NAMES}, got {text!r}")
    return [TASK_NAMES.index(n) for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = recording_parser(__doc__, max_steps=200)
    p.add_argument("--tasks", type=parse_tasks, default=[0], help=f"comma-separated from {TASK_NAMES} (default: lift)")
    p.add_argument("--out", type=Path, default=None,
                   help="dataset root (default: datasets/local/robosuite_ur5e_<tasks>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_recording_args(build_parser(), argv)
    names = [TASK_NAMES[t] for t in args.tasks]
    out = args.out or ROOT / "datasets" / "local" / f"robosuite_ur5e_{'_'.join(names)}"
    request = {
        "generator": "robosuite_expert", "robot": ROBOT, "controller": CONTROLLER, "tasks": names,
        "episodes": args.episodes, "image_size": args.image_size, "max_steps": args.max_steps, "seed": args.seed,
    }
    return record_from_args(
        args,
        out,
        runner_factory=RobosuiteExpertRunner,
        runner_kwargs={"image_size": args.image_size, "max_steps": args.max_steps},
        task_ids=args.tasks,
        features=demo_features(CAMERAS, args.image_size, STATE_NAMES, ACTION_NAMES),
        fps=CONTROL_FREQ,
        robot_type=ROBOT.lower(),
        request=request,
    )


if __name__ == "__main__":
    sys.exit(main())

"""robosuite envs of the heterogeneous-robot embodiments, and the simulator -> dataset observation mapping.

Shared by the scripted-expert generator (`datasets/robosuite_expert.py`, which records the datasets) and the
evaluation (`vla.sim.robosuite`, which scores policies trained on them): both must build the same env (arms,
controller, control rate), settle it the same way and read the same cameras and state, or a policy would be
evaluated on observations it was never trained on.

    ur5e_osc_position    UR5e + Robotiq 85, OSC_POSITION (3 + 1), 20 Hz, frontview + wrist, 128 px  (default)
    panda_osc_position   Panda (robosuite's own), OSC_POSITION (3 + 1), 10 Hz, agentview only, 96 px
    iiwa_joint_position  IIWA + Robotiq 140, JOINT_POSITION deltas (7 + 1), 20 Hz, sideview + wrist, 112 px
    panda_bimanual       two Pandas (opposed), OSC_POSE per arm (2 x (6 + 1) = 14), 20 Hz, frontview only, 128 px
    kinova3_osc_pose     Kinova Gen3 + Robotiq 85, OSC_POSE (6 + 1), 10 Hz, agentview + wrist, 128 px

Each is one registry entry of `datasets/embodiments.yaml` (the UR5e's is built in). Importing this module loads no
simulator: robosuite is imported by `make_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vla.sim.libero_env import disable_msaa, quat_to_axis_angle

POS_SCALE = 0.05
"""OSC_POSITION / OSC_POSE: an action of 1.0 moves the position set-point by 0.05 m."""
ROT_SCALE = 0.5
"""OSC_POSE: an action of 1.0 turns the orientation set-point by 0.5 rad."""
JOINT_SCALE = 0.05
"""JOINT_POSITION: an action of 1.0 moves a joint's set-point by 0.05 rad."""
OPEN, CLOSE = -1.0, 1.0
"""Gripper commands of every embodiment here."""
SETTLE_STEPS = 5
"""Idle steps (`RobotSpec.idle_action`) after every reset, before the first recorded or evaluated step."""
MAX_STEPS = 200
"""The generator's default step limit of one episode (its `--max-steps`), also the evaluation budget."""

TASKS = {
    "lift": ("Lift", "lift the red cube"),
    "stack": ("Stack", "stack the red cube on the green cube"),
    "two_arm_lift": ("TwoArmLift", "lift the pot by its two handles"),
}
"""Task name -> (robosuite environment, instruction). Task ids are positions in this dict (they seed episodes)."""
TASK_NAMES = list(TASKS)


@dataclass(frozen=True)
class RobotSpec:
    """One embodiment this generator records: what robosuite builds and what lands in the dataset.

    Attributes:
        embodiment: registry name, written as the dataset's `robot_type`.
        robots: robosuite robot names, one per arm.
        controller: robosuite controller of every arm (OSC_POSITION, OSC_POSE or JOINT_POSITION).
        control_freq: actions per second (also the dataset's fps).
        cameras: recorded robosuite cameras.
        image_size: default square resolution of those cameras.
        tasks: the task names of `TASKS` the expert can do with these arms.
        gripper_joints: indices of the two driven joints in `robot<i>_gripper_qpos` (the recorded finger state).
        out_prefix: default dataset directory name before the task names.
    """

    embodiment: str
    robots: tuple[str, ...]
    controller: str
    control_freq: int
    cameras: tuple[str, ...]
    image_size: int
    tasks: tuple[str, ...]
    gripper_joints: tuple[int, int]
    out_prefix: str

    @property
    def arm_action_names(self) -> list[str]:
        if self.controller == "OSC_POSITION":
            return ["dx", "dy", "dz", "gripper"]
        if self.controller == "OSC_POSE":
            return ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"]
        return [f"dq{j}" for j in range(7)] + ["gripper"]

    @property
    def arm_state_names(self) -> list[str]:
        names = ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_left", "gripper_right"]
        return names + ([f"q{j}" for j in range(7)] if self.controller == "JOINT_POSITION" else [])

    def _per_arm(self, names: list[str]) -> list[str]:
        return names if len(self.robots) == 1 else [f"r{i}_{n}" for i in range(len(self.robots)) for n in names]

    @property
    def action_names(self) -> list[str]:
        return self._per_arm(self.arm_action_names)

    @property
    def state_names(self) -> list[str]:
        return self._per_arm(self.arm_state_names)

    @property
    def arm_action_dim(self) -> int:
        return len(self.arm_action_names)

    @property
    def action_dim(self) -> int:
        return self.arm_action_dim * len(self.robots)

    def idle_action(self) -> np.ndarray:
        """Hold still with open grippers (every controller here is a delta controller: zero = stay)."""
        action = np.zeros(self.arm_action_dim * len(self.robots))
        action[self.arm_action_dim - 1 :: self.arm_action_dim] = OPEN
        return action


SINGLE_ARM_TASKS = ("lift", "stack")
ROBOTS = {
    "ur5e_osc_position": RobotSpec("robosuite_ur5e_osc", ("UR5e",), "OSC_POSITION", 20,
                                   ("frontview", "robot0_eye_in_hand"), 128, SINGLE_ARM_TASKS, (0, 3),
                                   "robosuite_ur5e"),
    "panda_osc_position": RobotSpec("robosuite_panda_osc", ("Panda",), "OSC_POSITION", 10, ("agentview",), 96,
                                    SINGLE_ARM_TASKS, (0, 1), "robosuite_panda"),
    "iiwa_joint_position": RobotSpec("robosuite_iiwa_joint_pos", ("IIWA",), "JOINT_POSITION", 20,
                                     ("sideview", "robot0_eye_in_hand"), 112, SINGLE_ARM_TASKS, (0, 3),
                                     "robosuite_iiwa"),
    "panda_bimanual": RobotSpec("robosuite_bimanual_panda_osc_pose", ("Panda", "Panda"), "OSC_POSE", 20,
                                ("frontview",), 128, ("two_arm_lift",), (0, 1), "robosuite_bimanual_panda"),
    "kinova3_osc_pose": RobotSpec("robosuite_kinova3_osc_pose", ("Kinova3",), "OSC_POSE", 10,
                                  ("agentview", "robot0_eye_in_hand"), 128, SINGLE_ARM_TASKS, (0, 3),
                                  "robosuite_kinova3"),
}
"""`--robot` name -> embodiment. Their registry entries: `datasets/embodiments.yaml` (the UR5e is built in)."""
DEFAULT_ROBOT = "ur5e_osc_position"
HELD_OUT_ROBOT = "kinova3_osc_pose"
"""Not in the pretraining mixture: the new robot a pretrained policy is fine-tuned on."""


def make_env(spec: RobotSpec, env_name: str, render: bool = True):
    """A robosuite env of the spec's arms and controller (cameras rendered on demand, never as observations)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import robosuite
    from robosuite import load_controller_config

    two_arms = len(spec.robots) > 1
    env = robosuite.make(
        env_name,
        robots=list(spec.robots) if two_arms else spec.robots[0],
        controller_configs=load_controller_config(default_controller=spec.controller),
        **({"env_configuration": "single-arm-opposed"} if two_arms else {}),
        has_renderer=False,
        has_offscreen_renderer=render,
        use_camera_obs=False,  # cameras are rendered only for recorded frames, see `render_upright`
        control_freq=spec.control_freq,
        horizon=10_000,
        ignore_done=True,
        hard_reset=False,  # reset re-samples the objects in place instead of rebuilding the model
    )
    if render:
        disable_msaa(env.sim)  # ~1.5x faster software rendering, same look at 128 px
    return env


def render_upright(env, cameras: tuple[str, ...], image_size: int) -> dict[str, np.ndarray]:
    """Camera name -> uint8 (S, S, 3) image, flipped upright (MuJoCo renders bottom-up)."""
    return {
        cam: np.ascontiguousarray(env.sim.render(camera_name=cam, width=image_size, height=image_size)[::-1])
        for cam in cameras
    }


def robot_state(obs: dict, spec: RobotSpec) -> np.ndarray:
    """float32 state of every arm: eef position, eef axis-angle, the two driven gripper joints (+ the 7 joint
    positions under joint control, where they are what the action moves)."""
    parts = []
    for i in range(len(spec.robots)):
        gripper = np.asarray(obs[f"robot{i}_gripper_qpos"])[list(spec.gripper_joints)]
        parts += [obs[f"robot{i}_eef_pos"], quat_to_axis_angle(obs[f"robot{i}_eef_quat"]), gripper]
        if spec.controller == "JOINT_POSITION":
            parts.append(np.arctan2(obs[f"robot{i}_joint_pos_sin"], obs[f"robot{i}_joint_pos_cos"]))
    return np.concatenate(parts).astype(np.float32)


def reset_settled(env, spec: RobotSpec, seed: int | list[int]) -> dict:
    """Reset `env` from `seed` and send `SETTLE_STEPS` idle actions; returns the raw observation after them.

    robosuite's placement samplers and initial joint noise draw from numpy's global generator, so seeding it
    before the reset fixes the initial state. `seed` is what `np.random.seed` takes: an int below 2**32 (the
    generator's demonstration seeds) or a list of such words (the evaluation's seeds, see `vla.sim.robosuite`).
    """
    np.random.seed(seed)
    obs = env.reset()
    for _ in range(SETTLE_STEPS):
        obs, _, _, _ = env.step(spec.idle_action())
    return obs


def reset_fresh(env, spec: RobotSpec, seed: int | list[int]) -> dict:
    """`reset_settled` through a robosuite hard reset: the model is rebuilt (cube sizes re-drawn from the seeded
    generator, no physics warm start or controller state carried over from the previous episode), so the
    episode depends on `seed` alone. The evaluation's reset; the generator records with in-place resets."""
    env.hard_reset = True
    try:
        obs = reset_settled(env, spec, seed)
    finally:
        env.hard_reset = False
    if env.has_offscreen_renderer:
        disable_msaa(env.sim)  # the rebuilt model renders with MuJoCo's default multisampling again
    return obs

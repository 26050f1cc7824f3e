#!/usr/bin/env python
"""Scripted-expert robosuite demonstrations of several robots and action spaces, as LeRobot v3 datasets.

robosuite supplies the robots LIBERO lacks, so a mixture can hold real heterogeneity: different arms, grippers,
action spaces, control rates and camera set-ups. `--robot` picks one embodiment of `ROBOTS` (each one registry
entry in `datasets/embodiments.yaml`, except the UR5e, which is built in):

    ur5e_osc_position    UR5e + Robotiq 85, OSC_POSITION (3 + 1), 20 Hz, frontview + wrist, 128 px  (default)
    panda_osc_position   Panda (robosuite's own), OSC_POSITION (3 + 1), 10 Hz, agentview only, 96 px
    iiwa_joint_position  IIWA + Robotiq 140, JOINT_POSITION deltas (7 + 1), 20 Hz, sideview + wrist, 112 px
    panda_bimanual       two Pandas (opposed), OSC_POSE per arm (2 x (6 + 1) = 14), 20 Hz, frontview only, 128 px
    kinova3_osc_pose     Kinova Gen3 + Robotiq 85, OSC_POSE (6 + 1), 10 Hz, agentview + wrist, 128 px

The expert reads object poses from the simulator and plans one Cartesian waypoint sequence per arm (above the
object, down, close, up; for `stack` over the other cube, down, open); a per-controller adapter turns the
Cartesian command into the robot's own action: a position delta (OSC_POSITION), a position and axis-angle delta
that holds the grasp orientation (OSC_POSE), or joint-position deltas solved through the arm's Jacobian
(JOINT_POSITION, damped least squares). Each episode draws a small style (grasp offset, speed, heights) and adds
per-step noise. Only successful episodes are kept.

Recorded per step at the robot's control rate: the robot's cameras (upright), its state (see `state_names`), the
action as sent, and the task string. The dataset's `robot_type` is the embodiment's registry name.

    python datasets/robosuite_expert.py --tasks lift --episodes 50
    python datasets/robosuite_expert.py --robot panda_osc_position --tasks lift,stack --episodes 20
    python datasets/robosuite_expert.py --robot panda_bimanual --tasks two_arm_lift --episodes 20
    python datasets/robosuite_expert.py --robot iiwa_joint_position --tasks lift --check 10   # expert only, no files
"""

from __future__ import annotations

import argparse
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
    TaskStats,
    demo_features,
    episode_seed,
    format_summary,
    parse_recording_args,
    record_from_args,
    recording_parser,
)
from vla.sim.libero_env import rotation_error
from vla.sim.robosuite_env import (  # noqa: F401 - the env pieces live in the library; re-exported for callers
    CLOSE,
    DEFAULT_ROBOT,
    HELD_OUT_ROBOT,
    JOINT_SCALE,
    MAX_STEPS,
    OPEN,
    POS_SCALE,
    ROBOTS,
    ROT_SCALE,
    SETTLE_STEPS,
    SINGLE_ARM_TASKS,
    TASK_NAMES,
    TASKS,
    RobotSpec,
    make_env,
    render_upright,
    reset_settled,
    robot_state,
)

# The default embodiment, as module constants (what `bench/` and older callers read).
EMBODIMENT = ROBOT_TYPE = ROBOTS[DEFAULT_ROBOT].embodiment
ROBOT = ROBOTS[DEFAULT_ROBOT].robots[0]
CONTROLLER = ROBOTS[DEFAULT_ROBOT].controller
CONTROL_FREQ = ROBOTS[DEFAULT_ROBOT].control_freq
CAMERAS = ROBOTS[DEFAULT_ROBOT].cameras
STATE_NAMES = ROBOTS[DEFAULT_ROBOT].state_names
ACTION_NAMES = ROBOTS[DEFAULT_ROBOT].action_names


# ---- from a Cartesian command to the robot's own action ------------------------------------------------------------


def quat_to_matrix(quat_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / np.linalg.norm(quat_xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def pointing_down(rotation: np.ndarray) -> np.ndarray:
    """`rotation` (3x3, an end effector whose z axis is its approach direction) turned by the smallest rotation
    that points that axis straight down: the grasp orientation an expert holds, keeping the hand's yaw."""
    approach, down = rotation[:, 2], np.array([0.0, 0.0, -1.0])
    axis = np.cross(approach, down)
    s, c = np.linalg.norm(axis), float(approach @ down)
    if s < 1e-9:
        return rotation
    k = axis / s
    skew = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return (np.eye(3) + s * skew + (1.0 - c) * skew @ skew) @ rotation


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ArmAdapter:
    """Turns one arm's Cartesian command (a position step in OSC_POSITION units and a gripper command) into that
    arm's action under its controller, holding the orientation `hold` (3x3, world) where the controller can turn.

    JOINT_POSITION has no Cartesian input, so the step and the orientation correction are mapped to joint deltas
    through the arm's 6 x 7 Jacobian (damped least squares: well-behaved near singularities)."""

    ROT_GAIN = 1.0
    JOINT_GAIN = 2.0  # the joint PD controller reaches its set-point more slowly than OSC: ask for a longer step
    DAMPING = 0.05

    def __init__(self, env, arm: int, controller: str, hold: np.ndarray):
        self.env, self.arm, self.controller, self.hold = env, arm, controller, hold

    def orientation(self, obs: dict) -> np.ndarray:
        return quat_to_matrix(obs[f"robot{self.arm}_eef_quat"])

    def action(self, obs: dict, move: np.ndarray, gripper: float, rng: np.random.Generator | None,
               noise: float) -> np.ndarray:
        """move: (3,) position step, 1.0 = 0.05 m, already noisy; rng: draws rotation noise (None: none)."""
        if self.controller == "OSC_POSITION":
            return np.r_[move, gripper]
        rot = self.ROT_GAIN * rotation_error(self.hold, self.orientation(obs))
        if self.controller == "OSC_POSE":
            rot = rot / ROT_SCALE
            if rng is not None:
                rot = rot + rng.normal(0.0, noise / 2, 3)
            return np.r_[move, rot, gripper]
        controller = self.env.robots[self.arm].controller
        controller.update(force=True)  # kinematics of the current state
        jac = np.asarray(controller.J_full)
        twist = np.r_[np.clip(move, -1.0, 1.0) * POS_SCALE, np.clip(rot, -0.3, 0.3)]
        dq = jac.T @ np.linalg.solve(jac @ jac.T + self.DAMPING**2 * np.eye(6), twist)
        dq = self.JOINT_GAIN * dq / JOINT_SCALE
        peak = np.abs(dq).max()
        if peak > 1.0:  # scale, not clip: keep the direction of the joint step
            dq /= peak
        return np.r_[dq, gripper]


# ---- the experts ---------------------------------------------------------------------------------------------------


@dataclass
class Style:
    """Per-episode variation of the expert."""

    grasp_offset: np.ndarray  # (3,) m added to the object's grasp point
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


def position_step(target: np.ndarray, eef: np.ndarray, gain: float, speed: float) -> np.ndarray:
    """A proportional step towards `target` in OSC_POSITION units, its norm limited to `speed`."""
    move = gain * (target - eef) / POS_SCALE
    norm = np.linalg.norm(move)
    if norm > speed:
        move *= speed / norm
    return move


class CubeExpert:
    """Waypoints for Lift (approach, descend, close, lift) and Stack (+ carry, lower, open, retreat), one arm."""

    GAIN = 1.5
    BUDGET: ClassVar[dict[str, int]] = {
        "approach": 60, "descend": 40, "close": 12, "lift": 60, "carry": 60, "lower": 40, "open": 8, "retreat": 10_000,
    }
    NEXT: ClassVar[dict[str, str]] = {
        "approach": "descend", "descend": "close", "close": "lift", "lift": "carry", "carry": "lower", "lower": "open",
        "open": "retreat", "retreat": "retreat",
    }

    def __init__(self, env, task: str, rng: np.random.Generator, spec: RobotSpec, obs: dict,
                 style: Style | None = None):
        self.env, self.task, self.rng, self.spec = env, task, rng, spec
        self.style = style or Style.sample(rng)
        self.table_z = float(env.model.mujoco_arena.table_offset[2])
        self.pick_body = env.cube_body_id if task == "lift" else env.cubeA_body_id
        self.phase, self.phase_steps, self._hold = "approach", 0, np.zeros(3)
        self.arm = ArmAdapter(env, 0, spec.controller, pointing_down(quat_to_matrix(obs["robot0_eef_quat"])))

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
        """The next action in the robot's own space (float32, in [-1, 1])."""
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        target, gripper, tol = self._waypoint()
        if (tol > 0 and np.linalg.norm(target - eef) < tol) or self.phase_steps >= self.BUDGET[self.phase]:
            if self.phase in ("descend", "lower"):
                self._hold = eef.copy()
            nxt = self.NEXT[self.phase]
            self.phase = self.phase if (self.task == "lift" and nxt == "carry") else nxt  # Lift ends lifting
            self.phase_steps = 0
            target, gripper, tol = self._waypoint()
        self.phase_steps += 1
        move = position_step(target, eef, self.GAIN, self.style.speed)
        noisy = self.phase not in ("close", "open")
        if noisy:
            move = move + self.rng.normal(0.0, self.style.noise, 3)
        action = self.arm.action(obs, move, gripper, self.rng if noisy else None, self.style.noise)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    @property
    def may_succeed(self) -> bool:
        """Lift succeeds while lifting; Stack only counts once the cube is released."""
        return self.phase in ("lift", "carry") if self.task == "lift" else self.phase in ("open", "retreat")


def finger_direction(env, arm: int) -> np.ndarray:
    """Unit xy direction along which arm `arm`'s fingers close (between its two finger pads)."""
    gripper = env.robots[arm].gripper
    left, right = (env.sim.data.geom_xpos[env.sim.model.geom_name2id(gripper.important_geoms[side][0])]
                   for side in ("left_finger", "right_finger"))
    d = (left - right)[:2]
    return d / np.linalg.norm(d)


class PotExpert:
    """TwoArmLift: each arm turns its fingers across its handle's bar, approaches it from above, descends, both
    close, and both lift together (the phase advances only when both arms are there, or on the step budget)."""

    GAIN = 1.5
    BUDGET: ClassVar[dict[str, int]] = {"approach": 80, "descend": 50, "close": 15, "lift": 10_000}
    NEXT: ClassVar[dict[str, str]] = {"approach": "descend", "descend": "close", "close": "lift", "lift": "lift"}

    def __init__(self, env, task: str, rng: np.random.Generator, spec: RobotSpec, obs: dict,
                 style: Style | None = None):
        self.env, self.rng, self.spec = env, rng, spec
        self.style = style or Style.sample(rng)
        self.table_z = float(env.model.mujoco_arena.table_offset[2])
        self.phase, self.phase_steps = "approach", 0
        self._hold = [np.zeros(3), np.zeros(3)]
        bar = self._handles()[1][:2] - self._handles()[0][:2]
        self.arms = []
        for i in range(2):
            closing = finger_direction(env, i)
            yaw = np.arctan2(bar[1], bar[0]) - np.arctan2(closing[1], closing[0])
            yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2  # fingers are symmetric: the smaller of the two turns
            self.arms.append(ArmAdapter(env, i, spec.controller, rot_z(yaw) @ quat_to_matrix(obs[f"robot{i}_eef_quat"])))

    def _handles(self) -> list[np.ndarray]:
        return [np.array(self.env._handle0_xpos), np.array(self.env._handle1_xpos)]

    def _waypoints(self) -> list[tuple[np.ndarray, float, float]]:
        out = []
        for i, handle in enumerate(self._handles()):
            grasp = handle + self.style.grasp_offset
            p = self.phase
            if p == "approach":
                out.append((np.r_[grasp[:2], grasp[2] + 0.08], OPEN, 0.01))
            elif p == "descend":
                out.append((grasp, OPEN, 0.006))
            elif p == "close":
                out.append((self._hold[i], CLOSE, -1.0))
            else:
                out.append((np.r_[self._hold[i][:2], self.table_z + 0.15 + self.style.lift_height], CLOSE, -1.0))
        return out

    def act(self, obs: dict) -> np.ndarray:
        eefs = [np.asarray(obs[f"robot{i}_eef_pos"], dtype=np.float64) for i in range(2)]
        points = self._waypoints()
        reached = all(tol > 0 and np.linalg.norm(t - e) < tol for (t, _, tol), e in zip(points, eefs, strict=True))
        if reached or self.phase_steps >= self.BUDGET[self.phase]:
            if self.phase == "descend":
                self._hold = [e.copy() for e in eefs]
            self.phase, self.phase_steps = self.NEXT[self.phase], 0
            points = self._waypoints()
        self.phase_steps += 1
        noisy = self.phase != "close"
        parts = []
        for arm, (target, gripper, _), eef in zip(self.arms, points, eefs, strict=True):
            move = position_step(target, eef, self.GAIN, self.style.speed)
            if noisy:
                move = move + self.rng.normal(0.0, self.style.noise, 3)
            parts.append(arm.action(obs, move, gripper, self.rng if noisy else None, self.style.noise))
        return np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32)

    @property
    def may_succeed(self) -> bool:
        return self.phase == "lift"


EXPERTS = {"lift": CubeExpert, "stack": CubeExpert, "two_arm_lift": PotExpert}


class RobosuiteExpertRunner:
    """Seeded expert episodes of one robot's robosuite tasks; keeps one env per task between episodes."""

    def __init__(self, image_size: int, max_steps: int, robot: str = DEFAULT_ROBOT):
        self.spec = ROBOTS[robot]
        self.image_size, self.max_steps = image_size, max_steps
        self.env, self.task_id, self.rendering = None, None, None

    def __call__(self, task_id: int, seed: int, record: bool = True) -> Episode:
        spec = self.spec
        name = TASK_NAMES[task_id]
        env_name, language = TASKS[name]
        if task_id != self.task_id or record != self.rendering:
            self.close()
            self.env, self.task_id, self.rendering = make_env(spec, env_name, render=record), task_id, record
        env = self.env
        start = time.perf_counter()
        obs = reset_settled(env, spec, seed)  # numpy's global generator seeded: the placement samplers draw from it
        expert = EXPERTS[name](env, name, np.random.default_rng(seed), spec, obs)
        images: dict[str, list] = {cam: [] for cam in spec.cameras}
        states, actions = [], []
        success = False
        for _ in range(self.max_steps):
            action = expert.act(obs)
            if record:
                for cam, img in render_upright(env, spec.cameras, self.image_size).items():
                    images[cam].append(img)
                states.append(robot_state(obs, spec))
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
            self.env, self.task_id, self.rendering = None, None, None


def check_expert(robot: str, task_ids: list[int], episodes: int, seed: int, max_steps: int) -> list[dict]:
    """Physics-only expert rollouts (no cameras, nothing written): per-task `TaskStats.summary()` dicts.

    Seeds follow `episode_seed(seed, task, k)`, the same stream a dataset of that `--seed` starts from."""
    runner = RobosuiteExpertRunner(image_size=16, max_steps=max_steps, robot=robot)
    out = []
    try:
        for t in task_ids:
            stats = TaskStats(t)
            for k in range(episodes):
                stats.add(runner(t, episode_seed(seed, t, k), record=False))
            out.append(stats.summary())
    finally:
        runner.close()
    return out


# ---- command line --------------------------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[int]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--tasks must list distinct names from {TASK_NAMES}, got {text!r}")
    return [TASK_NAMES.index(n) for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = recording_parser(__doc__, max_steps=MAX_STEPS)
    p.add_argument("--robot", choices=list(ROBOTS), default=DEFAULT_ROBOT,
                   help=f"embodiment to record (default: {DEFAULT_ROBOT}); sets the default --image-size")
    p.add_argument("--tasks", type=parse_tasks, default=None,
                   help=f"comma-separated from {TASK_NAMES} (default: the robot's first task)")
    p.add_argument("--out", type=Path, default=None,
                   help="dataset root (default: datasets/local/<robot prefix>_<tasks>)")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="only measure the expert: N physics-only episodes per task, print the table, write nothing")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; the robot's own image size is the default, and tasks the robot cannot do are
    refused here, before any simulator starts or any file is written."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    spec = ROBOTS[known.robot]
    parser.set_defaults(image_size=spec.image_size)
    args = parse_recording_args(parser, argv)
    if args.tasks is None:
        args.tasks = [TASK_NAMES.index(spec.tasks[0])]
    wrong = [TASK_NAMES[t] for t in args.tasks if TASK_NAMES[t] not in spec.tasks]
    if wrong:
        parser.error(f"robot {args.robot} cannot do task(s) {wrong}; its tasks: {list(spec.tasks)}")
    if args.check < 0:
        parser.error("--check must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = ROBOTS[args.robot]
    names = [TASK_NAMES[t] for t in args.tasks]
    if args.check:
        tasks = check_expert(args.robot, args.tasks, args.check, args.seed, args.max_steps)
        ok, tried = sum(d["successes"] for d in tasks), sum(d["attempts"] for d in tasks)
        print(f"{args.robot} ({spec.embodiment}), physics only, seed {args.seed}")
        print(format_summary(tasks))
        print(f"expert success {ok}/{tried} ({100 * ok / max(tried, 1):.1f}%)")
        return 0
    out = args.out or ROOT / "datasets" / "local" / f"{spec.out_prefix}_{'_'.join(names)}"
    request = {
        "generator": "robosuite_expert", "robot": "+".join(spec.robots), "controller": spec.controller,
        "tasks": names, "episodes": args.episodes, "image_size": args.image_size, "max_steps": args.max_steps,
        "seed": args.seed,
    }
    return record_from_args(
        args,
        out,
        runner_factory=RobosuiteExpertRunner,
        runner_kwargs={"image_size": args.image_size, "max_steps": args.max_steps, "robot": args.robot},
        task_ids=args.tasks,
        features=demo_features(spec.cameras, args.image_size, spec.state_names, spec.action_names),
        fps=spec.control_freq,
        robot_type=spec.embodiment,
        request=request,
    )


if __name__ == "__main__":
    sys.exit(main())

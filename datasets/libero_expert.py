#!/usr/bin/env python
"""Scripted-expert LIBERO demonstrations, written as a LeRobot v3 dataset.

The expert reads privileged simulator state (object and target poses, collision geometry) and drives the Panda
with the standard OSC_POSE controller through one pick-and-place ("in"/"on" goal): over the object at a safe
height, the gripper turned across the object's narrow side at a yaw whose open hand clears tall neighbours (a
bowl too wide to span is gripped at its rim), descend, close, lift clear of every obstacle, carry the object's
centre over the target, lower until the hand is just above the receptacle's rim, open. Each episode draws a
small style (grasp offset and depth, speed, clearance, release point) and adds small per-step noise, so
demonstrations vary without changing the grasp. Initial states come from fresh seeded resets (the benchmark's
fixed init states are the evaluation's test set and are never used here); a reset in which the object to pick
fell over is rejected before the rollout. Only successful episodes are kept.

Recorded per step, at the control rate (20 fps): the two cameras of the official evaluation (`agentview`,
`wrist` = robot0_eye_in_hand) as upright 128 px images, the 8-dim state of `vla.sim.libero_env.libero_state`,
the 7-dim action exactly as sent to `env.step`, and the task's instruction.

Cameras are rendered only for recorded frames: the env steps physics without cameras (settling steps and
rollouts are pixel-free) and `render_cameras` is called once per recorded step.

    python datasets/libero_expert.py --suite libero_object --tasks 0 --episodes 50
    python datasets/libero_expert.py --suite libero_object --tasks 0-4 --episodes 20 --workers 2
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
from vla.sim import libero_env as L

STATE_NAMES = ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_left", "gripper_right"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
ROBOT_TYPE = "libero_panda"
"""The dataset's `robot_type`: the registered embodiment name, so `data.embodiment` can be left empty."""
POS_SCALE = 0.05
"""OSC_POSE: an action of 1.0 moves the position set-point by 0.05 m."""
ROT_SCALE = 0.5
"""OSC_POSE: an action of 1.0 rotates the orientation set-point by 0.5 rad (world-frame axis-angle)."""
SETTLE_STEPS = 10
"""No-op steps after reset while objects settle (not recorded; the evaluation waits the same way)."""
MAX_GRIPPER_OPENING = 0.07
"""Widest object span (m) the Panda gripper closes across (fingers open to ~0.078 m), with a margin."""
DOWN = np.diag([1.0, -1.0, -1.0])
"""End-effector orientation pointing straight down with yaw 0 (LIBERO's home orientation, untilted)."""


# ---- privileged geometry -----------------------------------------------------------------------------------------


_CORNER_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def collision_geoms(model, body_id: int) -> np.ndarray:
    """Ids of the collision geoms of a body and all its descendants."""
    bodies = {body_id}
    for b in range(body_id + 1, model.nbody):  # MuJoCo numbers children after their parents
        if model.body_parentid[b] in bodies:
            bodies.add(b)
    in_subtree = np.isin(model.geom_bodyid, list(bodies))
    collides = (model.geom_contype != 0) | (model.geom_conaffinity != 0)
    geoms = np.flatnonzero(in_subtree & collides)
    if geoms.size == 0:
        raise ValueError(f"body {model.body(body_id).name!r} has no collision geometry")
    return geoms


def collision_points(sim, geoms: np.ndarray) -> np.ndarray:
    """(8 * len(geoms), 3) world corners of the bounding boxes of `geoms` (see `collision_geoms`)."""
    model, data = sim.model._model, sim.data._data
    aabb = model.geom_aabb[geoms]  # (G, 6): centre and half size in the geom frame
    local = aabb[:, None, :3] + _CORNER_SIGNS[None] * aabb[:, None, 3:]  # (G, 8, 3)
    rot = data.geom_xmat[geoms].reshape(-1, 3, 3)
    world = np.einsum("gij,gkj->gki", rot, local) + data.geom_xpos[geoms][:, None]
    return world.reshape(-1, 3)


@dataclass
class Footprint:
    """An object seen from above: an oriented rectangle (its own horizontal axes) and a height range.

    Attributes:
        center: (2,) world xy of the rectangle's centre.
        axes: (2, 2) rows are the unit world-xy directions of the rectangle's sides.
        half: (2,) half extents along `axes`.
        bottom, top: world z range of the collision geometry.
    """

    center: np.ndarray
    axes: np.ndarray
    half: np.ndarray
    bottom: float
    top: float

    @property
    def height(self) -> float:
        return self.top - self.bottom

    def radius_along(self, direction: np.ndarray) -> float:
        """Half extent of the rectangle projected on a unit direction."""
        return float(np.abs(self.axes @ direction) @ self.half)


def footprint(points: np.ndarray, body_rot: np.ndarray) -> Footprint:
    """Footprint of collision `points` (N, 3) of a body with rotation `body_rot` (3, 3)."""
    # the two body axes closest to horizontal span the footprint (objects stand upright, whatever their convention)
    idx = sorted(range(3), key=lambda i: abs(body_rot[2, i]))[:2]
    axes = np.stack([body_rot[:2, i] / max(np.linalg.norm(body_rot[:2, i]), 1e-9) for i in idx])
    proj = points[:, :2] @ axes.T  # (N, 2)
    lo, hi = proj.min(0), proj.max(0)
    return Footprint((lo + hi) / 2 @ axes, axes, (hi - lo) / 2, float(points[:, 2].min()), float(points[:, 2].max()))


def rectangle_gap(a: Footprint, b: Footprint) -> float:
    """Separation of two oriented rectangles along their four side normals (> 0: disjoint by at least this)."""
    gaps = []
    for u in np.concatenate([a.axes, b.axes]):
        dist = abs(float((b.center - a.center) @ u))
        gaps.append(dist - a.radius_along(u) - b.radius_along(u))
    return max(gaps)


# Panda hand (from its collision geoms, in the end-effector frame): fingers close along the end-effector y axis;
# the hand body spans +-0.105 m along it and +-0.033 m across, its underside 0.026 m above the grip point; the
# fully open fingers span +-0.07 m x +-0.011 m and reach 0.012 m below the grip point.
HAND_HALF, HAND_ABOVE_GRIP = np.array([0.105, 0.033]), 0.026
FINGERS_HALF, FINGERS_BELOW_GRIP = np.array([0.07, 0.011]), 0.012
MAX_CARRY_ABOVE_HOME = 0.15
"""Carrying height limit above the end effector's start height (stay inside the arm's comfortable workspace)."""
RIM_GRIP_DEPTH = 0.025
"""A rim grasp puts the grip point this far below the object's top (the finger pads cover the wall's edge)."""


def closing_direction(yaw: float) -> np.ndarray:
    """World xy along which the fingers close for gripper yaw `yaw` (R = Rz(yaw) @ DOWN): (sin yaw, -cos yaw)."""
    return np.array([np.sin(yaw), -np.cos(yaw)])


def grasp_clearance(grasp_xy: np.ndarray, grasp_z: float, yaw: float, others: list[Footprint]) -> float:
    """Smallest gap (m) between the open hand at a grasp pose and the footprints of neighbouring objects.

    The hand body matters only for neighbours taller than its underside; the fingers for all of them.
    """
    d = closing_direction(yaw)
    axes = np.stack([d, np.array([-d[1], d[0]])])
    hand = Footprint(grasp_xy, axes, HAND_HALF, grasp_z + HAND_ABOVE_GRIP, np.inf)
    fingers = Footprint(grasp_xy, axes, FINGERS_HALF, grasp_z - FINGERS_BELOW_GRIP, np.inf)
    gaps = [np.inf]
    for other in others:
        gaps.append(rectangle_gap(fingers, other))
        if other.top > hand.bottom:
            gaps.append(rectangle_gap(hand, other))
    return float(min(gaps))


def choose_grasp_yaw(
    object_points: np.ndarray, grasp_xy: np.ndarray, grasp_z: float, others: list[Footprint],
    max_width: float = MAX_GRIPPER_OPENING, min_clearance: float = 0.01,
) -> float | None:
    """Gripper yaw in [-pi/2, pi/2) for a top-down grasp: narrowest span of the object, clear of neighbours.

    Every 5 degrees: the object's width across the fingers (exact, from its collision corners) must fit the
    opening; among yaws whose open hand clears all neighbours by `min_clearance`, the narrowest grasp wins
    (a small turn breaks ties, so round objects keep yaw 0); if none clears, the yaw with the most clearance.
    None if the object is too wide for the gripper at every yaw (see `choose_rim_grasp`).
    """
    best, best_cost, fallback, fallback_gap = 0.0, np.inf, 0.0, -np.inf
    xy = object_points[:, :2]
    for yaw in np.deg2rad(np.arange(-90, 90, 5)):
        proj = xy @ closing_direction(yaw)
        width = float(proj.max() - proj.min())
        if width > max_width:
            continue
        gap = grasp_clearance(grasp_xy, grasp_z, yaw, others)
        cost = width + 0.01 * abs(yaw)
        if gap >= min_clearance and cost < best_cost:
            best, best_cost = float(yaw), cost
        if gap > fallback_gap:
            fallback, fallback_gap = float(yaw), gap
    if np.isfinite(best_cost):
        return best
    return fallback if np.isfinite(fallback_gap) else None


def choose_rim_grasp(
    center: np.ndarray, rim_radius: float, grasp_z: float, others: list[Footprint], min_clearance: float = 0.01,
) -> tuple[float, np.ndarray]:
    """(yaw, xy offset from the centre) of a grasp across the wall of a wide round object (a bowl's rim).

    Every 15 degrees around the rim, the fingers close radially across the wall; among points whose open hand
    clears the neighbours by `min_clearance`, the one needing the smallest turn of the gripper wins (the arm
    tracks large yaws poorly), else the clearest.
    """
    best, best_key = None, None
    for phi in np.deg2rad(np.arange(0, 360, 15)):
        radial = np.array([np.cos(phi), np.sin(phi)])
        yaw = float((np.arctan2(radial[1], radial[0]) + np.pi) % np.pi - np.pi / 2)  # fingers close along radial
        offset = rim_radius * radial
        gap = grasp_clearance(center + offset, grasp_z, yaw, others)
        key = (gap >= min_clearance, -abs(yaw) if gap >= min_clearance else gap)
        if best_key is None or key > best_key:
            best, best_key = (yaw, offset), key
    return best


def rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def quat_to_mat(quat_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / np.linalg.norm(quat_xyzw)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# ---- the task: what to pick and where to put it --------------------------------------------------------------------


def pick_place_goal(goal_state: list) -> tuple[str, str, str]:
    """(relation, object, target) of a one-predicate goal, e.g. ["In", "milk_1", "basket_1_contain_region"].

    Raises:
        ValueError: the goal is not one "in"/"on" predicate (drawers, stoves and multi-step tasks are not scripted).
    """
    if len(goal_state) != 1 or len(goal_state[0]) != 3 or goal_state[0][0].lower() not in ("in", "on"):
        raise ValueError(f"the scripted expert handles one 'in'/'on' pick-and-place goal, got {goal_state}")
    relation, obj, target = goal_state[0]
    return relation.lower(), obj, target


def goal_of_task(suite: str, task_id: int) -> list:
    """The goal predicates of a task, parsed from its BDDL file without building the simulator."""
    from libero.libero import get_libero_path
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    task = L.get_task(suite, task_id)
    return robosuite_parse_problem(os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file))[
        "goal_state"
    ]


@dataclass
class PlaceTarget:
    """Where the carried object goes.

    Attributes:
        center: (2,) world xy to release over.
        rim_z: top of the receptacle: the carried object's bottom clears it while carrying, and the hand's
            underside stays above it while lowering.
        floor_z: lowest height for the carried object's bottom at release.
    """

    center: np.ndarray
    rim_z: float
    floor_z: float


class SceneGeometry:
    """Collision geometry of the scene's objects, looked up once per episode and read at the current state."""

    def __init__(self, env):
        self.env = env
        model = env.sim.model._model
        self.geoms = {name: collision_geoms(model, body) for name, body in env.obj_body_id.items()}

    def points(self, name: str) -> np.ndarray:
        return collision_points(self.env.sim, self.geoms[name])

    def footprint(self, name: str) -> Footprint:
        rot = self.env.sim.data.body_xmat[self.env.obj_body_id[name]].reshape(3, 3)
        return footprint(self.points(name), rot)

    def rim_radius(self, name: str) -> float:
        """Horizontal distance from the object's centre to the geoms that form its top edge (a bowl's rim)."""
        sim, geoms = self.env.sim, self.geoms[name]
        tops = collision_points(sim, geoms).reshape(len(geoms), 8, 3)[:, :, 2].max(1)
        rim = geoms[tops >= tops.max() - 0.005]
        center = self.footprint(name).center
        return float(np.median(np.linalg.norm(sim.data.geom_xpos[rim][:, :2] - center, axis=1)))

    def is_upright(self, name: str, max_tilt_deg: float = 25.0) -> bool:
        """One of the body's axes is within `max_tilt_deg` of vertical (False for an object that fell over or
        leans on a neighbour: a fresh reset can produce that, and a top-down grasp is then not meaningful)."""
        rot = self.env.sim.data.body_xmat[self.env.obj_body_id[name]].reshape(3, 3)
        return bool(np.abs(rot[2]).max() >= np.cos(np.deg2rad(max_tilt_deg)))

    def movable(self, exclude: str) -> list[str]:
        return [name for name in self.geoms if name != exclude and name in self.env.objects_dict]

    def place_target(self, target: str) -> PlaceTarget:
        """The release point over a region site (e.g. `basket_1_contain_region`) or on top of an object."""
        env, sim = self.env, self.env.sim
        if target in env.object_sites_dict:
            pos = sim.data.get_site_xpos(target)
            half = np.abs(sim.data.get_site_xmat(target) @ np.asarray(env.object_sites_dict[target].size))
            parent = getattr(env.object_states_dict.get(target), "parent_name", None)
            rim = self.points(parent)[:, 2].max() if parent in self.geoms else pos[2] - half[2]
            return PlaceTarget(pos[:2].copy(), float(rim), float(pos[2] - half[2]) + 0.02)
        if target in self.geoms:
            fp = self.footprint(target)
            return PlaceTarget(fp.center, fp.top, fp.top + 0.015)
        raise KeyError(f"place target {target!r} is neither a region site nor an object of this scene")


# ---- the expert ----------------------------------------------------------------------------------------------------


@dataclass
class Style:
    """Per-episode variation of the expert (drawn from the episode's seed)."""

    grasp_offset: np.ndarray  # (2,) m, added to the object's centre
    grasp_depth: float  # m below the object's top (capped by the object's half height)
    release_offset: np.ndarray  # (2,) m, added to the target's centre
    clearance: float  # m, margin above obstacles while carrying
    speed: float  # max translation action (1.0 = 5 cm set-point offset per step)
    noise: float  # std of per-step Gaussian noise on translation actions

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Style:
        return cls(
            grasp_offset=rng.normal(0.0, 0.003, 2),
            grasp_depth=float(rng.uniform(0.025, 0.035)),
            release_offset=rng.normal(0.0, 0.01, 2),
            clearance=float(rng.uniform(0.03, 0.05)),
            speed=float(rng.uniform(0.55, 0.75)),
            noise=0.04,
        )


class PickPlaceExpert:
    """Waypoint controller for one pick-and-place: approach -> descend -> close -> lift -> carry -> lower -> open.

    Each phase drives the end effector to a waypoint with a saturated proportional law on the position error,
    and keeps the gripper pointing down at the grasp yaw; a phase ends when its waypoint is reached (or after a
    step budget, so a stuck rollout still terminates and is discarded).
    """

    GAIN = 1.2  # translation action per 5 cm of error
    ROT_GAIN = 1.0  # rotation action per 0.5 rad of error
    ROT_LIMIT = 0.5
    RELEASE_STEPS = 6  # steps of the open command after which the fingers have let go
    BUDGET: ClassVar[dict[str, int]] = {
        "approach": 80, "descend": 50, "close": 14, "lift": 60, "carry": 80, "lower": 50, "open": 10, "retreat": 10_000,
    }
    NEXT: ClassVar[dict[str, str]] = {
        "approach": "descend", "descend": "close", "close": "lift", "lift": "carry", "carry": "lower", "lower": "open",
        "open": "retreat", "retreat": "retreat",
    }

    def __init__(self, env, goal_state: list, rng: np.random.Generator, style: Style | None = None):
        self.env, self.rng = env, rng
        self.style = style or Style.sample(rng)
        self.relation, self.obj, self.target = pick_place_goal(goal_state)
        if self.obj not in env.obj_body_id:
            raise KeyError(f"object {self.obj!r} of the goal is not in the scene")
        self.scene = scene = SceneGeometry(env)
        fp = scene.footprint(self.obj)
        self.place = scene.place_target(self.target)
        others = [scene.footprint(n) for n in scene.geoms if n != self.obj]
        obstacle_top = max([scene.footprint(n).top for n in scene.movable(exclude=self.obj)], default=0.0)
        # grip `grasp_depth` below the top, no deeper than half the object, fingertips off the table
        self.grasp_z = max(fp.top - min(self.style.grasp_depth, fp.height / 2), fp.bottom + FINGERS_BELOW_GRIP + 0.003)
        self.grasp_offset = np.zeros(2)  # grasp point relative to the object's centre
        yaw = choose_grasp_yaw(scene.points(self.obj), fp.center, self.grasp_z, others)
        if yaw is None:  # too wide to close across (a bowl): grip its wall at the rim
            self.grasp_z = fp.top - RIM_GRIP_DEPTH
            yaw, self.grasp_offset = choose_rim_grasp(fp.center, scene.rim_radius(self.obj), self.grasp_z, others)
        self.yaw = yaw
        self.grasp_from_bottom = self.grasp_z - fp.bottom
        self.orientation = rot_z(self.yaw) @ DOWN
        self.hover_z = max(fp.top + 0.05, obstacle_top + 0.03)
        # the carried object's bottom hangs `grasp_from_bottom` below the gripper: clear the target and neighbours
        clear = max(self.place.rim_z, obstacle_top)
        home_z = float(env.sim.data.site_xpos[env.robots[0].eef_site_id][2])
        self.carry_z = min(clear + self.style.clearance + self.grasp_from_bottom, home_z + MAX_CARRY_ABOVE_HOME)
        # release low (short drops land upright) but keep the hand's underside above the receptacle's rim
        self.release_z = max(
            self.place.floor_z + self.grasp_from_bottom, self.place.rim_z + 0.015 - HAND_ABOVE_GRIP
        )
        self.phase, self.phase_steps = "approach", 0
        self._hold = np.zeros(3)
        self._carry_offset = np.zeros(2)  # gripper xy minus the carried object's centre, fixed once lifted

    def _object_xy(self) -> np.ndarray:
        return self.scene.footprint(self.obj).center + self.grasp_offset + self.style.grasp_offset

    def _release_xy(self) -> np.ndarray:
        """Gripper xy that puts the carried object's centre over the target (plus the episode's offset)."""
        return self.place.center + self.style.release_offset + self._carry_offset

    def _waypoint(self) -> tuple[np.ndarray, float, float]:
        """(target position, gripper command, reach tolerance) of the current phase."""
        p = self.phase
        if p == "approach":
            return np.r_[self._object_xy(), self.hover_z], L.GRIPPER_OPEN, 0.01
        if p == "descend":
            return np.r_[self._object_xy(), self.grasp_z], L.GRIPPER_OPEN, 0.006
        if p == "close":
            return self._hold, L.GRIPPER_CLOSE, -1.0
        if p == "lift":
            return np.r_[self._hold[:2], self.carry_z], L.GRIPPER_CLOSE, 0.02
        if p == "carry":
            return np.r_[self._release_xy(), self.carry_z], L.GRIPPER_CLOSE, 0.015
        if p == "lower":
            return np.r_[self._release_xy(), self.release_z], L.GRIPPER_CLOSE, 0.01
        if p == "open":
            return self._hold, L.GRIPPER_OPEN, -1.0
        return np.r_[self._hold[:2], self.carry_z], L.GRIPPER_OPEN, -1.0  # retreat: straight up, gripper open

    def act(self, raw_obs: dict) -> np.ndarray:
        """The next 7-dim action (float32) for the current raw observation."""
        eef = np.asarray(raw_obs["robot0_eef_pos"], dtype=np.float64)
        target, gripper, tol = self._waypoint()
        reached = tol > 0 and np.linalg.norm(target - eef) < tol
        timed_out = self.phase_steps >= self.BUDGET[self.phase]
        if reached or timed_out:
            if self.phase in ("descend", "lower"):
                self._hold = eef.copy()
            if self.phase == "lift":
                self._carry_offset = eef[:2] - self.scene.footprint(self.obj).center
            self.phase, self.phase_steps = self.NEXT[self.phase], 0
            target, gripper, tol = self._waypoint()
        self.phase_steps += 1
        move = self.GAIN * (target - eef) / POS_SCALE
        norm = np.linalg.norm(move)
        if norm > self.style.speed:
            move *= self.style.speed / norm
        if self.phase not in ("close", "open"):  # hold still while the fingers move
            move = move + self.rng.normal(0.0, self.style.noise, 3)
        rot = self.ROT_GAIN * L.rotation_error(self.orientation, quat_to_mat(raw_obs["robot0_eef_quat"])) / ROT_SCALE
        rot = np.clip(rot, -self.ROT_LIMIT, self.ROT_LIMIT)
        return np.clip(np.r_[move, rot, gripper], -1.0, 1.0).astype(np.float32)

    @property
    def released(self) -> bool:
        """The fingers have (nearly) opened: from here on the task's success predicate ends the episode."""
        return self.phase == "retreat" or (self.phase == "open" and self.phase_steps >= self.RELEASE_STEPS)


# ---- one worker's episodes -----------------------------------------------------------------------------------------


class LiberoExpertRunner:
    """Runs seeded expert episodes of one suite; keeps one env per task alive between episodes (soft resets)."""

    def __init__(self, suite: str, image_size: int, max_steps: int):
        self.suite, self.image_size, self.max_steps = suite, image_size, max_steps
        self.env, self.task, self.task_id, self.goal = None, None, None, None

    def _env_for(self, task_id: int):
        if task_id != self.task_id:
            self.close()
            # hard_reset=False: a reset re-samples the scene in place (~0.05 s) instead of rebuilding it (~3 s)
            self.env, self.task = L.make_libero_env(
                self.suite, task_id, image_size=self.image_size, render=False, hard_reset=False
            )
            self.task_id, self.goal = task_id, self.env.env.parsed_problem["goal_state"]
        return self.env

    def __call__(self, task_id: int, seed: int, record: bool = True) -> Episode:
        env = self._env_for(task_id)
        start = time.perf_counter()
        env.seed(seed)  # LIBERO samples object placements from numpy's global generator
        raw = env.reset()
        noop = np.r_[np.zeros(6), L.GRIPPER_OPEN]
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = env.step(noop)
        expert = PickPlaceExpert(env.env, self.goal, np.random.default_rng(seed))
        if not expert.scene.is_upright(expert.obj):
            return Episode(task_id, seed, False, 0, time.perf_counter() - start, self.task.language, rejected=True)
        cams = {"agentview": [], "wrist": []}
        states, actions = [], []
        success = False
        for _ in range(self.max_steps):
            action = expert.act(raw)
            if record:
                images = L.libero_images(L.render_cameras(env), image_size=self.image_size)
                cams["agentview"].append(images[L.LIBERO_SIM_CAMERAS["agentview"]])
                cams["wrist"].append(images[L.LIBERO_SIM_CAMERAS["wrist"]])
                states.append(L.libero_state(raw))
            actions.append(action)
            raw, _, _, _ = env.step(action)
            if expert.released and env.env._check_success():
                success = True
                break
        frames = None
        if success and record:
            frames = {f"observation.images.{c}": np.stack(v) for c, v in cams.items()}
            frames["observation.state"] = np.stack(states)
            frames["action"] = np.stack(actions)
        return Episode(task_id, seed, success, len(actions), time.perf_counter() - start, self.task.language, frames)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
            self.task_id = None


# ---- command line --------------------------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[int]:
    """'0' -> [0]; '0,2,5' -> [0, 2, 5]; '0-4' -> [0, 1, 2, 3, 4]."""
    try:
        return L.parse_task_indices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--tasks: {e}") from None


def default_out(suite: str, tasks: list[int]) -> Path:
    """datasets/local/<suite>_task0, ..._tasks0-4 (a contiguous range) or ..._tasks0_2_5."""
    if len(tasks) == 1:
        names = f"task{tasks[0]}"
    elif tasks == list(range(tasks[0], tasks[-1] + 1)):
        names = f"tasks{tasks[0]}-{tasks[-1]}"
    else:
        names = "tasks" + "_".join(map(str, tasks))
    return ROOT / "datasets" / "local" / f"{suite}_{names}"


def build_parser() -> argparse.ArgumentParser:
    p = recording_parser(__doc__, max_steps=300)
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default: libero_object)")
    p.add_argument("--tasks", type=parse_tasks, default=[0], help="task indices: 0 | 0,3 | 0-4 (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="dataset root (default: datasets/local/<suite>_<tasks>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_recording_args(build_parser(), argv)
    n = L.num_tasks(args.suite)  # raises for an unknown suite
    bad = [t for t in args.tasks if not 0 <= t < n]
    if bad:
        raise SystemExit(f"error: task indices {bad} are out of range for {args.suite} ({n} tasks)")
    for t in args.tasks:  # fail before any rollout if a task is not a pick-and-place the expert can script
        try:
            pick_place_goal(goal_of_task(args.suite, t))
        except ValueError as exc:
            raise SystemExit(f"error: task {t} ({L.get_task(args.suite, t).language}): {exc}") from None
    out = args.out or default_out(args.suite, args.tasks)
    request = {
        "generator": "libero_expert", "suite": args.suite, "tasks": args.tasks, "episodes": args.episodes,
        "image_size": args.image_size, "max_steps": args.max_steps, "seed": args.seed,
    }
    return record_from_args(
        args,
        out,
        runner_factory=LiberoExpertRunner,
        runner_kwargs={"suite": args.suite, "image_size": args.image_size, "max_steps": args.max_steps},
        task_ids=args.tasks,
        features=demo_features(("agentview", "wrist"), args.image_size, STATE_NAMES, ACTION_NAMES),
        fps=L.CONTROL_FREQ,
        robot_type=ROBOT_TYPE,
        request=request,
    )


if __name__ == "__main__":
    sys.exit(main())

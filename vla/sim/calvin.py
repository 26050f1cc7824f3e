"""CALVIN evaluation with the official long-horizon protocol: chains of 5 language instructions.

The protocol (CALVIN paper; calvin_models' `evaluate_policy.py` and `multistep_sequences.py`), written here from
its rules and stated in every results file:

- 1000 chains of 5 subtasks. Each chain starts from one of the symbolic initial conditions (lights, slider,
  drawer, where each block lies; nothing grasped) and is drawn at random from the 34 tasks, without repetition,
  until it is *valid*: every subtask's precondition holds in exactly one way in the symbolic state its
  predecessors leave, and no two subtasks share a task category (a chain never asks to open and then close the
  drawer, nor to lift two blocks). The chains are spread evenly over the initial conditions and shuffled, all
  with fixed seeds; seed 0 reproduces the official chain set.
- The initial condition becomes a simulator state: a fixed robot pose, door/light joint values, and block poses;
  table positions and block yaw are drawn from a seed derived from the condition (so each condition always looks
  the same).
- Per subtask: the policy is reset, given the subtask's instruction (the validation annotation) and up to 360
  steps; the subtask succeeds as soon as the task oracle, comparing the scene info at the start of the subtask with
  the current one, reports the task done. A chain stops at its first failed subtask.
- Reported: success rate of completing 1, 2, 3, 4, 5 subtasks in a row and the average number completed.

The simulator is reached through a small adapter interface (`CalvinSim`), so the protocol runs unchanged with the
real `calvin_env` (`CalvinEnvSim`, when it is installed) or with any stand-in that implements the interface (tests).

`evaluate_calvin(policy_source, cfg, out_dir)` is the library entry; `main(argv)` is `eval/calvin.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import itertools
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vla.config import ConfigError, EvalConfig
from vla.constants import EMBODIMENT, OBS_STATE, TASK, image_key
from vla.sim import results as R
from vla.sim.episode import close_quietly, failures_recorded, finished, lost_record
from vla.sim.policies import (
    RANDOM_POLICY,
    PolicySource,
    add_policy_set_argument,
    as_action,
    blame_policy,
    episode_seed,
    inference_context,
    load_policy,
    needs_observation,
    policy_with_settings,
    seed_everything,
)

logger = logging.getLogger(__name__)

NUM_CHAINS = 1000
CHAIN_LENGTH = 5
SUBTASK_MAX_STEPS = 360
CONTROL_FREQ = 30
"""calvin_env steps per second (the rate of its datasets)."""
ACTION_DIM = 7
"""Relative TCP position (3) and euler orientation (3) in [-1, 1] (scaled by the robot's max step), gripper (1):
> 0 opens, <= 0 closes (binarised to +1 / -1 as the official wrapper does)."""
CALVIN_EMBODIMENT = "calvin_panda"
"""Embodiment registry name of the CALVIN Franka Panda."""
CALVIN_CAMERAS = {"rgb_static": "base", "rgb_gripper": "wrist"}
"""calvin_env camera observation -> canonical (policy) camera name."""

Condition = dict[str, Any]
"""A symbolic scene state: led, lightbulb (0/1), slider (left/right), drawer (open/closed), red/blue/pink_block
(table, slider_left, slider_right, drawer, grasped, stacked_top, stacked_bottom), grasped (0/1)."""

# ---- the task rules --------------------------------------------------------------------------------------------

BLOCKS = ("red", "blue", "pink")
SLIDER_SIDES = ("slider_right", "slider_left")


@dataclass(frozen=True)
class Rule:
    """One way a task can happen: it needs `condition` (a value, or a tuple of allowed values, per key) and
    leaves the keys of `effect` set to their values."""

    condition: Mapping[str, Any]
    effect: Mapping[str, Any]


def _task_table() -> dict[str, tuple[int, tuple[Rule, ...]]]:
    """Task name -> (category, rules), in the canonical task order (the order matters: chains are drawn from it)."""
    table: dict[str, tuple[int, tuple[Rule, ...]]] = {}

    def add(name: str, category: int, *rules: Rule) -> None:
        table[name] = (category, rules)

    def on_table(b: str) -> Rule:  # rotating or pushing a block leaves it on the table
        return Rule({f"{b}_block": "table", "grasped": 0}, {f"{b}_block": "table"})

    for verb in ("rotate", "push"):
        for b in BLOCKS:
            for side in ("right", "left"):
                add(f"{verb}_{b}_block_{side}", 1, on_table(b))
    add("move_slider_left", 2, Rule({"slider": "right", "grasped": 0}, {"slider": "left"}))
    add("move_slider_right", 2, Rule({"slider": "left", "grasped": 0}, {"slider": "right"}))
    add("open_drawer", 3, Rule({"drawer": "closed", "grasped": 0}, {"drawer": "open"}))
    add("close_drawer", 3, Rule({"drawer": "open", "grasped": 0}, {"drawer": "closed"}))
    for b in BLOCKS:
        lifted = {f"{b}_block": "grasped", "grasped": 1}
        add(f"lift_{b}_block_table", 4, Rule({f"{b}_block": "table", "grasped": 0}, lifted))
        # a block in one compartment of the sliding cabinet is reachable while the door covers the other one
        add(f"lift_{b}_block_slider", 5,
            Rule({f"{b}_block": "slider_left", "slider": "right", "grasped": 0}, lifted),
            Rule({f"{b}_block": "slider_right", "slider": "left", "grasped": 0}, lifted))
        add(f"lift_{b}_block_drawer", 6, Rule({f"{b}_block": "drawer", "drawer": "open", "grasped": 0}, lifted))
    add("place_in_slider", 7, *(
        Rule({f"{b}_block": "grasped", "slider": door, "grasped": 1}, {f"{b}_block": f"slider_{door}", "grasped": 0})
        for b in BLOCKS for door in ("right", "left")
    ))
    add("place_in_drawer", 7, *(
        Rule({f"{b}_block": "grasped", "drawer": "open", "grasped": 1}, {f"{b}_block": "drawer", "grasped": 0})
        for b in BLOCKS
    ))
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    add("stack_block", 10, *(
        Rule({f"{t}_block": "grasped", f"{u}_block": "table", "grasped": 1},
             {f"{t}_block": "stacked_top", f"{u}_block": "stacked_bottom", "grasped": 0})
        for t, u in pairs
    ))
    add("unstack_block", 11, *(
        Rule({f"{t}_block": "stacked_top", f"{u}_block": "stacked_bottom", "grasped": 0},
             {f"{t}_block": "table", f"{u}_block": "table"})
        for t, u in pairs
    ))
    for light in ("lightbulb", "led"):
        add(f"turn_on_{light}", 8, Rule({light: 0, "grasped": 0}, {light: 1}))
        add(f"turn_off_{light}", 8, Rule({light: 1, "grasped": 0}, {light: 0}))
    add("push_into_drawer", 9, *(
        Rule({f"{b}_block": "table", **{f"{o}_block": SLIDER_SIDES for o in BLOCKS if o != b},
              "drawer": "open", "grasped": 0},
             {f"{b}_block": "drawer", "grasped": 0})
        for b in BLOCKS
    ))
    return table


TASKS = _task_table()
"""The 34 CALVIN tasks: name -> (category, rules). Two tasks of one category never share a chain."""
TASK_NAMES = tuple(TASKS)

INSTRUCTIONS: dict[str, str] = {
    "rotate_red_block_right": "take the red block and rotate it to the right",
    "rotate_red_block_left": "take the red block and rotate it to the left",
    "rotate_blue_block_right": "take the blue block and rotate it to the right",
    "rotate_blue_block_left": "take the blue block and rotate it to the left",
    "rotate_pink_block_right": "take the pink block and rotate it to the right",
    "rotate_pink_block_left": "take the pink block and rotate it to the left",
    "push_red_block_right": "go push the red block right",
    "push_red_block_left": "go push the red block left",
    "push_blue_block_right": "go push the blue block right",
    "push_blue_block_left": "go push the blue block left",
    "push_pink_block_right": "go push the pink block right",
    "push_pink_block_left": "go push the pink block left",
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    "lift_red_block_table": "grasp and lift the red block",
    "lift_blue_block_table": "grasp and lift the blue block",
    "lift_pink_block_table": "grasp and lift the pink block",
    "lift_red_block_slider": "lift the red block from the sliding cabinet",
    "lift_blue_block_slider": "lift the blue block from the sliding cabinet",
    "lift_pink_block_slider": "lift the pink block from the sliding cabinet",
    "lift_red_block_drawer": "Take the red block from the drawer",
    "lift_blue_block_drawer": "Take the blue block from the drawer",
    "lift_pink_block_drawer": "Take the pink block from the drawer",
    "place_in_slider": "store the grasped block in the sliding cabinet",
    "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer",
    "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block",
    "turn_on_lightbulb": "use the switch to turn on the light bulb",
    "turn_off_lightbulb": "use the switch to turn off the light bulb",
    "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}
"""The instruction given for each subtask: the first validation annotation of the task (official evaluation)."""

CONDITION_VALUES: dict[str, tuple[Any, ...]] = {
    "led": (0, 1),
    "lightbulb": (0, 1),
    "slider": ("right", "left"),
    "drawer": ("closed", "open"),
    "red_block": ("table", "slider_right", "slider_left"),
    "blue_block": ("table", "slider_right", "slider_left"),
    "pink_block": ("table", "slider_right", "slider_left"),
    "grasped": (0,),
}
"""The values an initial condition can take; the key order is part of the protocol (it seeds the block layout)."""


def initial_conditions() -> list[Condition]:
    """The symbolic start states of the evaluation: one or two blocks on the table, at most one per compartment."""
    out = []
    for values in itertools.product(*CONDITION_VALUES.values()):
        if values.count("table") in (1, 2) and values.count("slider_right") < 2 and values.count("slider_left") < 2:
            out.append(dict(zip(CONDITION_VALUES, values, strict=True)))
    return out


def _holds(state: Condition, condition: Mapping[str, Any]) -> bool:
    return all(state[k] in v if isinstance(v, tuple) else state[k] == v for k, v in condition.items())


def next_states(state: Condition, task: str) -> list[Condition]:
    """Every symbolic state `task` can lead to from `state` (one per rule whose condition holds)."""
    return [{**state, **rule.effect} for rule in TASKS[task][1] if _holds(state, rule.condition)]


def is_valid_chain(state: Condition, chain: Sequence[str]) -> bool:
    """Each subtask applies in exactly one way, in turn, and no two subtasks share a category."""
    for task in chain:
        successors = next_states(state, task)
        if len(successors) != 1:
            return False
        state = successors[0]
    categories = [TASKS[t][0] for t in chain]
    return len(set(categories)) == len(categories)


def generate_chains(num_chains: int = NUM_CHAINS, seed: int = 0,
                    length: int = CHAIN_LENGTH) -> list[tuple[Condition, tuple[str, ...]]]:
    """The evaluation chains: `num_chains` (initial condition, tasks) pairs, deterministic given `seed`.

    The chains are split as evenly as possible over `initial_conditions()` (the first conditions get one more
    when it does not divide). For the i-th condition a generator seeded with `seed * 1_000_003 + i` draws
    `length` distinct tasks at a time until enough valid chains are found (repeats are kept); all pairs are then
    shuffled by a generator seeded with `seed`. numpy's legacy generator makes seed 0 the official chain set.
    """
    if num_chains < 1 or length < 1:
        raise ValueError(f"generate_chains needs num_chains >= 1 and length >= 1, got {num_chains}, {length}")
    return [(dict(c), t) for c, t in _generate_chains(num_chains, seed, length)]


def evaluation_chains(count: int = NUM_CHAINS, seed: int = 0) -> list[tuple[Condition, tuple[str, ...]]]:
    """The first `count` chains of the 1000-chain set of `seed` (shuffled, so any prefix is representative and a
    shorter run is a subset of the full one). Seed 0, the official set, comes precomputed from
    `vla.sim.calvin_chains` (drawing it takes one to two CPU minutes); other seeds are generated and cached."""
    if not 1 <= count <= NUM_CHAINS:
        raise ValueError(f"count must be between 1 and {NUM_CHAINS}, got {count}")
    if seed == 0:
        from vla.sim.calvin_chains import OFFICIAL_CHAINS

        return [(dict(c), t) for c, t in decode_chain_table(OFFICIAL_CHAINS)[:count]]
    logger.info("drawing the 1000 CALVIN chains of seed %d (one to two minutes)", seed)
    return generate_chains(NUM_CHAINS, seed)[:count]


def encode_chain_table(pairs: Sequence[tuple[Condition, Sequence[str]]]) -> str:
    """One line per chain: the index of its condition in `initial_conditions()`, then its task indices."""
    conditions = initial_conditions()
    return "\n".join(
        " ".join(str(i) for i in (conditions.index(c), *(TASK_NAMES.index(t) for t in tasks))) for c, tasks in pairs
    )


@functools.lru_cache(maxsize=2)
def decode_chain_table(text: str) -> tuple[tuple[Condition, tuple[str, ...]], ...]:
    conditions = initial_conditions()
    out = []
    for line in text.strip().splitlines():
        c, *tasks = (int(x) for x in line.split())
        out.append((conditions[c], tuple(TASK_NAMES[t] for t in tasks)))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _generate_chains(num_chains: int, seed: int, length: int) -> tuple[tuple[Condition, tuple[str, ...]], ...]:
    conditions = initial_conditions()
    categories = [TASKS[t][0] for t in TASK_NAMES]
    base, extra = divmod(num_chains, len(conditions))
    pairs: list[tuple[Condition, tuple[str, ...]]] = []
    for i, condition in enumerate(conditions):
        wanted = base + (i < extra)
        rng = np.random.RandomState(seed * 1_000_003 + i)
        found = 0
        while found < wanted:
            # the draw of `rng.choice(TASK_NAMES, size=length, replace=False)`, without building string arrays
            picked = rng.permutation(len(TASK_NAMES))[:length].tolist()
            if len({categories[j] for j in picked}) < length:  # cheap rejection of most draws
                continue
            chain = tuple(TASK_NAMES[j] for j in picked)
            if is_valid_chain(condition, chain):
                pairs.append((condition, chain))
                found += 1
    np.random.RandomState(seed).shuffle(pairs)
    return tuple(pairs)


# ---- initial condition -> simulator state ----------------------------------------------------------------------

ROBOT_START = np.array([
    0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
    -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0,
])
"""robot_obs of every chain start: TCP position (3), euler orientation (3), gripper width (1), 7 joints, gripper
action (1: open)."""
BLOCK_ON_SLIDER = {"slider_left": (-0.240851662, 0.0924044687, 0.460990009),
                   "slider_right": (0.070341633, 0.0924044687, 0.460990009)}
BLOCK_ON_TABLE = ((0.0500000896, -0.120000177, 0.459990009), (0.229995412, -0.11999514, 0.45999001))
BLOCK_YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
SLIDER_LEFT_POSITION = 0.28
DRAWER_OPEN_POSITION = 0.22
SWITCH_ON_POSITION = 0.088
SCENE_OBS_DIM = 24
"""scene_obs: slider, drawer, button, switch joints, lightbulb, led, then position (3) + euler (3) of the red,
blue and pink blocks."""


def fnv1_32(data: bytes) -> int:
    """32-bit FNV-1 with a zero start value (multiply, then xor each byte): the hash seeding the block layout."""
    h = 0
    for byte in data:
        h = ((h * 0x01000193) & 0xFFFFFFFF) ^ byte
    return h


def condition_seed(condition: Condition) -> int:
    """Seed of a condition's block layout: FNV-1 over the UTF-16-LE text of its values, e.g.
    "dict_values([0, 1, 'right', 'closed', 'table', 'slider_left', 'table', 0])" (how the official evaluation's
    hash library reads a Python str)."""
    values = [condition[k] for k in CONDITION_VALUES]
    return fnv1_32(f"dict_values({values!r})".encode("utf-16-le"))


def initial_scene(condition: Condition) -> tuple[np.ndarray, np.ndarray]:
    """(robot_obs (15,), scene_obs (24,)) that realise a symbolic initial condition in calvin_env."""
    missing = [k for k in CONDITION_VALUES if k not in condition]
    if missing:
        raise KeyError(f"initial condition lacks {missing}")
    rng = np.random.RandomState(condition_seed(condition))
    table = [np.array(p) for p in BLOCK_ON_TABLE]
    rng.shuffle(table)
    scene = np.zeros(SCENE_OBS_DIM)
    scene[0] = SLIDER_LEFT_POSITION if condition["slider"] == "left" else 0.0
    scene[1] = DRAWER_OPEN_POSITION if condition["drawer"] == "open" else 0.0
    scene[3] = SWITCH_ON_POSITION if condition["lightbulb"] == 1 else 0.0
    scene[4] = condition["lightbulb"]
    scene[5] = condition["led"]
    # table spots (shuffled above): red takes the first, pink the second, blue the one red leaves
    spot = {"red": 0, "blue": 1 if condition["red_block"] == "table" else 0, "pink": 1}
    for i, block in enumerate(BLOCKS):
        place = condition[f"{block}_block"]
        scene[6 + 6 * i: 9 + 6 * i] = BLOCK_ON_SLIDER[place] if place in BLOCK_ON_SLIDER else table[spot[block]]
        scene[11 + 6 * i] = rng.uniform(*BLOCK_YAW_RANGE)
    return ROBOT_START.copy(), scene


# ---- the simulator interface -----------------------------------------------------------------------------------


class CalvinSim(Protocol):
    """What the protocol needs from a CALVIN simulator (`CalvinEnvSim` wraps calvin_env; tests use a stand-in)."""

    def reset(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> None:
        """Put the robot and the scene in the given state."""

    def observe(self, instruction: str, images: bool = True) -> dict[str, Any]:
        """The policy observation (vla keys); without images when `images` is False (no rendering)."""

    def step(self, action: np.ndarray) -> None:
        """Apply one (7,) relative action for one control step."""

    def info(self) -> Any:
        """A snapshot of the scene for the task oracle."""

    def solved(self, task: str, start_info: Any, current_info: Any) -> bool:
        """Whether `task` happened between the two snapshots (the task oracle)."""

    def frame(self) -> np.ndarray:
        """uint8 (H, W, 3) static-camera image for videos."""

    def close(self) -> None: ...


def calvin_observation(raw_obs: Mapping[str, Any], instruction: str) -> dict[str, Any]:
    """calvin_env observation -> policy observation.

    Returns {"observation.images.base": uint8 (200, 200, 3) static camera, "observation.images.wrist": uint8
    (84, 84, 3) gripper camera (present only when rendered), "observation.state": float32 (15,) robot_obs
    (TCP position, euler orientation, gripper width, 7 joints, last gripper action), "task", "embodiment"}.
    """
    obs: dict[str, Any] = {}
    for name, camera in CALVIN_CAMERAS.items():
        image = raw_obs.get("rgb_obs", {}).get(name)
        if image is not None:
            obs[image_key(camera)] = np.ascontiguousarray(image, dtype=np.uint8)
    obs[OBS_STATE] = np.asarray(raw_obs["robot_obs"], dtype=np.float32)
    obs[TASK] = instruction
    obs[EMBODIMENT] = CALVIN_EMBODIMENT
    return obs


CALVIN_INSTALL_HELP = """\
CALVIN evaluation needs `calvin_env`, which is not on PyPI. Install it from its source repository
(mees/calvin_env on GitHub), in this environment or a separate one:

    git clone --recursive <mees/calvin_env repository> calvin_env
    pip install pybullet hydra-core hydra-colorlog omegaconf gym numpy-quaternion gitpython scipy opencv-python-headless
    pip install --no-deps -e calvin_env

The scene, robot and camera configuration is composed by vla from the checkout's conf/ folder (no dataset
download needed); `--calvin-root` points at the checkout if calvin_env is not installed in editable mode.
"""


class CalvinNotInstalled(ImportError):
    """calvin_env (or one of its dependencies) cannot be imported; the message says how to install it."""


def require_calvin_env() -> None:
    """Raise CalvinNotInstalled with the install steps unless calvin_env and its dependencies import."""
    missing = [m for m in ("calvin_env", "pybullet", "hydra", "omegaconf") if importlib.util.find_spec(m) is None]
    if missing:
        raise CalvinNotInstalled(f"cannot import {', '.join(missing)}.\n\n{CALVIN_INSTALL_HELP}")


def calvin_env_root(root: str | Path | None = None) -> Path:
    """The calvin_env source checkout (holds conf/ and data/): `root`, else the folder above the package."""
    if root is None:
        require_calvin_env()
        import calvin_env

        root = Path(calvin_env.__file__).resolve().parents[1]
    root = Path(root)
    missing = [p for p in ("conf/scene", "conf/robot", "conf/cameras/cameras", "conf/tasks", "data") if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} is not a calvin_env checkout (missing {missing}).\n\n{CALVIN_INSTALL_HELP}")
    return root


def calvin_env_config(scene: str = "calvin_scene_D", root: str | Path | None = None, *,
                      use_egl: bool = False) -> dict[str, Any]:
    """The merged calvin_env config of an evaluation env, composed from the checkout's own conf/ files.

    This is what calvin_env otherwise reads from a dataset's `validation/.hydra/merged_config.yaml`: the play-table
    env, the static (200 px) and gripper (84 px) cameras, the given scene, the longer-finger Panda the CALVIN data
    was recorded with, and the task oracle's task definitions. Interpolations (`${scene.robot_base_position}`, ...)
    are kept; OmegaConf resolves them. `use_egl=False` renders with pybullet's CPU renderer (faster than EGL on
    machines without a GPU).
    """
    from omegaconf import OmegaConf

    root = calvin_env_root(root)
    conf = root / "conf"

    def load(rel: str) -> dict[str, Any]:
        path = conf / rel
        if not path.is_file():
            raise FileNotFoundError(f"calvin_env config {path} not found (scene names: "
                                    f"{sorted(p.stem for p in (conf / 'scene').glob('*.yaml'))})")
        data = OmegaConf.to_container(OmegaConf.load(path))
        data.pop("defaults", None)
        return data

    robot = {**load("robot/panda.yaml"), **load("robot/panda_longer_finger.yaml")}
    env = {**load("env/play_table_env.yaml"), "use_egl": use_egl, "use_vr": False, "show_gui": False,
           "use_scene_info": True}
    return {
        "seed": 0,
        "use_vr": False,
        "data_path": str(root / "data"),
        "cameras": {"static": load("cameras/cameras/static.yaml"), "gripper": load("cameras/cameras/gripper.yaml")},
        "env": env,
        "scene": load(f"scene/{scene}.yaml"),
        "robot": robot,
        "tasks": load("tasks/new_playtable_tasks.yaml"),
    }


def write_calvin_env_config(directory: str | Path, scene: str = "calvin_scene_D",
                            root: str | Path | None = None) -> Path:
    """Write `<directory>/.hydra/merged_config.yaml` (resolved), the file calvin_env's own `get_env(directory)`
    and the official evaluation scripts read."""
    from omegaconf import OmegaConf

    path = Path(directory) / ".hydra" / "merged_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(calvin_env_config(scene, root)), path, resolve=True)
    return path


class CalvinEnvSim:
    """`CalvinSim` over calvin_env's PlayTableSimEnv, built from `calvin_env_config` (no dataset needed).

    `step` does what PlayTableSimEnv.step does (apply the action, step pybullet `action_repeat` times, update the
    scene) without rendering the cameras, which the env would otherwise do on every step; `observe` renders them
    only when the policy reads them.
    """

    def __init__(self, scene: str = "calvin_scene_D", root: str | Path | None = None, *, use_egl: bool = False):
        require_calvin_env()
        import hydra
        from calvin_env.envs.tasks import Tasks
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(calvin_env_config(scene, root, use_egl=use_egl))
        self.env = hydra.utils.instantiate(cfg.env, show_gui=False, use_vr=False, use_scene_info=True)
        self.oracle = Tasks(cfg.tasks.tasks)
        self._static = next(c for c in self.env.cameras if c.name == "static")

    def reset(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> None:
        self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def observe(self, instruction: str, images: bool = True) -> dict[str, Any]:
        raw = self.env.get_obs() if images else self.env.get_state_obs()
        return calvin_observation(raw, instruction)

    def step(self, action: np.ndarray) -> None:
        action = np.array(action, dtype=np.float64)
        action[-1] = 1.0 if action[-1] > 0 else -1.0
        env = self.env
        env.robot.apply_action(action)
        for _ in range(env.action_repeat):
            env.p.stepSimulation(physicsClientId=env.cid)
        env.scene.step()

    def info(self) -> dict[str, Any]:
        return self.env.get_info()

    def solved(self, task: str, start_info: Any, current_info: Any) -> bool:
        return task in self.oracle.get_task_info_for_set(start_info, current_info, {task})

    def frame(self) -> np.ndarray:
        rgb, _ = self._static.render()
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def close(self) -> None:
        if self.env.cid >= 0:
            self.env.close()
            self.env.cid = -1  # the env's __del__ closes again; make that a no-op


@dataclass
class CalvinEnvFactory:
    """Picklable recipe of the real simulator, built inside each worker process."""

    scene: str = "calvin_scene_D"
    root: str | None = None
    use_egl: bool = False

    def __call__(self) -> CalvinEnvSim:
        return CalvinEnvSim(self.scene, self.root, use_egl=self.use_egl)


# ---- one chain -------------------------------------------------------------------------------------------------


@dataclass
class ChainRollout:
    completed: int = 0
    subtasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    time_sim: float = 0.0
    time_render: float = 0.0
    time_policy: float = 0.0
    time_oracle: float = 0.0
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)


def run_chain(
    sim: CalvinSim,
    policy: Any,
    condition: Condition,
    tasks: Sequence[str],
    *,
    max_steps: int = SUBTASK_MAX_STEPS,
    video_stride: int = 0,
    rollout: ChainRollout | None = None,
) -> ChainRollout:
    """Roll out one instruction chain with the official protocol; stops at the first failed subtask.

    Pass `rollout` to keep the partial result (subtasks done so far, frames) if a step raises.
    """
    out = rollout if rollout is not None else ChainRollout()
    clock = time.perf_counter
    sim.reset(*initial_scene(condition))
    for task in tasks:
        instruction = INSTRUCTIONS[task]
        with blame_policy():
            policy.reset()
        start_info = sim.info()
        subtask = {"task": task, "instruction": instruction, "success": False, "steps": 0}
        out.subtasks.append(subtask)
        for step in range(max_steps):
            t0 = clock()
            obs = sim.observe(instruction, images=needs_observation(policy))
            if video_stride and step % video_stride == 0:
                out.frames.append(sim.frame())
            t1 = clock()
            with inference_context(), blame_policy():
                action = as_action(policy.select_action(obs), ACTION_DIM)
            t2 = clock()
            sim.step(action)
            t3 = clock()
            done = sim.solved(task, start_info, sim.info())
            out.time_render += t1 - t0
            out.time_policy += t2 - t1
            out.time_sim += t3 - t2
            out.time_oracle += clock() - t3
            subtask["steps"] = step + 1
            if done:
                subtask["success"] = True
                break
        if not subtask["success"]:
            break
        out.completed += 1
    if video_stride:
        out.frames.append(sim.frame())
    return out


# ---- workers ---------------------------------------------------------------------------------------------------


@dataclass
class CalvinWorker:
    """Picklable recipe of an evaluation worker: its own simulator and policy, built once per process."""

    cfg: EvalConfig
    policy_source: Any
    out_dir: str
    sim_factory: Callable[[], CalvinSim]

    def __call__(self) -> CalvinChainRunner:
        return CalvinChainRunner(self.cfg, self.sim_factory, load_policy(self.policy_source), Path(self.out_dir))


class CalvinChainRunner:
    """Runs jobs {"chain", "condition", "tasks", "video"}; an exception fails the chain at the current subtask.

    After a simulator exception the simulator is rebuilt for the next chain; after a policy exception it is kept.
    """

    def __init__(self, cfg: EvalConfig, sim_factory: Callable[[], CalvinSim], policy: Any, out_dir: Path):
        self.cfg, self.sim_factory, self.policy, self.out_dir = cfg, sim_factory, policy, out_dir
        self.sim: CalvinSim | None = sim_factory()

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        record = chain_record(job, self.cfg)
        record["started_at"] = round(time.time(), 3)
        rollout = ChainRollout()
        with failures_recorded(record, f"chain {job['chain']}", on_simulator_error=self.close):
            if self.sim is None:
                self.sim = self.sim_factory()
            seed_everything(record["seed"])
            run_chain(self.sim, self.policy, job["condition"], job["tasks"], max_steps=self.cfg.calvin_max_steps,
                      video_stride=self.cfg.video_stride if job["video"] else 0, rollout=rollout)
        record.update(
            completed=rollout.completed, subtasks=rollout.subtasks,
            time_s={"sim": round(rollout.time_sim, 3), "render": round(rollout.time_render, 3),
                    "policy": round(rollout.time_policy, 3), "oracle": round(rollout.time_oracle, 3)},
            **finished(start),
        )
        if rollout.frames:
            name = f"chain{job['chain']:04d}_{rollout.completed}of{len(job['tasks'])}.mp4"
            record["video"] = R.save_rollout_video(self.out_dir, name, rollout.frames,
                                                   fps=CONTROL_FREQ / max(1, self.cfg.video_stride))
        return record

    def close(self) -> None:
        close_quietly(self.sim, "CALVIN simulator")
        self.sim = None


def chain_record(job: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    return {
        "key": job["key"], "chain": job["chain"], "initial_condition": job["condition"], "tasks": list(job["tasks"]),
        "seed": episode_seed(cfg.seed, job["chain"]), "completed": 0, "subtasks": [], "wall_time_s": 0.0,
        "time_s": {}, "error": None, "error_source": None, "video": None, "pid": os.getpid(),
    }


# ---- metrics ---------------------------------------------------------------------------------------------------


def success_at_lengths(completed: Sequence[int], length: int = CHAIN_LENGTH) -> list[float]:
    """Fraction of chains whose first k subtasks all succeeded, for k = 1..length."""
    n = len(completed)
    return [R.rate(sum(c >= k for c in completed), n) for k in range(1, length + 1)]


def task_success(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per task: how often it was attempted and how often it succeeded (subtasks after a failure are not
    attempted, so they count for neither)."""
    attempts, wins = Counter(), Counter()
    for r in records:
        for s in r["subtasks"]:
            attempts[s["task"]] += 1
            wins[s["task"]] += int(s["success"])
    return {t: {"success": wins[t], "total": attempts[t]} for t in sorted(attempts)}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    completed = [r["completed"] for r in records]
    walls = [r["wall_time_s"] for r in records if r.get("wall_time_s")]
    steps = sum(s["steps"] for r in records for s in r["subtasks"])
    times = {k: sum(r.get("time_s", {}).get(k, 0.0) for r in records) for k in ("sim", "render", "policy", "oracle")}
    return {
        "chains": len(records),
        "average_length": float(np.mean(completed)) if completed else 0.0,
        "success_at": {str(k + 1): v for k, v in enumerate(success_at_lengths(completed))},
        "errors": sum(r["error"] is not None for r in records),
        "task_success": task_success(records),
        "steps": steps,
        "steps_per_s": R.rate(steps, sum(times.values())),
        "mean_chain_wall_time_s": float(np.mean(walls)) if walls else 0.0,
        "time_share": {k: R.rate(v, sum(times.values())) for k, v in times.items()},
    }


# ---- a whole evaluation ----------------------------------------------------------------------------------------


def protocol_settings(cfg: EvalConfig) -> dict[str, Any]:
    deviations = []
    if cfg.calvin_num_chains != NUM_CHAINS:
        deviations.append(f"{cfg.calvin_num_chains} of {NUM_CHAINS} chains")
    if cfg.calvin_chain_seed != 0:
        deviations.append(f"chain seed {cfg.calvin_chain_seed} instead of 0")
    if cfg.calvin_max_steps != SUBTASK_MAX_STEPS:
        deviations.append(f"{cfg.calvin_max_steps} instead of {SUBTASK_MAX_STEPS} steps per subtask")
    return {
        "benchmark": "CALVIN", "scene": cfg.calvin_scene, "num_chains": cfg.calvin_num_chains,
        "chains": f"the first {cfg.calvin_num_chains} of the {NUM_CHAINS} chains of seed {cfg.calvin_chain_seed}",
        "chain_length": CHAIN_LENGTH, "chain_seed": cfg.calvin_chain_seed, "max_steps_per_subtask": cfg.calvin_max_steps,
        "policy_reset": "every subtask", "success": "task oracle on start vs current scene info",
        "stop": "at the first failed subtask", "seed": cfg.seed, "official": not deviations, "deviations": deviations,
    }


def evaluate_calvin(
    policy: PolicySource,
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    sim: Callable[[], CalvinSim] | None = None,
    calvin_root: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a policy on CALVIN chains and write every output into `out_dir`.

    Args:
        policy: a checkpoint directory, a policy object, a picklable zero-argument factory, or "random".
        cfg: evaluation settings (`calvin_*` fields; official protocol by default).
        out_dir: run directory (results.json, results.md, chain_success.png, videos/, episodes.jsonl).
        sim: picklable zero-argument factory of a `CalvinSim`; default: the real calvin_env (`CalvinEnvFactory`).
            Without calvin_env installed this raises CalvinNotInstalled before anything is written.
        calvin_root: calvin_env checkout (default: found from the installed package).
        resume, overwrite, progress: as for `vla.sim.libero.evaluate_libero`.
    """
    cfg = dataclasses.replace(cfg).validate()
    if sim is None:
        calvin_env_root(calvin_root)  # install check before anything is written
        sim = CalvinEnvFactory(cfg.calvin_scene, calvin_root)
    chains = evaluation_chains(cfg.calvin_num_chains, cfg.calvin_chain_seed)
    out = Path(out_dir)
    run_info = {
        "protocol": protocol_settings(cfg),
        "policy": R.policy_identity(policy),
        "settings": dataclasses.asdict(cfg),
        "versions": R.package_versions(),
        "command": " ".join(sys.argv),
    }
    log = R.start_run(out, run_info, resume=resume, overwrite=overwrite)
    records = log.read()
    done = {r["key"] for r in records}
    jobs = [
        {"key": str(i), "chain": i, "condition": condition, "tasks": tasks, "video": i < cfg.videos_per_task}
        for i, (condition, tasks) in enumerate(chains) if str(i) not in done
    ]
    logger.info("CALVIN %s: %d chains, %d to run (%d already done), %d worker(s) -> %s", cfg.calvin_scene,
                len(chains), len(jobs), len(chains) - len(jobs), cfg.num_workers, out)
    bar = R.progress_bar(len(chains), records, desc="calvin", disable=not progress, unit="chain",
                         postfix=chain_postfix)
    return R.run_logged(log, jobs, CalvinWorker(cfg, policy, str(out), sim), num_workers=cfg.num_workers,
                        on_lost=lost_record(chain_record, cfg), bar=bar, postfix=chain_postfix,
                        finish=lambda records, wall_time_s: write_calvin_results(out, run_info, records,
                                                                                 wall_time_s=wall_time_s))


def chain_postfix(records: Sequence[dict[str, Any]]) -> str:
    """Progress-bar text of finished chains: success at each chain length and the average length."""
    rates = success_at_lengths([r["completed"] for r in records])
    return (" ".join(f"{k + 1}/5:{v:.0%}" for k, v in enumerate(rates))
            + f" avg len {np.mean([r['completed'] for r in records]):.2f}")


def write_calvin_results(out: Path, run_info: dict[str, Any], records: list[dict[str, Any]],
                         *, wall_time_s: float) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["chain"])
    summary = summarize(records)
    expected = run_info["protocol"]["num_chains"]
    results = {**run_info, "complete": len(records) >= expected, "expected_chains": expected,
               "last_session_wall_time_s": round(wall_time_s, 1), "summary": summary, "chains": records}
    R.write_json(out / R.RESULTS_JSON, results)
    (out / R.RESULTS_MD).write_text(calvin_markdown(results))
    if records:
        R.bar_chart(out / "chain_success.png", [f"{k}/5" for k in summary["success_at"]],
                    list(summary["success_at"].values()),
                    title=f"CALVIN: average length {summary['average_length']:.2f} ({len(records)} chains)",
                    ylabel="chains completing k in a row")
    return results


def calvin_markdown(results: dict[str, Any]) -> str:
    p, s = results["protocol"], results["summary"]
    lines = [
        f"# CALVIN {p['scene']}",
        "",
        R.headline(f"Average length: {s['average_length']:.2f}", results, f"{s['chains']} chains",
                   f"{s['chains']}/{results['expected_chains']} chains", after=f" / {p['chain_length']}"),
        "",
        *R.provenance_lines(results),
        f"- {p['max_steps_per_subtask']} steps per subtask, chain seed {p['chain_seed']}, "
        f"{s['steps_per_s']:.1f} steps/s, time share " + ", ".join(f"{k} {v:.0%}" for k, v in s["time_share"].items()),
        "",
        R.markdown_table([f"{k}/5" for k in s["success_at"]], [[f"{v:.1%}" for v in s["success_at"].values()]]),
        R.markdown_table(["task", "success", "attempts", "rate"],
                         [[t, v["success"], v["total"], f"{R.rate(v['success'], v['total']):.1%}"]
                          for t, v in s["task_success"].items()]),
    ]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="eval/calvin.py",
        description="Evaluate a policy on CALVIN with the official long-horizon protocol (1000 chains of 5 "
                    "instructions, 360 steps per subtask, stop at the first failure). Needs calvin_env.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--policy", default=None, help=f"checkpoint directory (VLAPolicy.from_pretrained) or '{RANDOM_POLICY}'")
    parser.add_argument("--remote", default=None, metavar="ws://HOST:PORT",
                        help="evaluate the policy served there by any openpi-protocol server instead of --policy "
                             "(an API key is read from $VLA_SERVE_API_KEY)")
    parser.add_argument("--chains", type=int, default=d.calvin_num_chains,
                        help="evaluate the first N of the 1000 instruction chains")
    parser.add_argument("--chain-seed", type=int, default=d.calvin_chain_seed, help="chain generator seed (0 = official)")
    parser.add_argument("--max-steps", type=int, default=d.calvin_max_steps, help="steps per subtask")
    parser.add_argument("--scene", default=d.calvin_scene, help="calvin_env scene config (conf/scene/<name>.yaml)")
    parser.add_argument("--calvin-root", default=None, help="calvin_env source checkout (default: the installed one)")
    parser.add_argument("--seed", type=int, default=d.seed, help="policy/episode seed")
    parser.add_argument("--workers", type=int, default=d.num_workers, help="parallel simulator processes")
    parser.add_argument("--videos", type=int, default=d.videos_per_task, help="videos of the first k chains")
    parser.add_argument("--video-stride", type=int, default=d.video_stride, help="control steps per video frame")
    add_policy_set_argument(parser)
    R.add_run_arguments(parser, "run directory (default: <checkpoint>/eval/calvin)")
    parser.add_argument("--write-env-config", metavar="DIR", default=None,
                        help="only write DIR/.hydra/merged_config.yaml (for calvin_env's own tools) and exit")
    return parser


def remote_source(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """`--remote ws://...`: a served policy, checked to answer before anything is written."""
    from vla.sim.policies import check_remote_arguments, connect_remote

    check_remote_arguments(args, parser)
    return connect_remote(args.remote, parser)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`eval/calvin.py`: check calvin_env, evaluate the chains, print the summary. Exits 1 without calvin_env."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.write_env_config:
            path = write_calvin_env_config(args.write_env_config, args.scene, args.calvin_root)
            print(f"wrote {path}")
            return {}
        if args.remote:
            source = remote_source(args, parser)
        else:
            if not args.policy:
                parser.error("--policy is required (a checkpoint directory or 'random'), or --remote ws://HOST:PORT")
            if args.policy != RANDOM_POLICY and not Path(args.policy).exists():
                parser.error(f"--policy {args.policy}: no such checkpoint directory")
            if args.out is None and args.policy == RANDOM_POLICY:
                parser.error("--out is required with --policy random (there is no checkpoint directory to write into)")
            source = policy_with_settings(args.policy, args.policy_set, parser.error)
        calvin_env_root(args.calvin_root)
    except (CalvinNotInstalled, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        cfg = dataclasses.replace(
            EvalConfig(), suite="calvin", calvin_num_chains=args.chains, calvin_chain_seed=args.chain_seed,
            calvin_max_steps=args.max_steps, calvin_scene=args.scene, seed=args.seed, num_workers=args.workers,
            videos_per_task=args.videos, video_stride=args.video_stride,
        ).validate()
    except ConfigError as e:
        parser.error(str(e))
    out = Path(args.out) if args.out else Path(args.policy) / "eval" / "calvin"
    try:
        results = evaluate_calvin(source, cfg, out, calvin_root=args.calvin_root, resume=args.resume,
                                  overwrite=args.overwrite, progress=not args.no_progress)
    except (FileExistsError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: the finished chains are in {out}; add --resume to complete the run\n")
    print((out / R.RESULTS_MD).read_text())
    print(f"results: {out}")
    return results

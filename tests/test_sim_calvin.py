"""CALVIN protocol: chain generation, initial scenes, stop-at-first-failure accounting, metrics, outputs, resume.

Runs without calvin_env: `TableWorld` below implements the adapter interface (`vla.sim.calvin.CalvinSim`) with
its own symbolic table-top semantics, written independently of the protocol's rule table, so "every generated
chain is feasible" is checked against a second formalisation. The adapter to the real calvin_env is tested at the
end, only where calvin_env is importable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vla.config import EvalConfig
from vla.sim import calvin as C

REPO = Path(__file__).resolve().parents[1]
HAS_CALVIN_ENV = importlib.util.find_spec("calvin_env") is not None

OFFICIAL_CHAINS_SHA256 = "13bc4fad80a302e6405e5f4f800cc028789a245409cd12df39b783099ad4860f"
"""sha256 of json.dumps([[condition, list(tasks)], ...], sort_keys=True) over the 1000 chains returned by the
official generator, calvin_models/calvin_agent/evaluation/multistep_sequences.py `get_sequences(1000)`
(mees/calvin at commit fa03f01), run unmodified except for its import of `temp_seed`."""


# ---- a stand-in simulator --------------------------------------------------------------------------------------

TASK_OF = {text: task for task, text in C.INSTRUCTIONS.items()}
STEPS_PER_TASK = 3
"""TableWorld performs a task after this many consecutive steps asking for it."""


def encode_task(task: str) -> np.ndarray:
    """The scripted policies' action: the task index in action[0], scaled to [-1, 1]."""
    action = np.zeros(C.ACTION_DIM)
    action[0] = C.TASK_NAMES.index(task) / (len(C.TASK_NAMES) - 1) * 2 - 1
    action[-1] = 1.0
    return action


def decode_task(action: np.ndarray) -> str:
    return C.TASK_NAMES[round((action[0] + 1) / 2 * (len(C.TASK_NAMES) - 1))]


def scene_to_condition(scene_obs: np.ndarray) -> dict:
    """Read the symbolic state back from a scene_obs vector (joint thresholds, block positions)."""
    state = {"led": int(scene_obs[5]), "lightbulb": int(scene_obs[4]),
             "slider": "left" if scene_obs[0] > 0.14 else "right",
             "drawer": "open" if scene_obs[1] > 0.11 else "closed", "grasped": 0}
    for i, block in enumerate(C.BLOCKS):
        x, y = scene_obs[6 + 6 * i], scene_obs[7 + 6 * i]
        state[f"{block}_block"] = "table" if y < 0 else ("slider_left" if x < -0.1 else "slider_right")
    return state


class TableWorld:
    """Symbolic CALVIN table implementing the CalvinSim interface; counts renders and steps."""

    def __init__(self):
        self.renders = self.steps = 0

    def reset(self, robot_obs, scene_obs):
        assert robot_obs.shape == (15,) and scene_obs.shape == (C.SCENE_OBS_DIM,)
        self.state = scene_to_condition(scene_obs)
        self.history: list[str] = []
        self.asking, self.count = None, 0

    def observe(self, instruction, images=True):
        obs = {"observation.state": np.zeros(15, np.float32), "task": instruction, "embodiment": "calvin_panda"}
        if images:
            self.renders += 1
            obs["observation.images.base"] = np.zeros((8, 8, 3), np.uint8)
        return obs

    def step(self, action):
        self.steps += 1
        task = decode_task(action)
        self.count = self.count + 1 if task == self.asking else 1
        self.asking = task
        if self.count == STEPS_PER_TASK and self._perform(task):
            self.history.append(task)

    def info(self):
        return len(self.history)

    def solved(self, task, start_info, current_info):
        return task in self.history[start_info:current_info]

    def frame(self):
        return np.full((16, 16, 3), 10 * len(self.history), np.uint8)

    def close(self):
        pass

    def _perform(self, task: str) -> bool:
        """The task's effect if the scene allows it; False (nothing happens) otherwise."""
        s = self.state
        held = [b for b in C.BLOCKS if s[f"{b}_block"] == "grasped"]
        words = task.split("_")
        color = next((w for w in words if w in C.BLOCKS), None)
        where = s.get(f"{color}_block")
        if words[0] in ("rotate", "push") and words[-1] in ("left", "right"):
            return where == "table" and not held
        if task.startswith("move_slider"):
            target = words[-1]
            if s["slider"] == target or held:
                return False
            s["slider"] = target
            return True
        if task in ("open_drawer", "close_drawer"):
            target = "open" if task == "open_drawer" else "closed"
            if s["drawer"] == target or held:
                return False
            s["drawer"] = target
            return True
        if words[0] == "lift":
            source = words[-1]
            reachable = {
                "table": where == "table",
                "slider": (where == "slider_left" and s["slider"] == "right")
                or (where == "slider_right" and s["slider"] == "left"),
                "drawer": where == "drawer" and s["drawer"] == "open",
            }[source]
            if held or not reachable:
                return False
            s[f"{color}_block"], s["grasped"] = "grasped", 1
            return True
        if task == "place_in_slider" and len(held) == 1:
            s[f"{held[0]}_block"], s["grasped"] = f"slider_{s['slider']}", 0
            return True
        if task == "place_in_drawer" and len(held) == 1 and s["drawer"] == "open":
            s[f"{held[0]}_block"], s["grasped"] = "drawer", 0
            return True
        if task == "stack_block" and len(held) == 1:
            bases = [b for b in C.BLOCKS if s[f"{b}_block"] == "table"]
            if len(bases) != 1:
                return False
            s[f"{held[0]}_block"], s[f"{bases[0]}_block"], s["grasped"] = "stacked_top", "stacked_bottom", 0
            return True
        if task == "unstack_block" and not held:
            tops = [b for b in C.BLOCKS if s[f"{b}_block"] == "stacked_top"]
            if not tops:
                return False
            for b in C.BLOCKS:
                if s[f"{b}_block"] in ("stacked_top", "stacked_bottom"):
                    s[f"{b}_block"] = "table"
            return True
        if words[0] == "turn":
            light, on = words[-1], int(words[1] == "on")
            if s[light] == on or held:
                return False
            s[light] = on
            return True
        if task == "push_into_drawer":
            on_table = [b for b in C.BLOCKS if s[f"{b}_block"] == "table"]
            in_slider = [b for b in C.BLOCKS if s[f"{b}_block"].startswith("slider")]
            if held or s["drawer"] != "open" or len(on_table) != 1 or len(in_slider) != 2:
                return False
            s[f"{on_table[0]}_block"] = "drawer"
            return True
        return False


class ScriptedPolicy:
    """Does exactly what it is told, except tasks in `cannot` (it idles) and, optionally, raising on the n-th
    subtask. Counts resets; asks for an observation only every `chunk` steps."""

    def __init__(self, cannot=(), raise_on_subtask: int | None = None, chunk: int = 1, exc=RuntimeError):
        self.cannot, self.raise_on, self.chunk, self.exc = set(cannot), raise_on_subtask, chunk, exc
        self.resets, self.left = 0, 0

    def reset(self):
        self.resets += 1
        self.left = 0

    def needs_observation(self):
        return self.left == 0

    def select_action(self, obs):
        if self.raise_on is not None and self.resets == self.raise_on:
            raise self.exc("policy exploded")
        if self.left == 0:
            assert "observation.images.base" in obs
        self.left = (self.left - 1) % self.chunk
        task = TASK_OF[obs["task"]]
        return np.zeros(C.ACTION_DIM) if task in self.cannot else encode_task(task)


def _table_world():
    return TableWorld()


# ---- protocol constants and chain generation -------------------------------------------------------------------


def test_protocol_constants():
    assert (C.NUM_CHAINS, C.CHAIN_LENGTH, C.SUBTASK_MAX_STEPS) == (1000, 5, 360)
    assert len(C.TASKS) == 34 and set(C.INSTRUCTIONS) == set(C.TASKS)
    assert len({cat for cat, _ in C.TASKS.values()}) == 11
    conditions = C.initial_conditions()
    assert len(conditions) == 192
    assert all(c["grasped"] == 0 for c in conditions)
    blocks = [[c[f"{b}_block"] for b in C.BLOCKS] for c in conditions]
    assert all(1 <= b.count("table") <= 2 and b.count("slider_left") <= 1 and b.count("slider_right") <= 1
               for b in blocks)


def test_shipped_chains_are_the_official_set():
    chains = C.evaluation_chains(1000, 0)
    text = json.dumps([[c, list(t)] for c, t in chains], sort_keys=True).encode()
    assert hashlib.sha256(text).hexdigest() == OFFICIAL_CHAINS_SHA256
    assert C.evaluation_chains(7, 0) == chains[:7]


def test_every_chain_is_valid_and_feasible_in_an_independent_world():
    chains = C.evaluation_chains(1000, 0)
    assert len({c["led"] for c, _ in chains}) == 2
    for condition, tasks in chains:
        assert len(tasks) == 5 and len(set(tasks)) == 5
        assert len({C.TASKS[t][0] for t in tasks}) == 5, tasks  # never two tasks of one category
        assert C.is_valid_chain(condition, tasks)
    world, policy = TableWorld(), ScriptedPolicy()
    for condition, tasks in chains[:300]:
        assert C.run_chain(world, policy, condition, tasks, max_steps=5).completed == 5, (condition, tasks)


def test_validity_rules_reject_what_they_must():
    start = {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
             "blue_block": "slider_left", "pink_block": "table", "grasped": 0}
    assert not C.is_valid_chain(start, ["close_drawer", "turn_on_led", "turn_on_lightbulb", "move_slider_left",
                                        "lift_red_block_table"])  # the drawer is already closed
    assert not C.is_valid_chain(start, ["open_drawer", "close_drawer", "turn_on_led", "move_slider_left",
                                        "lift_red_block_table"])  # two drawer tasks
    assert not C.is_valid_chain(start, ["lift_red_block_table", "open_drawer", "turn_on_led", "move_slider_left",
                                        "stack_block"])  # the robot holds a block while opening the drawer
    assert C.is_valid_chain(start, ["lift_red_block_table", "stack_block", "turn_on_led", "open_drawer",
                                    "move_slider_left"])
    ambiguous = {**start, "blue_block": "table", "pink_block": "slider_left"}
    assert C.is_valid_chain(ambiguous, ["lift_red_block_table", "stack_block", "turn_on_led", "open_drawer",
                                        "move_slider_left"])
    both_free = {**start, "slider": "left", "blue_block": "table", "pink_block": "table", "red_block": "slider_right"}
    assert C.is_valid_chain(both_free, ["turn_on_led", "open_drawer", "lift_red_block_slider", "place_in_drawer",
                                        "move_slider_right"])
    assert not C.is_valid_chain(both_free, ["lift_red_block_slider", "stack_block", "turn_on_led", "open_drawer",
                                            "move_slider_right"])  # onto blue or onto pink: not one way


def test_generator_is_deterministic_and_seeded():
    a = C.generate_chains(4, seed=3)
    C._generate_chains.cache_clear()
    assert C.generate_chains(4, seed=3) == a and len(a) == 4
    # 4 chains over 192 conditions: the first 4 conditions get one each, then everything is shuffled
    expected = {json.dumps(c, sort_keys=True) for c in C.initial_conditions()[:4]}
    assert {json.dumps(c, sort_keys=True) for c, _ in a} == expected
    assert all(C.is_valid_chain(c, t) for c, t in a)
    assert a != C.generate_chains(4, seed=4)


@pytest.mark.slow
def test_generator_reproduces_the_shipped_table():
    """Drawing the official set takes one to two CPU minutes; the table in vla.sim.calvin_chains must equal it."""
    assert C.generate_chains(1000, 0) == C.evaluation_chains(1000, 0)


# ---- initial scenes --------------------------------------------------------------------------------------------


def test_fnv_hash_matches_published_vectors():
    assert C.fnv1_32(b"hello world") == 2805756500
    assert C.fnv1_32(b"hello ") == 406904344
    condition = C.initial_conditions()[0]
    assert C.condition_seed(condition) == C.fnv1_32(str(condition.values()).encode("utf-16-le"))


def test_initial_scene_realises_the_condition():
    layouts = set()
    for condition in C.initial_conditions():
        robot, scene = C.initial_scene(condition)
        assert np.allclose(robot, C.ROBOT_START)
        assert scene_to_condition(scene) == condition
        positions = [tuple(scene[6 + 6 * i: 9 + 6 * i]) for i in range(3)]
        assert len(set(positions)) == 3  # no two blocks on the same spot
        assert all(C.BLOCK_YAW_RANGE[0] <= scene[11 + 6 * i] <= C.BLOCK_YAW_RANGE[1] for i in range(3))
        assert np.array_equal(C.initial_scene(condition)[1], scene)  # same condition, same scene
        layouts.add(tuple(np.round(scene[11::6], 6)))
    assert len(layouts) == 192  # yaw drawn per condition


# ---- rollouts, accounting, metrics -----------------------------------------------------------------------------


def test_chain_stops_at_first_failure_and_resets_per_subtask():
    condition, tasks = next((c, t) for c, t in C.evaluation_chains(1000, 0) if "open_drawer" in t[1:4])
    k = tasks.index("open_drawer")
    world, policy = TableWorld(), ScriptedPolicy(cannot={"open_drawer"})
    out = C.run_chain(world, policy, condition, tasks, max_steps=C.SUBTASK_MAX_STEPS)
    assert out.completed == k
    assert [s["success"] for s in out.subtasks] == [True] * k + [False]  # nothing after the failure is tried
    assert out.subtasks[k]["steps"] == 360 and all(s["steps"] == STEPS_PER_TASK for s in out.subtasks[:k])
    assert policy.resets == k + 1
    assert world.steps == k * STEPS_PER_TASK + 360


def test_rendering_only_when_the_policy_looks():
    condition, tasks = C.evaluation_chains(1, 0)[0]
    world, policy = TableWorld(), ScriptedPolicy(cannot={tasks[0]}, chunk=4)
    C.run_chain(world, policy, condition, tasks, max_steps=40)
    assert world.steps == 40 and world.renders == 10


def test_metrics():
    assert C.success_at_lengths([0, 1, 2, 5, 5]) == [0.8, 0.6, 0.4, 0.4, 0.4]
    records = [{"completed": 2, "error": None, "time_s": {},
                "subtasks": [{"task": "a", "success": True, "steps": 9}, {"task": "b", "success": True, "steps": 5},
                             {"task": "c", "success": False, "steps": 360}]},
               {"completed": 0, "error": "x", "time_s": {}, "subtasks": [{"task": "b", "success": False, "steps": 1}]}]
    s = C.summarize(records)
    assert s["average_length"] == 1.0 and s["errors"] == 1 and s["steps"] == 375
    assert s["task_success"] == {"a": {"success": 1, "total": 1}, "b": {"success": 1, "total": 2},
                                 "c": {"success": 0, "total": 1}}


def _cfg(**kw):
    settings = {"calvin_num_chains": 6, "calvin_max_steps": 12, "videos_per_task": 1, "video_stride": 2, **kw}
    return EvalConfig(suite="calvin", **settings)


def test_evaluation_outputs_errors_and_expected_metrics(tmp_path):
    cannot = {"open_drawer", "turn_on_led"}
    chains = C.evaluation_chains(6, 0)
    expected = [min((t.index(x) for x in cannot if x in t), default=5) for _, t in chains]
    policy = ScriptedPolicy(cannot=cannot, raise_on_subtask=1)  # the very first subtask raises
    results = C.evaluate_calvin(policy, _cfg(), tmp_path, sim=_table_world, progress=False)
    records = results["chains"]
    assert [r["chain"] for r in records] == list(range(6))
    assert records[0]["error"] == "RuntimeError: policy exploded" and records[0]["completed"] == 0
    assert records[0]["error_source"] == "policy" and all(r["error"] is None for r in records[1:])
    assert [r["completed"] for r in records[1:]] == expected[1:]
    completed = [0, *expected[1:]]
    assert results["summary"]["average_length"] == pytest.approx(np.mean(completed))
    assert list(results["summary"]["success_at"].values()) == pytest.approx(C.success_at_lengths(completed))
    assert results["protocol"]["official"] is False and "6 of 1000 chains" in results["protocol"]["deviations"][0]
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[2].startswith(f"**Average length: {np.mean(completed):.2f}**")
    assert (tmp_path / "chain_success.png").stat().st_size > 0
    assert [p.name for p in (tmp_path / "videos").glob("*.mp4")] == ["chain0000_0of5.mp4"]
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 6


BUILT_WORLDS: list[TableWorld] = []


class BrittleWorld(TableWorld):
    """The first one built raises in its 21st `step` (a simulator crash)."""

    def __init__(self):
        super().__init__()
        BUILT_WORLDS.append(self)
        self.brittle = len(BUILT_WORLDS) == 1

    def step(self, action):
        if self.brittle and self.steps == 20:
            raise ValueError("physics exploded")
        super().step(action)


def test_simulator_exception_fails_the_chain_and_rebuilds_the_simulator(tmp_path):
    BUILT_WORLDS.clear()
    results = C.evaluate_calvin(ScriptedPolicy(), _cfg(videos_per_task=0), tmp_path, sim=BrittleWorld,
                                progress=False)
    broken = [r for r in results["chains"] if r["error"]]
    assert len(broken) == 1 and broken[0]["error"] == "ValueError: physics exploded"
    assert broken[0]["error_source"] == "simulator" and broken[0]["completed"] < 5
    assert len(BUILT_WORLDS) == 2  # a fresh simulator for the chains after the crash
    assert all(r["completed"] == 5 for r in results["chains"] if not r["error"])


def test_resume_runs_only_missing_chains(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the 7th subtask (the second chain)
        C.evaluate_calvin(ScriptedPolicy(raise_on_subtask=7, exc=KeyboardInterrupt), _cfg(videos_per_task=0),
                          tmp_path, sim=_table_world, progress=False)
    finished = [json.loads(line)["chain"] for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert 0 < len(finished) < 6
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False
    with pytest.raises(FileExistsError):
        C.evaluate_calvin(ScriptedPolicy(), _cfg(videos_per_task=0), tmp_path, sim=_table_world, progress=False)
    policy = ScriptedPolicy()
    results = C.evaluate_calvin(policy, _cfg(videos_per_task=0), tmp_path, sim=_table_world, progress=False,
                                resume=True)
    assert results["complete"] and len(results["chains"]) == 6
    new_chains = 6 - len(finished)
    assert policy.resets == sum(min(r["completed"] + 1, 5) for r in results["chains"] if r["chain"] not in finished)
    assert new_chains > 0


def test_two_worker_processes_give_the_same_results(tmp_path):
    single = C.evaluate_calvin(ScriptedPolicy(cannot={"place_in_slider"}), _cfg(videos_per_task=0),
                               tmp_path / "one", sim=_table_world, progress=False)
    double = C.evaluate_calvin(ScriptedPolicy(cannot={"place_in_slider"}), _cfg(videos_per_task=0, num_workers=2),
                               tmp_path / "two", sim=_table_world, progress=False)
    assert [r["completed"] for r in single["chains"]] == [r["completed"] for r in double["chains"]]
    assert os.getpid() not in {r["pid"] for r in double["chains"]}  # ran in worker processes


# ---- the real simulator ----------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CALVIN_ENV, reason="calvin_env is installed here")
def test_missing_calvin_env_is_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "calvin.py"), "--policy", "random", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 1
    assert "calvin_env" in proc.stderr and "pip install" in proc.stderr
    assert not out.exists()


def test_policy_settings_reach_the_evaluation_and_bad_ones_stop_it(tmp_path, monkeypatch):
    """`--policy-set` is checked against the checkpoint's config before calvin_env is even looked for, and the
    evaluation receives the checkpoint with its settings (which the results record)."""
    from vla.config import get_preset
    from vla.sim.policies import CheckpointPolicy

    (tmp_path / "pretrained_model").mkdir()
    get_preset("tiny-cpu").to_json(tmp_path / "pretrained_model" / "config.json")
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "calvin.py"), "--policy", str(tmp_path),
                           "--policy-set", "objective.num_inference_step=10", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "did you mean --objective.num_inference_steps" in proc.stderr
    assert not (tmp_path / "eval").exists()

    received = []

    def evaluate(source, cfg, out, **kwargs):
        received.append(source)
        out.mkdir(parents=True)
        (out / "results.md").write_text("table")
        return {}

    monkeypatch.setattr(C, "calvin_env_root", lambda root: None)
    monkeypatch.setattr(C, "evaluate_calvin", evaluate)
    monkeypatch.setattr("vla.sim.policies.check_policy_loads", lambda source: None)  # a config-only checkpoint
    C.main(["--policy", str(tmp_path), "--policy-set", "objective.num_inference_steps=10", "--out",
            str(tmp_path / "eval"), "--no-progress"])
    assert received == [CheckpointPolicy(str(tmp_path), (("objective.num_inference_steps", "10"),))]


def test_help():
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "calvin.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 0 and "--chains" in proc.stdout


@pytest.mark.skipif(not HAS_CALVIN_ENV, reason="calvin_env is not installed (see vla.sim.calvin.CALVIN_INSTALL_HELP)")
def test_real_calvin_env_chain(tmp_path):
    """The adapter against calvin_env: a random policy runs one chain; the oracle and the observation work."""
    sim = C.CalvinEnvSim()
    try:
        condition, _ = C.evaluation_chains(1, 0)[0]
        robot, scene = C.initial_scene(condition)
        sim.reset(robot, scene)
        obs = sim.observe("x")
        assert obs["observation.images.base"].shape == (200, 200, 3)
        assert obs["observation.images.wrist"].shape == (84, 84, 3)
        assert obs["observation.state"].shape == (15,)
        assert np.allclose(sim.env.get_state_obs()["scene_obs"][:6], scene[:6], atol=1e-3)
        start = sim.info()
        for _ in range(5):
            sim.step(np.array([0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0]))
        assert sim.observe("x", images=False).keys() == {"observation.state", "task", "embodiment"}
        assert not any(sim.solved(t, start, sim.info()) for t in C.TASK_NAMES)
        # the oracle sees a task done: close the drawer, then move the scene to the drawer open
        closed = {**condition, "drawer": "closed"}
        sim.reset(*C.initial_scene(closed))
        start = sim.info()
        sim.reset(*C.initial_scene({**closed, "drawer": "open"}))
        assert sim.solved("open_drawer", start, sim.info()) and not sim.solved("close_drawer", start, sim.info())
    finally:
        sim.close()
    from vla.sim.policies import RandomPolicy

    cfg = EvalConfig(suite="calvin", calvin_num_chains=1, calvin_max_steps=30, videos_per_task=1)
    results = C.evaluate_calvin(RandomPolicy(7), cfg, tmp_path, progress=False)
    assert results["summary"]["chains"] == 1 and results["chains"][0]["error"] is None

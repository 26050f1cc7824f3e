"""robosuite evaluation (`vla.sim.robosuite`, `eval/robosuite.py`): seeds disjoint from the demonstrations', one
clear error for a bad robot, task or policy before anything is written, and short real-simulator runs: a random
policy's results with per-episode seeds, a resume that reproduces the records, the observation a policy sees
(the dataset's keys and shapes), a real checkpoint acting in a robot's own action space, and (slow) the scripted
expert succeeding through the evaluator's episode loop."""

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

from vla.constants import EMBODIMENT, OBS_STATE, TASK, image_key
from vla.data.embodiments import build_registry
from vla.data.recording import episode_seed as demo_seed
from vla.sim import robosuite as RS
from vla.sim import robosuite_env as E
from vla.sim.policies import RandomPolicy

ROOT = Path(__file__).resolve().parents[1]
SIM_ENV = {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ROBOT = "panda_osc_position"  # the cheapest robot: one 96 px camera at 10 Hz


def _generator():
    spec = importlib.util.spec_from_file_location("_gen_robosuite_expert_eval", ROOT / "datasets" /
                                                  "robosuite_expert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["tasks"][0]["records"]


def _identity(record: dict) -> tuple:
    """What a rerun of an episode must reproduce (timings and process ids aside)."""
    return record["key"], record["seed"], record["policy_seed"], record["success"], record["steps"]


# ---- no simulator --------------------------------------------------------------------------------------------------


def test_evaluation_seeds_never_equal_demonstration_seeds():
    """The generator seeds demonstration k of task t with np.random.seed(SeedSequence([seed, t, k])): a uint32.
    Every evaluation seed is >= 2**32 and goes to numpy as two words, so no base seed of either makes them meet."""
    demo = {demo_seed(base, t, k) for base in range(20) for t in range(len(E.TASK_NAMES)) for k in range(300)}
    assert max(demo) < RS.EVAL_SEED_OFFSET == 2**32
    evals = [RS.eval_reset_seed(base, t, i) for base in (0, 7, 1000) for t in range(3) for i in range(50)]
    assert min(evals) >= 2**32 and len(set(evals)) == len(evals) and not set(evals) & demo
    assert RS.eval_reset_seed(7, 1, 3) == RS.eval_reset_seed(7, 1, 3)  # fixed, whoever computes it
    low, high = RS.seed_words(evals[0])
    assert low + (high << 32) == evals[0] and 0 <= low < 2**32 and high >= 1
    np.random.seed(RS.seed_words(evals[0]))  # numpy takes the two words
    with pytest.raises(ValueError, match="demonstration seeds"):
        RS.seed_words(demo_seed(0, 0, 0))


def test_generator_takes_its_env_pieces_from_the_library():
    rx = _generator()
    for name in ("RobotSpec", "ROBOTS", "TASKS", "TASK_NAMES", "make_env", "render_upright", "robot_state",
                 "SETTLE_STEPS", "DEFAULT_ROBOT", "HELD_OUT_ROBOT", "POS_SCALE", "OPEN", "CLOSE"):
        assert getattr(rx, name) is getattr(E, name), name
    assert rx.ROBOT_TYPE == rx.EMBODIMENT == "robosuite_ur5e_osc" and rx.CAMERAS == E.ROBOTS[E.DEFAULT_ROBOT].cameras
    assert rx.build_parser().get_default("max_steps") == E.MAX_STEPS == RS.TASK_MAX_STEPS["lift"] == 200


def test_protocol_defaults_and_camera_maps_follow_the_registry():
    cfg = RS.RobosuiteEvalConfig(robot="iiwa_joint_position").validate()
    assert cfg.episodes_per_task == 50 and cfg.task_names == ["lift", "stack"] and cfg.resolved_image_size == 112
    registry = build_registry(str(ROOT / "datasets" / "embodiments.yaml"))
    for spec in E.ROBOTS.values():
        assert RS.policy_cameras(RS.RANDOM_POLICY, spec) == {c: registry.get(spec.embodiment).cameras[c]
                                                             for c in spec.cameras}
    p = RS.protocol_settings(cfg, RS.policy_cameras("random", cfg.spec))
    assert p["official"] and p["max_steps"] == {"lift": 200, "stack": 200} and p["settle_steps"] == 5
    assert not RS.protocol_settings(RS.RobosuiteEvalConfig(robot=ROBOT, episodes_per_task=2), {})["official"]


@pytest.mark.parametrize("argv, message", [
    (["--robot", "sawyer_osc_pose"], "invalid choice"),
    (["--robot", "panda_bimanual", "--tasks", "lift"], "cannot do task(s) ['lift']"),
    (["--robot", ROBOT, "--tasks", "lift,push"], "unknown task(s) ['push']"),
    (["--robot", ROBOT, "--episodes", "0"], "episodes_per_task must be >= 1"),
])
def test_bad_robot_or_task_fails_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        RS.main(["--policy", "random", *argv, "--out", str(out), "--no-progress"])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def _checkpoint(tmp_path: Path, embodiment: str) -> Path:
    """A debug-preset policy with random weights and statistics for `embodiment` only, saved as a checkpoint."""
    import dataclasses

    import torch

    from vla.config import get_preset
    from vla.data.normalize import Normalizer
    from vla.policy import VLAPolicy

    cfg = get_preset("debug")
    cfg.action = dataclasses.replace(cfg.action, chunk_size=4, n_action_steps=2, width=32, num_heads=2, ffn_dim=64)
    cfg.data.embodiments_file = str(ROOT / "datasets" / "embodiments.yaml")
    registry = build_registry(cfg.data.embodiments_file)
    emb = registry.get(embodiment)
    rng = np.random.default_rng(0)
    normalizer = Normalizer.from_arrays({embodiment: {"state": [rng.normal(size=(64, emb.state_dim))],
                                                      "action": [rng.uniform(-1, 1, size=(64, emb.action_dim))]}})
    torch.manual_seed(0)
    return VLAPolicy(cfg, registry=registry, normalizer=normalizer).eval().save_pretrained(tmp_path / "ckpt")


def test_policy_trained_without_the_robot_is_refused_before_anything_is_written(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "libero_panda")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        RS.main(["--policy", str(ckpt), "--robot", ROBOT, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not trained on embodiment robosuite_panda_osc" in err and "libero_panda" in err
    assert not out.exists()


def test_every_documented_command_parses():
    """docs/robosuite.md shows only commands the parser accepts (flags and values)."""
    import re
    import shlex

    text = (ROOT / "docs" / "robosuite.md").read_text()
    commands = [shlex.split(line.split(" #")[0]) for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for line in block.splitlines() if "eval/robosuite.py" in line]
    assert len(commands) >= 3
    for tokens in commands:
        args = RS.build_parser().parse_args(tokens[tokens.index("eval/robosuite.py") + 1:])
        RS.config_from_args(args)


# ---- real simulator ------------------------------------------------------------------------------------------------


RANDOM_ARGV = ["--policy", "random", "--robot", ROBOT, "--tasks", "lift", "--max-steps", "20", "--videos", "0",
               "--no-progress"]


@pytest.mark.sim
def test_random_policy_run_records_seeds_and_protocol_and_resumes_to_the_same_records(tmp_path):
    """Two short episodes, then a resume after a lost and a torn record: only the missing episode runs again, and
    it comes out the same."""
    out = tmp_path / "run"
    argv = [*RANDOM_ARGV, "--episodes", "2", "--out", str(out)]
    RS.main(argv)
    results = json.loads((out / "results.json").read_text())
    p = results["protocol"]
    assert (p["benchmark"], p["robot"], p["embodiment"], p["tasks"]) == ("robosuite", ROBOT, "robosuite_panda_osc",
                                                                        ["lift"])
    assert p["max_steps"] == {"lift": 20} and p["cameras"] == {"agentview": "base"} and not p["official"]
    assert results["complete"] and results["summary"]["episodes"] == 2 and results["summary"]["errors"] == 0
    first = _records(out)
    assert [r["seed"] for r in first] == [RS.eval_reset_seed(7, 0, i) for i in range(2)]
    assert all(r["steps"] == 20 and not r["success"] and r["error"] is None for r in first)

    lines = (out / "episodes.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["key"] != "lift/0"]
    (out / "episodes.jsonl").write_text("\n".join(kept) + "\n" + lines[0][: len(lines[0]) // 2])  # lost + torn
    RS.main([*argv, "--resume"])
    again = _records(out)
    assert [_identity(r) for r in again] == [_identity(r) for r in first]
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):  # a resume under another protocol is refused
        RS.main([*argv, "--resume", "--seed", "8"])


@pytest.mark.slow
@pytest.mark.sim
def test_script_runs_with_its_folder_off_the_import_path(tmp_path):
    """`eval/robosuite.py` is named like the robosuite package: run as a script, it must still import the real one."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "eval" / "robosuite.py"), *RANDOM_ARGV, "--episodes", "1",
                          "--max-steps", "2", "--out", str(out)], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **SIM_ENV})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Robot average: 0.0%" in res.stdout and _records(out)[0]["steps"] == 2


class RecordingPolicy(RandomPolicy):
    """Random actions; keeps every observation's keys, shapes and dtypes, and a digest of what it saw."""

    def __init__(self, action_dim: int):
        super().__init__(action_dim)
        self.seen: list[dict] = []
        self.digest = hashlib.sha256()

    def reset(self) -> None:
        super().reset()
        self.digest = hashlib.sha256()

    def select_action(self, observation):
        self.seen.append({k: (v.shape, v.dtype) if isinstance(v, np.ndarray) else v for k, v in observation.items()})
        for k in sorted(observation):
            v = observation[k]
            self.digest.update(v.tobytes() if isinstance(v, np.ndarray) else str(v).encode())
        return super().select_action(observation)


@pytest.mark.sim
def test_policy_sees_the_dataset_observation_and_an_episode_depends_on_its_seed_alone(tmp_path):
    """Cameras upright at the robot's image size under the registry's canonical names, the recorded state vector,
    task string and embodiment; episode 1 run after episode 0 sees exactly what it saw when run first."""
    robot = "ur5e_osc_position"  # two cameras
    spec = E.ROBOTS[robot]
    cfg = RS.RobosuiteEvalConfig(robot=robot, tasks=("lift",), episodes_per_task=2, max_steps=3,
                                 videos_per_task=0).validate()
    cameras = RS.policy_cameras("random", spec)
    policy = RecordingPolicy(spec.action_dim)
    runner = RS.RobosuiteEpisodeRunner(cfg, policy, tmp_path, cameras)
    digests = []
    try:
        for episode in (1, 0, 1):
            record = runner({"key": f"lift/{episode}", "task": "lift", "episode": episode, "video": False})
            assert record["error"] is None and record["steps"] == 3
            digests.append(policy.digest.hexdigest())
    finally:
        runner.close()
    assert digests[0] == digests[2] != digests[1]
    size = spec.image_size
    expected = {image_key("base"): ((size, size, 3), np.uint8), image_key("wrist"): ((size, size, 3), np.uint8),
                OBS_STATE: ((len(spec.state_names),), np.float32), TASK: "lift the red cube",
                EMBODIMENT: "robosuite_ur5e_osc"}
    assert policy.seen[0] == expected and all(seen == expected for seen in policy.seen)


@pytest.mark.sim
def test_a_checkpoint_trained_on_the_robot_acts_in_its_own_action_space(tmp_path):
    ckpt = _checkpoint(tmp_path, "robosuite_panda_osc")
    out = tmp_path / "run"
    cfg = RS.RobosuiteEvalConfig(robot=ROBOT, tasks=("lift",), episodes_per_task=1, max_steps=4, videos_per_task=1)
    results = RS.evaluate_robosuite(str(ckpt), cfg, out, progress=False)
    (record,) = results["tasks"][0]["records"]
    assert record["error"] is None and record["steps"] == 4 and record["policy_queries"] == 2  # 2 actions per chunk
    assert results["policy"]["sha256"] and (out / record["video"]).is_file() and (out / "results.md").is_file()


class ExpertPolicy:
    """The generator's scripted expert behind the policy interface (it reads the simulator, not the observation)."""

    def __init__(self, rx, env, task: str, spec, seed: int):
        self.rx, self.env, self.task, self.spec, self.seed = rx, env, task, spec, seed
        self.expert = None

    def reset(self) -> None:
        self.expert = None

    def select_action(self, observation):
        raw = self.env._get_observations(force_update=True)
        if self.expert is None:
            self.expert = self.rx.EXPERTS[self.task](self.env, self.task, np.random.default_rng(self.seed), self.spec,
                                                     raw)
        return self.expert.act(raw)


@pytest.mark.slow
@pytest.mark.sim
def test_the_scripted_expert_succeeds_through_the_evaluation_episode_loop():
    rx = _generator()
    spec = E.ROBOTS[ROBOT]
    cameras = RS.policy_cameras("random", spec)
    env = E.make_env(spec, "Lift", render=True)
    try:
        results = []
        for episode in range(3):
            policy = ExpertPolicy(rx, env, "lift", spec, seed=episode)
            ep = RS.run_episode(env, policy, spec, language="lift the red cube",
                                reset_seed=RS.eval_reset_seed(7, 0, episode), policy_seed=episode,
                                max_steps=RS.TASK_MAX_STEPS["lift"], image_size=spec.image_size, cameras=cameras)
            results.append((ep.success, ep.steps))
    finally:
        env.close()
    assert all(success and steps < 100 for success, steps in results), results

"""LIBERO protocol: constants and init states as the issue states them, and short runs in the real simulator."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from vla.config import ConfigError, EvalConfig
from vla.sim import libero as L
from vla.sim.policies import RandomPolicy

REPO = Path(__file__).resolve().parents[1]


def test_protocol_constants():
    assert L.MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                           "libero_90": 400}
    assert L.SETTLE_STEPS == 10 and L.SETTLE_ACTION == (0, 0, 0, 0, 0, 0, -1)
    assert L.INIT_STATES_PER_TASK == 50 and EvalConfig().episodes_per_task == 50
    assert L.base_suite("libero_goal_swap") == "libero_goal" and L.suite_max_steps("libero_10_lan") == 520
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        L.base_suite("libero_nonsense")


def test_eval_defaults_come_from_the_checkpoints_eval_section(tmp_path: Path):
    """`--policy <run>/last` reads <run>/last/pretrained_model/config.json; cameras render at eval.image_size (the
    demonstrations' resolution), not at the model's input size data.image_size."""
    from vla.config import get_preset

    cfg = get_preset("tiny-cpu")
    cfg.eval.suite = "libero_spatial"
    assert cfg.data.image_size != cfg.eval.image_size
    (tmp_path / "last" / "pretrained_model").mkdir(parents=True)
    cfg.to_json(tmp_path / "last" / "pretrained_model" / "config.json")
    for policy in (tmp_path / "last", tmp_path / "last" / "pretrained_model"):
        base = L.checkpoint_eval_defaults(str(policy))
        assert (base.suite, base.image_size) == ("libero_spatial", cfg.eval.image_size)
    assert L.checkpoint_eval_defaults(str(tmp_path)) == EvalConfig()
    assert L.checkpoint_eval_defaults(L.RANDOM_POLICY) == EvalConfig()


@pytest.mark.sim
def test_suites_and_fixed_init_states():
    from vla.sim.libero_env import get_init_states, num_tasks

    for suite, n in {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10,
                     "libero_90": 90}.items():
        assert num_tasks(suite) == n
        states = get_init_states(suite, n - 1)
        assert states.shape[0] == 50 and states.ndim == 2
    pro = L.perturbed_suites()
    assert {"libero_object_swap", "libero_goal_lan", "libero_spatial_object", "libero_10_task"} <= set(pro)
    assert "libero_object_env" not in pro  # registered, but the installed package lacks its files
    # official suites instruct with the task language; LIBERO-PRO suites with their (perturbed) BDDL instruction
    assert L.task_instruction("libero_goal", 0) == "open the middle drawer of the cabinet"
    assert L.task_instruction("libero_goal_task", 0) == "open the bottom drawer of the cabinet"
    assert L.task_instruction("libero_goal_lan", 0) == "open the cabinet’s middle drawer"
    cfg = EvalConfig(suite="libero_object", tasks=(0,), episodes_per_task=51)
    with pytest.raises(ValueError, match="has 50 fixed init states"):
        L.evaluate_libero("random", cfg, "/nonexistent/never/written")


class ProbePolicy(RandomPolicy):
    """A chunking random policy that records what it was shown and can raise in one episode."""

    def __init__(self, chunk=2, raise_in_episode=None, exc=RuntimeError):
        super().__init__(7, chunk=chunk)
        self.raise_in, self.exc = raise_in_episode, exc
        self.episode, self.seen = -1, []

    def reset(self):
        super().reset()
        self.episode += 1

    def select_action(self, observation):
        if self.episode == self.raise_in:
            raise self.exc("policy exploded")
        self.seen.append(observation)
        return super().select_action(observation)

    def predict_action_chunk(self, observation):
        """(1, 4, 7): used instead of select_action when the evaluation replans itself (replan_steps > 0)."""
        return np.stack([self.select_action(observation) for _ in range(4)])[None]


@pytest.mark.sim
def test_short_real_run_writes_every_output_and_survives_a_raising_policy(tmp_path):
    """One task, 2 episodes, 6 steps, official hard resets; the policy raises in the first episode."""
    policy = ProbePolicy(chunk=2, raise_in_episode=0)
    cfg = EvalConfig(suite="libero_object", tasks=(0,), episodes_per_task=2, max_steps=6, videos_per_task=1,
                     video_stride=2)
    results = L.evaluate_libero(policy, cfg, tmp_path, progress=False)

    first, second = results["tasks"][0]["records"]
    assert (first["episode"], second["episode"]) == (0, 1) and (first["init_state"], second["init_state"]) == (0, 1)
    assert first["error"] == "RuntimeError: policy exploded" and first["error_source"] == "policy"
    assert not first["success"] and first["steps"] == 0
    assert second["error"] is None and second["steps"] == 6 and second["policy_queries"] == 3  # the run went on
    assert set(second["time_s"]) == {"reset", "sim", "render", "policy"} and second["wall_time_s"] > 0
    assert first["seed"] != second["seed"]

    # what the policy saw: images only when it asked (every 2nd step), upright 128 px, the official state
    assert len(policy.seen) == 6
    with_images = [o for o in policy.seen if "observation.images.base" in o]
    assert len(with_images) == 3
    obs = with_images[0]
    assert obs["observation.images.base"].shape == (128, 128, 3) and obs["observation.images.base"].dtype == np.uint8
    assert obs["observation.images.wrist"].shape == (128, 128, 3)
    assert obs["observation.state"].shape == (8,) and obs["observation.state"].dtype == np.float32
    assert obs["task"] == "pick up the alphabet soup and place it in the basket"
    assert obs["embodiment"] == "libero_panda"

    # every output
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["protocol"]["max_steps"] == 6 and on_disk["protocol"]["settle_steps"] == 10
    assert on_disk["protocol"]["reset"] == "hard" and on_disk["protocol"]["official"] is False
    assert on_disk["complete"] is True and on_disk["versions"]["mujoco"]
    assert on_disk["policy"]["object"].endswith("ProbePolicy")
    assert on_disk["summary"]["episodes"] == 2 and on_disk["summary"]["errors"] == 1
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "# LIBERO libero_object" and md[2].startswith("**Suite average: 0.0%** (0/2 episodes, 1 with")
    assert (tmp_path / "success_per_task.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 2
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == ["task00_ep00_failure.mp4", "task00_ep01_failure.mp4"]
    frames = imageio.mimread(tmp_path / "videos" / "task00_ep01_failure.mp4")
    assert len(frames) == 4 and frames[0].shape == (128, 128, 3)  # steps 0, 2, 4 and the final state


@pytest.mark.sim
def test_resume_after_interrupt_runs_only_missing_episodes(tmp_path):
    cfg = EvalConfig(suite="libero_object", tasks=(1,), episodes_per_task=3, max_steps=3, videos_per_task=0,
                     failure_videos=False, fast_reset=True, replan_steps=2)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during episode 2
        L.evaluate_libero(ProbePolicy(raise_in_episode=2, exc=KeyboardInterrupt), cfg, tmp_path, progress=False)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False and partial["summary"]["episodes"] == 2
    assert "incomplete: 2/3 episodes" in (tmp_path / "results.md").read_text()

    policy = ProbePolicy()
    results = L.evaluate_libero(policy, cfg, tmp_path, progress=False, resume=True)
    assert policy.episode == 0  # one reset: only the missing episode ran
    assert results["complete"] and [r["episode"] for r in results["tasks"][0]["records"]] == [0, 1, 2]
    # replanning every 2 steps: chunks predicted at steps 0 and 2, each from an observation with images
    assert results["tasks"][0]["records"][2]["policy_queries"] == 2
    assert len(policy.seen) == 8 and all("observation.images.wrist" in o for o in policy.seen)
    assert results["protocol"]["reset"] == "soft" and "soft resets" in results["protocol"]["deviations"][-1]
    with pytest.raises(ValueError, match="max_steps: 3 -> 4"):
        L.evaluate_libero(policy, dataclasses.replace(cfg, max_steps=4), tmp_path, progress=False, resume=True)


def test_cli_help_and_errors():
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "eval" / "libero.py"), *args], capture_output=True,
                              text=True, cwd=REPO, check=False)

    proc = run("--help")
    assert proc.returncode == 0 and "--suite" in proc.stdout and "--resume" in proc.stdout
    proc = run("--policy", "random")
    assert proc.returncode == 2 and "--out is required" in proc.stderr
    proc = run("--policy", "random", "--suite", "libero_nonsense", "--out", "/tmp/never")
    assert proc.returncode == 2 and "unknown LIBERO suite" in proc.stderr


def test_eval_takes_the_generators_task_syntax():
    """`make demo --tasks 0-4` hands the same string to the generator and to the evaluation."""
    from vla.sim.libero_env import parse_task_indices

    parser = L.build_parser()
    cfg = L.config_from_args(parser.parse_args(["--policy", "random", "--tasks", "0-2,5"]), EvalConfig())
    assert cfg.tasks == (0, 1, 2, 5) == tuple(parse_task_indices("0-2, 5"))
    for bad in ("1,1", "a", "2-x", "-1"):
        with pytest.raises(ConfigError, match="--tasks"):
            L.config_from_args(parser.parse_args(["--policy", "random", "--tasks", bad]), EvalConfig())


def test_policy_settings_are_checked_before_any_simulator_starts(tmp_path: Path):
    """`--policy-set` is parsed and applied to the checkpoint's config in the parent: a misspelt key or a bad value
    is one clear error, and a good one becomes a CheckpointPolicy that the results name with its settings."""
    from vla.config import get_preset
    from vla.sim.policies import CheckpointPolicy, checkpoint_with_settings

    cfg = get_preset("tiny-cpu")
    cfg.action.chunk_size, cfg.action.moh.horizons = 20, (5, 10, 15, 20)
    (tmp_path / "pretrained_model").mkdir()
    cfg.to_json(tmp_path / "pretrained_model" / "config.json")
    source = checkpoint_with_settings(str(tmp_path), ["action.moh.dynamic=true", "action.moh.min_execute = 5"])
    assert source == CheckpointPolicy(str(tmp_path), (("action.moh.dynamic", "true"), ("action.moh.min_execute", "5")))
    with pytest.raises(ConfigError, match="unknown option --action.moh.threshold"):
        checkpoint_with_settings(str(tmp_path), ["action.moh.threshold=0.2"])
    with pytest.raises(ConfigError, match="min_execute must be in"):
        checkpoint_with_settings(str(tmp_path), ["action.moh.min_execute=30"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        checkpoint_with_settings(str(tmp_path), ["action.moh.dynamic"])
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "libero.py"), "--policy", str(tmp_path),
                           "--policy-set", "action.moh.dynamc=true", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "did you mean --action.moh.dynamic" in proc.stderr
    assert not (tmp_path / "eval").exists()


def test_summary_counts_actions_per_policy_query():
    records = [{"task_id": 0, "episode": e, "success": e == 0, "error": None, "steps": steps, "policy_queries": q}
               for e, (steps, q) in enumerate([(100, 10), (280, 20)])]
    summary = L.summarize(records, [0], "libero_object")
    assert summary["actions_per_query"] == pytest.approx(380 / 30)
    assert summary["success_rate"] == 0.5


@pytest.mark.sim
@pytest.mark.slow
def test_cli_two_workers(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "libero.py"), "--policy", "random", "--suite", "libero_spatial",
         "--tasks", "0", "--episodes", "2", "--max-steps", "5", "--workers", "2", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Suite average" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted(r["episode"] for r in records) == [0, 1] and len({r["pid"] for r in records}) == 2
    assert all(r["error"] is None and r["steps"] == 5 for r in records)


def test_validation_init_states_are_a_recorded_choice():
    args = L.build_parser().parse_args(["--policy", "random", "--init-states", "validation"])
    cfg = L.config_from_args(args, EvalConfig())
    assert cfg.init_states == "validation"
    assert L.config_from_args(L.build_parser().parse_args(["--policy", "random"]), EvalConfig()).init_states == \
        "official"
    with pytest.raises(ConfigError, match="eval.init_states"):
        EvalConfig(init_states="test").validate()
    seeds = {L.validation_reset_seed(7, t, e) for t in range(3) for e in range(50)}
    assert len(seeds) == 150  # one reset seed per episode, reproducible
    assert L.validation_reset_seed(7, 0, 0) == L.validation_reset_seed(7, 0, 0)
    # disjoint from the demonstration generators' reset seeds (base seeds 0-9, 200 attempts per task)
    from vla.data.recording import episode_seed as demo_seed

    demo = {demo_seed(b, t, a) & 0x7FFFFFFF for b in range(10) for t in range(3) for a in range(200)}
    assert not seeds & demo


@pytest.mark.sim
def test_validation_episodes_start_from_seeded_resets_not_the_official_states(tmp_path):
    """A validation episode's scene comes from its reset seed: reproducible, and not an official init state."""
    from vla.sim.libero_env import get_init_states, make_libero_env

    L.import_triton_before_egl()  # as every LIBERO worker does before its first EGL context
    env, _ = make_libero_env("libero_object", 0, render=False, hard_reset=False)
    try:
        def scene(**start):
            L.run_episode(env, ProbePolicy(chunk=2), language="x", max_steps=1, **start)
            return env.env.sim.get_state().flatten()[1:].copy()  # drop the time

        official = scene(init_state=get_init_states("libero_object", 0)[0])
        seed_a, seed_b = L.validation_reset_seed(7, 0, 0), L.validation_reset_seed(7, 0, 1)
        a, a_again, b = scene(init_state=None, reset_seed=seed_a), scene(init_state=None, reset_seed=seed_a), \
            scene(init_state=None, reset_seed=seed_b)
    finally:
        env.close()
    assert np.allclose(a, a_again, atol=1e-6)
    assert not np.allclose(a, b, atol=1e-3) and not np.allclose(a, official, atol=1e-3)

    cfg = EvalConfig(suite="libero_object", tasks=(0,), episodes_per_task=1, max_steps=2, videos_per_task=0,
                     init_states="validation", fast_reset=True)
    results = L.evaluate_libero(ProbePolicy(chunk=2), cfg, tmp_path, progress=False)
    record = results["tasks"][0]["records"][0]
    assert record["init_state"] is None and record["reset_seed"] == seed_a and record["error"] is None
    protocol = json.loads((tmp_path / "results.json").read_text())["protocol"]
    assert protocol["init_states"].startswith("validation") and not protocol["official"]
    assert any("validation" in d for d in protocol["deviations"])
    assert "validation resets (not official)" in (tmp_path / "results.md").read_text()

"""robosuite evaluation of the heterogeneous-robot embodiments: per-robot success rates from fixed seeded states.

`datasets/robosuite_expert.py` records scripted-expert datasets of five robosuite embodiments
(`vla.sim.robosuite_env.ROBOTS`); this module scores a policy on the same envs with one fixed protocol, stated in
every results file:

- robot R, its tasks (lift / stack, or two_arm_lift for the bimanual Pandas), 50 episodes per task;
- episode i of task T (task id t, its position in `TASKS`) starts from a fresh env (a robosuite hard reset, which
  also re-draws the cube sizes) with numpy's global generator seeded by the evaluation seed
  `2**32 + SeedSequence([EVAL_STREAM, seed, t, i])` (`eval_reset_seed`), fed to numpy as the two 32-bit words
  `[low, high]`. The generator seeds its demonstration resets with `np.random.seed(d)` for
  `d = SeedSequence([seed, t, k])`, always below 2**32, so an evaluation seed is never a demonstration seed,
  whatever either run's base seed; every record carries its seed;
- then the generator's 5 idle settle steps (arms still, grippers open);
- the policy sees what the dataset recorded: the robot's cameras rendered upright at the robot's image size,
  named by the embodiment's native -> canonical camera map (the policy checkpoint's registry, else the project
  registry `datasets/embodiments.yaml`), the `robot_state` vector, the task instruction as recorded, and the
  embodiment's registry name; its action, in the embodiment's own units, goes straight to `env.step`;
- the episode succeeds as soon as `env._check_success()` holds after a step, and fails after the generator's
  step limit (200 policy steps at the robot's control rate).

A soft (in-place) reset is not used, although the generator records with one: the physics warm start and the
controllers carry over from the previous episode, so the same seed gave different rollouts depending on what the
worker ran before (measured: 2e-4 rad after 5 steps), and the cube size would be drawn once per worker from an
unseeded generator. With hard resets an episode depends on its seed alone, so `--resume` and any number of
workers give the same records.

`evaluate_robosuite(policy_source, cfg, out_dir)` is the library entry; `main(argv)` is `eval/robosuite.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla.constants import EMBODIMENT, OBS_STATE, TASK, image_key
from vla.sim import results as R
from vla.sim.episode import Episode, close_quietly, failures_recorded, lost_record
from vla.sim.libero import import_triton_before_egl
from vla.sim.policies import (
    RANDOM_POLICY,
    CheckpointPolicy,
    PolicySource,
    add_policy_set_argument,
    as_action,
    as_chunk,
    blame_policy,
    episode_seed,
    inference_context,
    load_policy,
    needs_observation,
    policy_with_settings,
    seed_everything,
)
from vla.sim.robosuite_env import (
    DEFAULT_ROBOT,
    MAX_STEPS,
    ROBOTS,
    SETTLE_STEPS,
    TASK_NAMES,
    TASKS,
    RobotSpec,
)

logger = logging.getLogger(__name__)

EPISODES_PER_TASK = 50
"""Episodes per task of the protocol (fewer are recorded as a deviation)."""
TASK_MAX_STEPS = dict.fromkeys(TASK_NAMES, MAX_STEPS)
"""Policy-step budget per task: the generator's step limit (its demonstrations take 28-200 steps)."""
EVAL_SEED_OFFSET = 2**32
"""Every evaluation seed is at least this; the generator's demonstration seeds are uint32, all below it."""
EVAL_STREAM = 0x0E7A1
"""Tags the entropy of the evaluation seeds (the policy seeds use SeedSequence([seed, task, episode]))."""
PROJECT_REGISTRY = Path(__file__).resolve().parents[2] / "datasets" / "embodiments.yaml"
"""The robosuite embodiments' registry entries (camera maps) for policies that carry no registry of their own."""


@dataclass(frozen=True)
class RobosuiteEvalConfig:
    """Settings of a robosuite evaluation (the protocol's values by default).

    Args:
        robot: `vla.sim.robosuite_env.ROBOTS` name (the generator's `--robot`).
        tasks: task names to evaluate (empty = every task of the robot).
        episodes_per_task: episodes per task (protocol: 50).
        num_workers: parallel simulator processes, each with its own env and policy (1 = in-process).
        seed: evaluation seed; each episode's reset seed and policy seed derive from it and its indices.
        image_size: camera resolution (0 = the robot's own, what its datasets record by default).
        max_steps: policy steps per episode after the settle steps (0 = the task's budget, `TASK_MAX_STEPS`).
        replan_steps: 0 = the policy's own action queue (`select_action`); k > 0 = query `predict_action_chunk`
            and execute its first k actions before asking again.
        videos_per_task: the first k episodes of each task are saved as mp4 (the robot's first camera).
        video_stride: control steps between video frames.
    """

    robot: str = DEFAULT_ROBOT
    tasks: tuple[str, ...] = ()
    episodes_per_task: int = EPISODES_PER_TASK
    num_workers: int = 1
    seed: int = 7
    image_size: int = 0
    max_steps: int = 0
    replan_steps: int = 0
    videos_per_task: int = 2
    video_stride: int = 2

    def validate(self) -> RobosuiteEvalConfig:
        """ValueError naming the first bad setting (unknown robot, a task the robot cannot do, a bad number)."""
        if self.robot not in ROBOTS:
            raise ValueError(f"unknown robot {self.robot!r}; known: {', '.join(ROBOTS)}")
        spec = ROBOTS[self.robot]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASK_NAMES)}")
        wrong = [t for t in self.tasks if t not in spec.tasks]
        if wrong:
            raise ValueError(f"robot {self.robot} cannot do task(s) {wrong}; its tasks: {', '.join(spec.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat a name: {list(self.tasks)}")
        for name in ("episodes_per_task", "num_workers", "video_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "replan_steps", "videos_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size and self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 (or 0 = the robot's {spec.image_size}), got {self.image_size}")
        return self

    @property
    def spec(self) -> RobotSpec:
        return ROBOTS[self.robot]

    @property
    def task_names(self) -> list[str]:
        """The evaluated tasks in the generator's task order."""
        chosen = self.tasks or self.spec.tasks
        return [t for t in TASK_NAMES if t in chosen]

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or self.spec.image_size

    def task_max_steps(self, task: str) -> int:
        return self.max_steps or TASK_MAX_STEPS[task]


# ---- seeds -------------------------------------------------------------------------------------------------------


def eval_reset_seed(seed: int, task_id: int, episode: int) -> int:
    """The reset seed of evaluation episode `episode` of task `task_id`: >= 2**32, so never a demonstration seed."""
    return EVAL_SEED_OFFSET + int(np.random.SeedSequence([EVAL_STREAM, seed, task_id, episode]).generate_state(1)[0])


def seed_words(reset_seed: int) -> list[int]:
    """An evaluation seed as the 32-bit words `np.random.seed` takes ([low, high]); the inverse of packing."""
    if reset_seed < EVAL_SEED_OFFSET:
        raise ValueError(f"evaluation seeds are >= 2**32 (below are the generator's demonstration seeds), got {reset_seed}")
    return [reset_seed & 0xFFFFFFFF, reset_seed >> 32]


# ---- the policy's view -------------------------------------------------------------------------------------------


def policy_cameras(policy: PolicySource, spec: RobotSpec) -> dict[str, str]:
    """Native (dataset) camera -> canonical (policy) camera of the robot, checked against the policy.

    The map is the policy's own registry entry of the embodiment (a checkpoint's `embodiments.json`, or a policy
    object's `registry`), else the project registry. ValueError when the policy has no normalization statistics
    for the embodiment (it was not trained on this robot) or its entry has another action or state size.
    """
    from vla.data.embodiments import EmbodimentRegistry, build_registry

    registry, trained, who = None, None, None
    if isinstance(policy, (str, Path, CheckpointPolicy)) and policy != RANDOM_POLICY:
        import json

        from vla.data.normalize import META_FILE
        from vla.layout import resolve_pretrained

        who = str(policy.path if isinstance(policy, CheckpointPolicy) else policy)
        directory = resolve_pretrained(who)
        registry = EmbodimentRegistry.load(directory)
        meta = directory / META_FILE
        trained = json.loads(meta.read_text()).get("embodiments", []) if meta.is_file() else []
    elif getattr(policy, "normalizer", None) is not None and hasattr(policy.normalizer, "embodiments"):
        who, registry, trained = type(policy).__name__, getattr(policy, "registry", None), policy.normalizer.embodiments
    if trained is not None and spec.embodiment not in trained:
        raise ValueError(f"policy {who} was not trained on embodiment {spec.embodiment} (the robot evaluated); "
                         f"it has statistics for: {', '.join(trained) or 'none'}")
    if registry is None or spec.embodiment not in registry:
        registry = build_registry(str(PROJECT_REGISTRY))
    emb = registry.get(spec.embodiment)
    if (emb.action_dim, emb.state_dim) != (spec.action_dim, len(spec.state_names)):
        raise ValueError(f"policy {who}'s embodiment {spec.embodiment} has action/state dims "
                         f"{emb.action_dim}/{emb.state_dim}, the robot {spec.action_dim}/{len(spec.state_names)}")
    return {cam: emb.cameras.get(cam, cam) for cam in spec.cameras}


def observation(raw: dict, images: dict[str, np.ndarray], spec: RobotSpec, language: str,
                cameras: dict[str, str]) -> dict[str, Any]:
    """The policy observation of one step, as its dataset frame reads after the training data's camera map:
    `observation.images.<canonical>` uint8 (S, S, 3) upright, `observation.state` float32, `task`, `embodiment`."""
    from vla.sim.robosuite_env import robot_state

    obs: dict[str, Any] = {image_key(cameras[cam]): img for cam, img in images.items()}
    obs[OBS_STATE] = robot_state(raw, spec)
    obs[TASK] = language
    obs[EMBODIMENT] = spec.embodiment
    return obs


# ---- one episode -------------------------------------------------------------------------------------------------


def run_episode(
    env: Any,
    policy: Any,
    spec: RobotSpec,
    *,
    language: str,
    reset_seed: int,
    policy_seed: int,
    max_steps: int,
    image_size: int,
    cameras: dict[str, str],
    replan_steps: int = 0,
    video_stride: int = 0,
    episode: Episode | None = None,
) -> Episode:
    """Roll out one episode with the protocol of this module from the seeded state `reset_seed`.

    `env` is a `make_env(spec, ..., render=True)` env. With `video_stride > 0` the frames of the robot's first
    camera are collected in `episode.frames`. Pass `episode` to keep the partial timings and frames if it raises.
    """
    from vla.sim.robosuite_env import render_upright, reset_fresh

    ep = episode if episode is not None else Episode()
    clock = time.perf_counter
    t0 = clock()
    with blame_policy():
        policy.reset()
    raw = reset_fresh(env, spec, seed_words(reset_seed))  # includes the settle steps
    seed_everything(policy_seed)  # a sampling policy draws the same numbers on any worker
    ep.time_reset += clock() - t0

    video_camera = spec.cameras[0]
    plan: deque[np.ndarray] = deque()
    for step in range(max_steps):
        query = not plan if replan_steps else needs_observation(policy)
        want_frame = video_stride > 0 and step % video_stride == 0
        t0 = clock()
        images = render_upright(env, spec.cameras, image_size) if query else {}
        if want_frame:
            ep.frames.append(images.get(video_camera)
                             if query else render_upright(env, (video_camera,), image_size)[video_camera])
        obs = observation(raw, images, spec, language, cameras)
        t1 = clock()
        ep.time_render += t1 - t0

        with inference_context(), blame_policy():
            if replan_steps:
                if not plan:
                    chunk = as_chunk(policy.predict_action_chunk(obs), spec.action_dim)
                    if len(chunk) < replan_steps:
                        raise ValueError(f"replan_steps={replan_steps} but the policy predicts only {len(chunk)} actions")
                    plan.extend(chunk[:replan_steps])
                    ep.policy_queries += 1
                action = plan.popleft()
            else:
                action = as_action(policy.select_action(obs), spec.action_dim)
                ep.policy_queries += int(query)
        t2 = clock()
        ep.time_policy += t2 - t1

        raw, _, _, _ = env.step(action)
        ep.steps += 1
        success = bool(env._check_success())
        ep.time_sim += clock() - t2
        if success:
            ep.success = True
            break

    if video_stride > 0:  # the final state, so a video shows how the episode ended
        t0 = clock()
        ep.frames.append(render_upright(env, (video_camera,), image_size)[video_camera])
        ep.time_render += clock() - t0
    return ep


# ---- workers -----------------------------------------------------------------------------------------------------


@dataclass
class RobosuiteWorker:
    """Picklable recipe of an evaluation worker: builds the policy once, an env per task on demand."""

    cfg: RobosuiteEvalConfig
    policy_source: Any
    out_dir: str
    cameras: dict[str, str]

    def __call__(self) -> RobosuiteEpisodeRunner:
        policy = load_policy(self.policy_source, action_dim=self.cfg.spec.action_dim)
        return RobosuiteEpisodeRunner(self.cfg, policy, Path(self.out_dir), self.cameras)


class RobosuiteEpisodeRunner:
    """Runs jobs {"key", "task", "episode", "video"} in one process; keeps the env of the current task."""

    def __init__(self, cfg: RobosuiteEvalConfig, policy: Any, out_dir: Path, cameras: dict[str, str]):
        import_triton_before_egl()
        self.cfg, self.policy, self.out_dir, self.cameras = cfg, policy, out_dir, cameras
        self.env = None
        self.env_task: str | None = None

    def _env(self, task: str):
        from vla.sim.robosuite_env import make_env

        if self.env_task != task:
            self.close()
            self.env, self.env_task = make_env(self.cfg.spec, TASKS[task][0], render=True), task
        return self.env

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        task, index = job["task"], job["episode"]
        record = episode_record(job, self.cfg)
        record["started_at"] = round(time.time(), 3)
        ep = Episode()
        with failures_recorded(record, f"{self.cfg.robot} {task} episode {index}", on_simulator_error=self.close):
            t0 = time.perf_counter()
            env = self._env(task)
            ep.time_reset += time.perf_counter() - t0
            run_episode(
                env, self.policy, self.cfg.spec, language=TASKS[task][1], reset_seed=record["seed"],
                policy_seed=record["policy_seed"], max_steps=self.cfg.task_max_steps(task),
                image_size=self.cfg.resolved_image_size, cameras=self.cameras, replan_steps=self.cfg.replan_steps,
                video_stride=self.cfg.video_stride if job["video"] else 0, episode=ep,
            )
        ep.finish(record, start)
        if ep.frames and job["video"]:
            name = f"{task}_ep{index:02d}_{'success' if record['success'] else 'failure'}.mp4"
            record["video"] = R.save_rollout_video(self.out_dir, name, ep.frames,
                                                   fps=self.cfg.spec.control_freq / self.cfg.video_stride)
        return record

    def close(self) -> None:
        close_quietly(self.env, "robosuite env")
        self.env, self.env_task = None, None


def episode_record(job: dict[str, Any], cfg: RobosuiteEvalConfig) -> dict[str, Any]:
    task, index = job["task"], job["episode"]
    task_id = TASK_NAMES.index(task)
    return {
        "key": job["key"], "robot": cfg.robot, "embodiment": cfg.spec.embodiment, "task": task, "task_id": task_id,
        "episode": index, "seed": eval_reset_seed(cfg.seed, task_id, index),
        "policy_seed": episode_seed(cfg.seed, task_id, index), "success": False, "steps": 0, "policy_queries": 0,
        "wall_time_s": 0.0, "time_s": {}, "error": None, "error_source": None, "video": None, "pid": os.getpid(),
    }


# ---- a whole robot -----------------------------------------------------------------------------------------------


def protocol_settings(cfg: RobosuiteEvalConfig, cameras: dict[str, str]) -> dict[str, Any]:
    """Everything that decides what the numbers mean; a resumed run must match it exactly."""
    spec, tasks = cfg.spec, cfg.task_names
    deviations = []
    if cfg.episodes_per_task < EPISODES_PER_TASK:
        deviations.append(f"{cfg.episodes_per_task} instead of {EPISODES_PER_TASK} episodes per task")
    if cfg.max_steps and any(cfg.max_steps != TASK_MAX_STEPS[t] for t in tasks):
        deviations.append(f"max_steps {cfg.max_steps} instead of {TASK_MAX_STEPS[tasks[0]]}")
    if cfg.resolved_image_size != spec.image_size:
        deviations.append(f"{cfg.resolved_image_size} px cameras instead of the robot's {spec.image_size} px")
    if len(tasks) != len(spec.tasks):
        deviations.append(f"{len(tasks)} of the robot's {len(spec.tasks)} tasks")
    return {
        "benchmark": "robosuite", "robot": cfg.robot, "embodiment": spec.embodiment, "arms": list(spec.robots),
        "controller": spec.controller, "control_freq": spec.control_freq, "tasks": tasks,
        "instructions": {t: TASKS[t][1] for t in tasks}, "episodes_per_task": cfg.episodes_per_task,
        "seed": cfg.seed,
        "initial_states": "fresh env (hard reset) per episode, numpy seeded with seed_words(eval_reset_seed(seed, "
                          f"task_id, episode)): 2**32 + SeedSequence([{EVAL_STREAM:#x}, seed, task_id, episode]), "
                          "disjoint from the generator's demonstration seeds (< 2**32); each record's seed",
        "policy_seed": "SeedSequence([seed, task_id, episode]) seeds python/numpy/torch after the settle steps",
        "settle_steps": SETTLE_STEPS, "settle_action": spec.idle_action().tolist(),
        "max_steps": {t: cfg.task_max_steps(t) for t in tasks},
        "success": "env._check_success() after a policy step", "image_size": cfg.resolved_image_size,
        "cameras": dict(cameras), "state_names": spec.state_names, "action_names": spec.action_names,
        "replan_steps": cfg.replan_steps, "official": not deviations, "deviations": deviations,
    }


def evaluate_robosuite(
    policy: PolicySource,
    cfg: RobosuiteEvalConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a policy on one robot's robosuite tasks and write every output into `out_dir`.

    Args:
        policy: a checkpoint directory, a `CheckpointPolicy`, a policy object, a picklable zero-argument factory,
            or "random" (uniform actions of the robot's action size).
        cfg: the evaluation settings (the protocol's by default).
        out_dir: run directory (run.json, episodes.jsonl, results.json, results.md, success_per_task.png, videos/).
        resume: keep the finished episodes of an interrupted run in `out_dir` and evaluate only the missing ones.
        overwrite: discard earlier results in `out_dir`.
        progress: show a tqdm bar over episodes with the running success rate.

    Raises:
        ValueError: bad settings, or a policy not trained on the robot's embodiment: before anything is written.

    Returns:
        The contents of results.json (protocol, policy, versions, summary, per-task and per-episode records).
    """
    cfg = cfg.validate()
    cameras = policy_cameras(policy, cfg.spec)
    out = Path(out_dir)
    run_info = {
        "protocol": protocol_settings(cfg, cameras),
        "policy": R.policy_identity(policy),
        "settings": dataclasses.asdict(cfg),
        "versions": R.package_versions(),
        "command": " ".join(sys.argv),
    }
    log = R.start_run(out, run_info, resume=resume, overwrite=overwrite)
    records = log.read()
    done = {r["key"] for r in records}
    jobs = [
        {"key": f"{t}/{e}", "task": t, "episode": e, "video": e < cfg.videos_per_task}
        for t in cfg.task_names for e in range(cfg.episodes_per_task) if f"{t}/{e}" not in done
    ]
    total = len(cfg.task_names) * cfg.episodes_per_task
    logger.info("robosuite %s: %d task(s) x %d episodes, %d to run (%d already done), %d worker(s) -> %s",
                cfg.robot, len(cfg.task_names), cfg.episodes_per_task, len(jobs), total - len(jobs), cfg.num_workers,
                out)
    bar = R.progress_bar(total, records, desc=cfg.robot, disable=not progress)
    return R.run_logged(log, jobs, RobosuiteWorker(cfg, policy, str(out), cameras), num_workers=cfg.num_workers,
                        on_lost=lost_record(episode_record, cfg), bar=bar,
                        finish=lambda records, wall_time_s: write_robosuite_results(out, run_info, records,
                                                                                    wall_time_s=wall_time_s))


def summarize(records: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task and robot success rates from episode records (the robot average weights every episode)."""
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out_tasks = []
    for t, recs in by_task.items():
        recs = sorted(recs, key=lambda r: r["episode"])
        successes = sum(r["success"] for r in recs)
        steps = [r["steps"] for r in recs if r["success"]]
        out_tasks.append({
            "task": t, "task_id": TASK_NAMES.index(t), "language": TASKS[t][1], "episodes": len(recs),
            "successes": successes, "success_rate": R.rate(successes, len(recs)),
            "mean_success_steps": float(np.mean(steps)) if steps else None,
            "errors": sum(r["error"] is not None for r in recs), "records": recs,
        })
    n = sum(t["episodes"] for t in out_tasks)
    successes = sum(t["successes"] for t in out_tasks)
    walls = [r["wall_time_s"] for r in records if r.get("wall_time_s")]
    times = {k: sum(r.get("time_s", {}).get(k, 0.0) for r in records) for k in ("reset", "sim", "render", "policy")}
    return {
        "episodes": n, "successes": successes, "success_rate": R.rate(successes, n),
        "errors": sum(t["errors"] for t in out_tasks),
        "mean_episode_wall_time_s": float(np.mean(walls)) if walls else 0.0,
        "time_share": {k: R.rate(v, sum(times.values())) for k, v in times.items()}, "tasks": out_tasks,
    }


def write_robosuite_results(out: Path, run_info: dict[str, Any], records: list[dict[str, Any]],
                            *, wall_time_s: float) -> dict[str, Any]:
    """results.json, results.md and success_per_task.png from the run info and every finished record."""
    protocol = run_info["protocol"]
    summary = summarize(records, protocol["tasks"])
    expected = len(protocol["tasks"]) * protocol["episodes_per_task"]
    results = {
        **run_info, "complete": summary["episodes"] >= expected, "expected_episodes": expected,
        "last_session_wall_time_s": round(wall_time_s, 1),
        "summary": {k: v for k, v in summary.items() if k != "tasks"}, "tasks": summary["tasks"],
    }
    R.write_json(out / R.RESULTS_JSON, results)
    (out / R.RESULTS_MD).write_text(robosuite_markdown(results))
    if summary["tasks"]:
        R.bar_chart(out / "success_per_task.png", [t["task"] for t in summary["tasks"]],
                    [t["success_rate"] for t in summary["tasks"]],
                    title=f"{protocol['robot']}: {summary['success_rate']:.1%} average "
                          f"({summary['episodes']} episodes)")
    return results


def robosuite_markdown(results: dict[str, Any]) -> str:
    p, s = results["protocol"], results["summary"]
    steps = sorted(set(p["max_steps"].values()))
    lines = [
        f"# robosuite {p['robot']} ({p['embodiment']})",
        "",
        R.headline(f"Robot average: {s['success_rate']:.1%}", results, f"{s['successes']}/{s['episodes']} episodes",
                   f"{s['episodes']}/{results['expected_episodes']} episodes"),
        "",
        *R.provenance_lines(results),
        (f"- {p['episodes_per_task']} episodes per task from seeded fresh resets (seed {p['seed']}), "
         f"{'/'.join(map(str, steps))} policy steps at {p['control_freq']} Hz after {p['settle_steps']} settle steps, "
         f"{p['controller']}, {p['image_size']} px cameras "
         + ", ".join(f"{n}->{c}" for n, c in p["cameras"].items())),
        "- time share: " + ", ".join(f"{k} {v:.0%}" for k, v in s["time_share"].items())
        + f"; {s['mean_episode_wall_time_s']:.1f} s per episode",
        "",
    ]
    rows = [["**average**", "", f"**{s['success_rate']:.1%}**", s["episodes"], "", s["errors"]]]
    rows += [[t["task"], t["language"], f"{t['success_rate']:.1%}", t["episodes"],
              "" if t["mean_success_steps"] is None else f"{t['mean_success_steps']:.0f}", t["errors"]]
             for t in results["tasks"]]
    lines.append(R.markdown_table(["task", "instruction", "success", "episodes", "steps (successes)", "errors"], rows))
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = RobosuiteEvalConfig()
    parser = argparse.ArgumentParser(
        prog="eval/robosuite.py",
        description="Evaluate a policy on one robosuite embodiment of datasets/robosuite_expert.py: success rate "
                    "per task from fixed seeded initial states (disjoint from the demonstrations'). Writes "
                    "results.json, results.md, a success plot and videos.",
    )
    parser.add_argument("--policy", default=None,
                        help=f"checkpoint directory (VLAPolicy.from_pretrained) or '{RANDOM_POLICY}' (required)")
    parser.add_argument("--robot", choices=list(ROBOTS), default=d.robot,
                        help=f"embodiment evaluated, the generator's --robot (default {d.robot})")
    parser.add_argument("--tasks", default="",
                        help=f"comma-separated from {TASK_NAMES} (default: every task of the robot)")
    parser.add_argument("--episodes", type=int, default=d.episodes_per_task,
                        help=f"episodes per task (protocol and default: {d.episodes_per_task})")
    parser.add_argument("--workers", type=int, default=d.num_workers,
                        help=f"parallel simulator processes (default {d.num_workers})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"evaluation seed (default {d.seed})")
    parser.add_argument("--max-steps", type=int, default=d.max_steps,
                        help=f"policy steps per episode (default 0 = the generator's limit, {MAX_STEPS})")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help="camera resolution (default 0 = the robot's own: what its datasets record)")
    parser.add_argument("--replan-steps", type=int, default=d.replan_steps,
                        help="0 = the policy's own action queue (default); k = execute k actions of each predicted chunk")
    add_policy_set_argument(parser)
    parser.add_argument("--videos", type=int, default=d.videos_per_task,
                        help=f"videos of the first k episodes per task (default {d.videos_per_task})")
    parser.add_argument("--video-stride", type=int, default=d.video_stride,
                        help=f"control steps per video frame (default {d.video_stride})")
    R.add_run_arguments(parser, "run directory (default: <checkpoint>/eval/robosuite_<robot>)")
    return parser


def config_from_args(args: argparse.Namespace) -> RobosuiteEvalConfig:
    """The settings of a command line; ValueError naming the first bad option."""
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return RobosuiteEvalConfig(
        robot=args.robot, tasks=tasks, episodes_per_task=args.episodes, num_workers=args.workers, seed=args.seed,
        image_size=args.image_size, max_steps=args.max_steps, replan_steps=args.replan_steps,
        videos_per_task=args.videos, video_stride=args.video_stride,
    ).validate()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`eval/robosuite.py`: parse options, check them and the policy, evaluate, print the summary table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.policy:
        parser.error("--policy is required (a checkpoint directory or 'random')")
    if args.policy != RANDOM_POLICY and not Path(args.policy).exists():
        parser.error(f"--policy {args.policy}: no such checkpoint directory")
    if args.out is None and args.policy == RANDOM_POLICY:
        parser.error("--out is required with --policy random (there is no checkpoint directory to write into)")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    source = policy_with_settings(args.policy, args.policy_set, parser.error)
    out = Path(args.out) if args.out else Path(args.policy) / "eval" / f"robosuite_{cfg.robot}"
    try:
        results = evaluate_robosuite(source, cfg, out, resume=args.resume, overwrite=args.overwrite,
                                     progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # a policy not trained on the robot among them
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: the finished episodes are in {out}; add --resume to complete the run\n")
    print((out / R.RESULTS_MD).read_text())
    print(f"results: {out}")
    return results

"""LIBERO evaluation with the official protocol: parallel, offline, crash-safe, with videos and plots.

The protocol (LIBERO benchmark; the evaluation scripts of openpi and OpenVLA), stated in every results file:

- suites libero_spatial / libero_object / libero_goal / libero_10 / libero_90 with a budget of 220 / 280 / 300 /
  520 / 400 policy steps per episode (LIBERO-PRO perturbed suites keep the budget of the suite they perturb);
- episode i of a task starts from the benchmark's fixed initial state i (`get_task_init_states`, 50 per task):
  `env.reset()` then `env.set_init_state(...)`;
- the first 10 steps send the no-op action [0, 0, 0, 0, 0, 0, -1] while the objects settle (not counted in the
  budget, as in the reference scripts);
- the policy sees the agent-view and wrist images rotated 180 degrees, the end-effector position, its axis-angle
  orientation and the two gripper joints, and the task language (`vla.sim.libero_env.libero_observation`);
- an episode succeeds as soon as the environment reports success (`done`).

Rendering dominates the cost of a LIBERO step (DESIGN.md: each 128 px camera ~40-60 ms against ~9 ms of physics),
so the env steps physics only, and the cameras are rendered when someone reads the pixels: when the policy is
queried (`policy.needs_observation()` True, or every `replan_steps`; a policy without `needs_observation` is
queried, and rendered for, at every step) and, for episodes that keep a video, every `video_stride` steps (only the
agent view, reusing the policy's frame when both fall on the same step). Results are identical to rendering every
step; only the wall time changes.

`evaluate_libero(policy_source, cfg, out_dir)` is the library entry; `main(argv)` is `eval/libero.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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

from vla.config import ConfigError, EvalConfig
from vla.constants import OBS_IMAGES
from vla.sim import results as R
from vla.sim.episode import Episode, close_quietly, failures_recorded, lost_record
from vla.sim.policies import (
    RANDOM_POLICY,
    PolicySource,
    add_policy_set_argument,
    as_action,
    as_chunk,
    blame_policy,
    check_remote_arguments,
    connect_remote,
    episode_seed,
    inference_context,
    load_policy,
    needs_observation,
    policy_with_settings,
    seed_everything,
)

logger = logging.getLogger(__name__)

OFFICIAL_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
"""Official policy-step budget per suite (the longest training demonstration plus a margin)."""
SETTLE_STEPS = 10
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
"""Sent for the first SETTLE_STEPS steps: arm still, gripper open, while dropped objects come to rest."""
INIT_STATES_PER_TASK = 50
LIBERO_PRO_PERTURBATIONS = ("lan", "object", "swap", "task", "env")
"""LIBERO-PRO suite suffixes: instruction paraphrase, object appearance, position swap, task, environment."""
PRO_BASE_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
VIDEO_CAMERA = "agentview"


@dataclass(frozen=True)
class ClientProtocol:
    """How the client side of an evaluation prepares what the policy sees (recorded in results.json).

    Args:
        name: "vla" (our runner's defaults) or "openpi" (what openpi's LIBERO client shows a policy trained on the
            public LIBERO data).
        image_size: render resolution forced by the protocol (None: the evaluation's own setting).
        msaa: render with MuJoCo's default multisampling.
        resize_with_pad: > 0: resize each camera image to this square size keeping its aspect ratio, padding with
            black (openpi's `image_tools.resize_with_pad`), before the policy sees it.
        replan_steps: forced replanning interval (None: the evaluation's own setting).
        seed: forced evaluation seed (None: the evaluation's own).
        seed_stream: "episode": numpy/torch/env seeded per episode from the seed and its indices (independent of
            the worker); "task": seeded once with `seed` when a worker builds a task's env and carried across the
            episodes it runs (openpi's stream, exact with one worker).
    """

    name: str
    image_size: int | None = None
    msaa: bool = False
    resize_with_pad: int = 0
    replan_steps: int | None = None
    seed: int | None = None
    seed_stream: str = "episode"

    def apply(self, cfg: EvalConfig) -> EvalConfig:
        """The evaluation settings with the protocol's forced values."""
        forced = {k: v for k, v in (("image_size", self.image_size), ("replan_steps", self.replan_steps),
                                    ("seed", self.seed)) if v is not None}
        return dataclasses.replace(cfg, **forced)


CLIENT_PROTOCOLS = {
    "vla": ClientProtocol("vla"),
    "openpi": ClientProtocol("openpi", image_size=256, msaa=True, resize_with_pad=224, replan_steps=5, seed=7,
                             seed_stream="task"),
}
"""Named client protocols; `--protocol openpi` makes a served π0 / π0.5 see what openpi's own client sends."""


def client_protocol(name: str) -> ClientProtocol:
    if name not in CLIENT_PROTOCOLS:
        raise ValueError(f"unknown client protocol {name!r}; known: {', '.join(CLIENT_PROTOCOLS)}")
    return CLIENT_PROTOCOLS[name]


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): bilinear resize of the longer side to `size`, centred, black padding."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.BILINEAR))
    out = np.zeros((size, size, image.shape[2]), dtype=image.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


# ---- suites ----------------------------------------------------------------------------------------------------


def base_suite(suite: str) -> str:
    """The official suite a LIBERO-PRO suite perturbs ("libero_goal_swap" -> "libero_goal"); official -> itself."""
    if suite in MAX_STEPS:
        return suite
    for base in PRO_BASE_SUITES:
        for kind in LIBERO_PRO_PERTURBATIONS:
            if suite == f"{base}_{kind}":
                return base
    raise ValueError(f"unknown LIBERO suite {suite!r}; known: {', '.join(available_suites())}")


def suite_max_steps(suite: str) -> int:
    return MAX_STEPS[base_suite(suite)]


def perturbed_suites() -> list[str]:
    """LIBERO-PRO suites the installed package registers AND ships every task file and init-state file for."""
    from libero.libero import benchmark, get_libero_path

    registered = benchmark.get_benchmark_dict()
    bddl_root, init_root = Path(get_libero_path("bddl_files")), Path(get_libero_path("init_states"))
    out = []
    for base in PRO_BASE_SUITES:
        for kind in LIBERO_PRO_PERTURBATIONS:
            name = f"{base}_{kind}"
            tasks = benchmark.task_maps.get(name, {}) if name in registered else {}
            if tasks and all(
                (bddl_root / name / f"{t}.bddl").is_file() and (init_root / name / f"{t}.pruned_init.npz").is_file()
                for t in tasks
            ):
                out.append(name)
    return out


def task_instruction(suite: str, task_id: int) -> str:
    """The instruction the policy is given for a task.

    Official suites: the benchmark task's `language` (derived from its file name), as the reference evaluation
    scripts do. LIBERO-PRO suites: the instruction written in the task's BDDL file, because that is what their
    language and task perturbations change (a task perturbation also changes the goal: "open the middle drawer"
    becomes "open the bottom drawer"), while the file name stays the original one.
    """
    from vla.sim.libero_env import get_task

    task = get_task(suite, task_id)
    if suite in MAX_STEPS:
        return task.language
    from libero.libero import get_libero_path
    from libero.libero.envs import bddl_utils

    bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
    return bddl_utils.get_problem_info(str(bddl))["language_instruction"]


def available_suites() -> list[str]:
    try:
        return [*OFFICIAL_SUITES, *perturbed_suites()]
    except ImportError:
        return list(OFFICIAL_SUITES)


# ---- one episode -----------------------------------------------------------------------------------------------


def run_episode(
    env: Any,
    policy: Any,
    *,
    language: str,
    init_state: np.ndarray | None,
    max_steps: int,
    reset_seed: int | None = None,
    image_size: int = 128,
    replan_steps: int = 0,
    video_stride: int = 0,
    episode: Episode | None = None,
    pad_to: int = 0,
) -> Episode:
    """Roll out one LIBERO episode with the official protocol from a fixed initial state.

    With `init_state=None` the episode starts from a fresh reset seeded with `reset_seed` instead (validation
    episodes: LIBERO samples the object placement from numpy's global generator, which `env.seed` sets).

    `env` is an env made by `make_libero_env(..., render=False)`. With `video_stride > 0` the agent-view frames
    (upright, uint8 (S, S, 3)) are collected in `episode.frames`. Pass `episode` to keep the partial timings and
    frames if the rollout raises. `pad_to > 0` resizes-with-pad every policy image to that size (a client protocol).
    """
    from vla.sim.libero_env import ACTION_DIM, DEFAULT_SIM_CAMERAS, libero_images, libero_observation, render_cameras

    ep = episode if episode is not None else Episode()
    clock = time.perf_counter
    t0 = clock()
    with blame_policy():
        policy.reset()
    if init_state is None:
        if reset_seed is None:
            raise ValueError("run_episode needs an init_state or a reset_seed")
        env.seed(reset_seed)
        raw = env.reset()
    else:
        env.reset()
        raw = env.set_init_state(init_state)
    ep.time_reset += clock() - t0

    t0 = clock()
    for _ in range(SETTLE_STEPS):
        raw, _, _, _ = env.step(list(SETTLE_ACTION))
    ep.time_sim += clock() - t0

    plan: deque[np.ndarray] = deque()
    for step in range(max_steps):
        query = not plan if replan_steps else needs_observation(policy)
        want_frame = video_stride > 0 and step % video_stride == 0
        t0 = clock()
        cameras = DEFAULT_SIM_CAMERAS if query else ()
        pixels = render_cameras(env, cameras) if query else {}
        if want_frame and not query:
            pixels = render_cameras(env, [VIDEO_CAMERA])
        obs = libero_observation({**raw, **pixels}, language, image_size=image_size, cameras=cameras)
        if pad_to:
            obs = {k: resize_with_pad(v, pad_to) if k.startswith(OBS_IMAGES) else v for k, v in obs.items()}
        if want_frame:
            ep.frames.append(libero_images(pixels, image_size=image_size, cameras=[VIDEO_CAMERA])[VIDEO_CAMERA])
        t1 = clock()
        ep.time_render += t1 - t0

        with inference_context(), blame_policy():
            if replan_steps:
                if not plan:
                    chunk = as_chunk(policy.predict_action_chunk(obs), ACTION_DIM)
                    if len(chunk) < replan_steps:
                        raise ValueError(f"replan_steps={replan_steps} but the policy predicts only {len(chunk)} actions")
                    plan.extend(chunk[:replan_steps])
                    ep.policy_queries += 1
                action = plan.popleft()
            else:
                action = as_action(policy.select_action(obs), ACTION_DIM)
                ep.policy_queries += int(query)
        t2 = clock()
        ep.time_policy += t2 - t1

        raw, _, done, _ = env.step(action.tolist())
        ep.steps += 1
        ep.time_sim += clock() - t2
        if done:
            ep.success = True
            break

    if video_stride > 0:  # the final state, so a video shows how the episode ended
        t0 = clock()
        ep.frames.append(libero_images(render_cameras(env, [VIDEO_CAMERA]), image_size=image_size,
                                       cameras=[VIDEO_CAMERA])[VIDEO_CAMERA])
        ep.time_render += clock() - t0
    return ep


# ---- workers ---------------------------------------------------------------------------------------------------


@dataclass
class LiberoWorker:
    """Picklable recipe of an evaluation worker: builds the policy once, envs per task on demand."""

    cfg: EvalConfig
    policy_source: Any
    out_dir: str
    protocol: str = "vla"

    def __call__(self) -> LiberoEpisodeRunner:
        return LiberoEpisodeRunner(self.cfg, load_policy(self.policy_source), Path(self.out_dir),
                                   protocol=client_protocol(self.protocol))


def import_triton_before_egl() -> None:
    """Import triton now if it is installed, before any LIBERO renderer exists in this process.

    Mesa's software EGL renderer (llvmpipe) and triton (imported by torch.compile, diffusers, peft) each bring an
    LLVM; importing triton after a MuJoCo EGL context was made segfaults the process (measured here with torch
    2.14 + Mesa), while the opposite order works. Evaluating in a process that later trains or loads a policy
    must therefore load triton first.
    """
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


class LiberoEpisodeRunner:
    """Runs jobs {"task_id", "episode", "video"} in one process; keeps the env of the current task."""

    def __init__(self, cfg: EvalConfig, policy: Any, out_dir: Path, *, protocol: ClientProtocol | None = None):
        import_triton_before_egl()
        self.cfg, self.policy, self.out_dir = cfg, policy, out_dir
        self.protocol = protocol or CLIENT_PROTOCOLS["vla"]
        self.env = None
        self.env_task: int | None = None
        self.max_steps = cfg.max_steps or suite_max_steps(cfg.suite)

    def _env(self, task_id: int):
        from vla.sim.libero_env import make_libero_env

        if self.env_task != task_id:
            self.close()
            if self.protocol.seed_stream == "task":  # openpi: numpy and the env seeded once per task
                seed_everything(self.cfg.seed)
            self.env, _ = make_libero_env(self.cfg.suite, task_id, image_size=self.cfg.image_size, render=False,
                                          seed=self.cfg.seed, hard_reset=not self.cfg.fast_reset,
                                          msaa=self.protocol.msaa)
            self.env_task = task_id
        return self.env

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        from vla.sim.libero_env import CONTROL_FREQ, get_init_states, get_task

        start = time.perf_counter()
        task_id, index = job["task_id"], job["episode"]
        record = episode_record(job, self.cfg)
        record["started_at"] = round(time.time(), 3)
        ep = Episode()
        with failures_recorded(record, f"{self.cfg.suite} task {task_id} episode {index}", on_simulator_error=self.close):
            task = get_task(self.cfg.suite, task_id)
            record["task"] = task.name
            init_states = get_init_states(self.cfg.suite, task_id)
            t0 = time.perf_counter()
            env = self._env(task_id)
            ep.time_reset += time.perf_counter() - t0
            if self.protocol.seed_stream == "episode":
                seed_everything(record["seed"])  # after the (cached or not) env build: the same draws on any worker
            else:
                record["seed"] = self.cfg.seed  # the stream carried since this worker built the task's env
            validation = self.cfg.init_states == "validation"
            run_episode(
                env, self.policy, language=task_instruction(self.cfg.suite, task_id),
                init_state=None if validation else init_states[index], reset_seed=record["reset_seed"],
                max_steps=self.max_steps,
                image_size=self.cfg.image_size, replan_steps=self.cfg.replan_steps,
                video_stride=self.cfg.video_stride if job["video"] else 0, episode=ep,
                pad_to=self.protocol.resize_with_pad,
            )
        ep.finish(record, start)
        keep = index < self.cfg.videos_per_task or not record["success"]
        if ep.frames and keep:
            name = f"task{task_id:02d}_ep{index:02d}_{'success' if record['success'] else 'failure'}.mp4"
            record["video"] = R.save_rollout_video(self.out_dir, name, ep.frames,
                                                   fps=CONTROL_FREQ / max(1, self.cfg.video_stride))
        return record

    def close(self) -> None:
        close_quietly(self.env, "LIBERO env")
        self.env, self.env_task = None, None


VALIDATION_STREAM = 0x7A11D
"""Tags the seed stream of validation resets. The demonstration generators seed episode resets with
SeedSequence([seed, task, attempt]) and the evaluation seeds its episodes with SeedSequence([seed, task, episode]);
a four-word entropy with this tag is a different sequence from both, whatever the seeds."""


def validation_reset_seed(seed: int, task_id: int, episode: int) -> int:
    """The reset seed of validation episode `episode` of a task (reproducible, independent of the worker)."""
    return episode_seed(seed, task_id, episode, VALIDATION_STREAM)


def episode_record(job: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    task_id, index = job["task_id"], job["episode"]
    return {
        "key": job["key"], "suite": cfg.suite, "task_id": task_id, "task": None, "episode": index,
        "init_state": index if cfg.init_states == "official" else None,
        "reset_seed": validation_reset_seed(cfg.seed, task_id, index) if cfg.init_states == "validation" else None,
        "seed": episode_seed(cfg.seed, task_id, index), "success": False, "steps": 0,
        "policy_queries": 0, "wall_time_s": 0.0, "time_s": {}, "error": None, "error_source": None, "video": None,
        "pid": os.getpid(),
    }


# ---- a whole suite ---------------------------------------------------------------------------------------------


def protocol_settings(cfg: EvalConfig, task_ids: Sequence[int], protocol: str = "vla") -> dict[str, Any]:
    """Everything that decides what the numbers mean; a resumed run must match it exactly."""
    from vla.sim.libero_env import get_init_states, num_tasks

    max_steps = cfg.max_steps or suite_max_steps(cfg.suite)
    n_init = min(len(get_init_states(cfg.suite, t)) for t in task_ids)
    deviations = []
    if max_steps != suite_max_steps(cfg.suite):
        deviations.append(f"max_steps {max_steps} instead of {suite_max_steps(cfg.suite)}")
    validation = cfg.init_states == "validation"
    if validation:
        deviations.append("validation episodes: fresh seeded resets instead of the official init states")
    elif cfg.episodes_per_task != n_init:
        deviations.append(f"{cfg.episodes_per_task} of {n_init} init states per task")
    if len(task_ids) != num_tasks(cfg.suite):
        deviations.append(f"{len(task_ids)} of {num_tasks(cfg.suite)} tasks")
    if cfg.fast_reset:
        deviations.append("soft resets (states differ from hard resets by ~1e-5)")
    client = client_protocol(protocol)
    if client.seed_stream == "task" and cfg.num_workers > 1:
        deviations.append(f"{client.name} seed stream carried per worker process ({cfg.num_workers} workers)")
    return {
        "benchmark": "LIBERO", "suite": cfg.suite, "base_suite": base_suite(cfg.suite), "tasks": list(task_ids),
        "episodes_per_task": cfg.episodes_per_task,
        "init_states": ("validation: fresh resets seeded by a stream of their own (record reset_seed)" if validation
                        else "benchmark fixed init states, episode i -> state i"),
        "max_steps": max_steps, "settle_steps": SETTLE_STEPS, "settle_action": list(SETTLE_ACTION),
        "success": "env reports done (task goal predicates hold)", "seed": cfg.seed, "image_size": cfg.image_size,
        "reset": "soft" if cfg.fast_reset else "hard",
        "replan_steps": cfg.replan_steps, "official": not deviations, "deviations": deviations,
        "instruction": "task language (file name)" if cfg.suite in MAX_STEPS else "the task's BDDL instruction",
        "client_protocol": dataclasses.asdict(client),
    }


def evaluate_libero(
    policy: PolicySource,
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    protocol: str = "vla",
) -> dict[str, Any]:
    """Evaluate a policy on one LIBERO suite (`cfg.suite`) and write every output into `out_dir`.

    Args:
        policy: a checkpoint directory, a policy object, a picklable zero-argument factory, or "random".
        cfg: the evaluation settings (official protocol by default).
        out_dir: run directory (results.json, results.md, success_per_task.png, videos/, episodes.jsonl).
        resume: keep the finished episodes of an interrupted run in `out_dir` and evaluate only the missing ones.
        overwrite: discard earlier results in `out_dir`.
        progress: show a tqdm bar over episodes with the running success rate.
        protocol: client protocol (`CLIENT_PROTOCOLS`): "vla", or "openpi" (256 px renders with multisampling,
            resize-with-pad to 224, replanning every 5 steps, seed 7 once per task), applied over `cfg`.

    Returns:
        The contents of results.json (protocol, policy, versions, summary, per-task and per-episode records).
    """
    cfg = client_protocol(protocol).apply(cfg).validate()
    task_ids = _resolve_tasks(cfg)
    out = Path(out_dir)
    run_info = {
        "protocol": protocol_settings(cfg, task_ids, protocol),
        "policy": R.policy_identity(policy),
        "settings": dataclasses.asdict(cfg),
        "versions": R.package_versions(),
        "command": " ".join(sys.argv),
    }
    log = R.start_run(out, run_info, resume=resume, overwrite=overwrite)
    done = {r["key"] for r in log.read()}
    jobs = [
        {"key": f"{t}/{e}", "task_id": t, "episode": e, "video": e < cfg.videos_per_task or cfg.failure_videos}
        for t in task_ids for e in range(cfg.episodes_per_task)
        if f"{t}/{e}" not in done
    ]
    total = len(task_ids) * cfg.episodes_per_task
    logger.info("LIBERO %s: %d tasks x %d episodes, %d to run (%d already done), %d worker(s) -> %s",
                cfg.suite, len(task_ids), cfg.episodes_per_task, len(jobs), total - len(jobs), cfg.num_workers, out)
    bar = R.progress_bar(total, log.read(), desc=cfg.suite, disable=not progress)
    return R.run_logged(log, jobs, LiberoWorker(cfg, policy, str(out), protocol), num_workers=cfg.num_workers,
                        on_lost=lost_record(episode_record, cfg), bar=bar,
                        finish=lambda records, wall_time_s: write_libero_results(out, run_info, records,
                                                                                 wall_time_s=wall_time_s))


def _resolve_tasks(cfg: EvalConfig) -> list[int]:
    from vla.sim.libero_env import get_init_states, num_tasks

    base_suite(cfg.suite)  # a clear error for an unknown suite, before anything is built
    n = num_tasks(cfg.suite)
    task_ids = sorted(set(cfg.tasks)) if cfg.tasks else list(range(n))
    bad = [t for t in task_ids if not 0 <= t < n]
    if bad:
        raise ValueError(f"task indices {bad} are out of range for {cfg.suite} ({n} tasks: 0..{n - 1})")
    for t in task_ids:
        n_init = len(get_init_states(cfg.suite, t))
        if cfg.init_states == "official" and cfg.episodes_per_task > n_init:
            raise ValueError(
                f"episodes_per_task={cfg.episodes_per_task} but {cfg.suite} task {t} has {n_init} fixed init states"
            )
    return task_ids


def summarize(records: Sequence[dict[str, Any]], task_ids: Sequence[int], suite: str) -> dict[str, Any]:
    """Per-task and suite success rates from episode records (the suite average weights every episode)."""
    from vla.sim.libero_env import get_task

    by_task: dict[int, list[dict[str, Any]]] = {t: [] for t in task_ids}
    for r in records:
        by_task.setdefault(r["task_id"], []).append(r)
    tasks = []
    for t, recs in sorted(by_task.items()):
        recs = sorted(recs, key=lambda r: r["episode"])
        task = get_task(suite, t)
        successes = sum(r["success"] for r in recs)
        tasks.append({
            "task_id": t, "name": task.name, "language": task_instruction(suite, t), "episodes": len(recs),
            "successes": successes, "success_rate": R.rate(successes, len(recs)),
            "errors": sum(r["error"] is not None for r in recs), "records": recs,
        })
    n = sum(t["episodes"] for t in tasks)
    successes = sum(t["successes"] for t in tasks)
    walls = [r["wall_time_s"] for r in records if r.get("wall_time_s")]
    queries = sum(r.get("policy_queries", 0) for r in records)
    times = {k: sum(r.get("time_s", {}).get(k, 0.0) for r in records) for k in ("reset", "sim", "render", "policy")}
    return {
        "episodes": n, "successes": successes, "success_rate": R.rate(successes, n),
        "errors": sum(t["errors"] for t in tasks), "mean_episode_wall_time_s": float(np.mean(walls)) if walls else 0.0,
        "time_share": {k: R.rate(v, sum(times.values())) for k, v in times.items()},
        "actions_per_query": R.rate(sum(r.get("steps", 0) for r in records), queries), "tasks": tasks,
    }


def write_libero_results(out: Path, run_info: dict[str, Any], records: list[dict[str, Any]],
                         *, wall_time_s: float) -> dict[str, Any]:
    """results.json, results.md and success_per_task.png from the run info and every finished record."""
    protocol = run_info["protocol"]
    summary = summarize(records, protocol["tasks"], protocol["suite"])
    expected = len(protocol["tasks"]) * protocol["episodes_per_task"]
    results = {
        **run_info, "complete": summary["episodes"] >= expected, "expected_episodes": expected,
        "last_session_wall_time_s": round(wall_time_s, 1), "summary": {k: v for k, v in summary.items() if k != "tasks"},
        "tasks": summary["tasks"],
    }
    R.write_json(out / R.RESULTS_JSON, results)
    (out / R.RESULTS_MD).write_text(libero_markdown(results))
    if summary["tasks"]:
        R.bar_chart(out / "success_per_task.png", [f"task {t['task_id']}" for t in summary["tasks"]],
                    [t["success_rate"] for t in summary["tasks"]],
                    title=f"{protocol['suite']}: {summary['success_rate']:.1%} average "
                          f"({summary['episodes']} episodes)")
    return results


def libero_markdown(results: dict[str, Any]) -> str:
    p, s = results["protocol"], results["summary"]
    lines = [
        f"# LIBERO {p['suite']}",
        "",
        R.headline(f"Suite average: {s['success_rate']:.1%}", results, f"{s['successes']}/{s['episodes']} episodes",
                   f"{s['episodes']}/{results['expected_episodes']} episodes"),
        "",
        *R.provenance_lines(results),
        (f"- {p['episodes_per_task']} episodes per task from the "
         f"{'fixed init states' if p['init_states'].startswith('benchmark') else 'validation resets (not official)'}"
         f", {p['max_steps']} policy steps "
         f"after {p['settle_steps']} settle steps, {p['reset']} resets, seed {p['seed']}, {p['image_size']} px cameras"),
        "- time share: " + ", ".join(f"{k} {v:.0%}" for k, v in s["time_share"].items())
        + f"; {s['mean_episode_wall_time_s']:.1f} s per episode; {s['actions_per_query']:.1f} actions executed per "
          "policy query",
        "",
    ]
    rows = [["**average**", "", f"**{s['success_rate']:.1%}**", s["episodes"], s["errors"]]]
    rows += [[t["task_id"], t["language"], f"{t['success_rate']:.1%}", t["episodes"], t["errors"]]
             for t in results["tasks"]]
    lines.append(R.markdown_table(["task", "instruction", "success", "episodes", "errors"], rows))
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="eval/libero.py",
        description="Evaluate a policy on LIBERO with the official protocol (fixed init states, official step "
                    "budgets, 10 settle steps). Writes results.json, results.md, a success plot and videos.",
        
    )
    parser.add_argument("--policy", required=False, default=None,
                        help=f"checkpoint directory (VLAPolicy.from_pretrained) or '{RANDOM_POLICY}' (required)")
    parser.add_argument("--suite", default=None,
                        help=f"suite(s), comma-separated (default from the checkpoint's config, else {d.suite}); "
                             "see --list-suites")
    parser.add_argument("--remote", default=None, metavar="ws://HOST:PORT",
                        help="evaluate the policy served there by any openpi-protocol server (vla-serve, openpi's "
                             "serve_policy.py) instead of --policy; an API key is read from $VLA_SERVE_API_KEY")
    parser.add_argument("--protocol", default="vla", choices=sorted(CLIENT_PROTOCOLS),
                        help="client conventions: vla (default) or openpi (256 px renders with multisampling, "
                             "resize-with-pad to 224, replan every 5, seed 7 once per task); recorded in results")
    parser.add_argument("--tasks", default="", help="task indices, e.g. 0,3,5 or 0-4 (default: all tasks)")
    parser.add_argument("--episodes", type=int, default=None,
                        help=f"episodes per task (official and default: {d.episodes_per_task})")
    parser.add_argument("--seed", type=int, default=None, help=f"evaluation seed (default {d.seed})")
    parser.add_argument("--workers", type=int, default=None, help=f"parallel simulator processes (default {d.num_workers})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="camera resolution (default: the checkpoint's eval.image_size, else 128; the policy "
                             "resizes to its own input size)")
    parser.add_argument("--replan-steps", type=int, default=None,
                        help="0 = the policy's own action queue (default); k = execute k actions of each predicted chunk")
    add_policy_set_argument(parser)
    parser.add_argument("--max-steps", type=int, default=None, help="policy steps per episode (default 0 = the suite's official budget)")
    parser.add_argument("--videos", type=int, default=None, help=f"videos of the first k episodes per task (default {d.videos_per_task})")
    parser.add_argument("--no-failure-videos", action="store_true", help="do not save videos of failed episodes")
    parser.add_argument("--init-states", default=None, choices=("official", "validation"),
                        help="official (default): the benchmark's fixed init states, what results report; "
                             "validation: fresh seeded resets disjoint from them, for tuning settings")
    parser.add_argument("--fast-reset", action="store_true",
                        help="soft env resets (~60x faster; not bit-identical to the official hard resets)")
    parser.add_argument("--video-stride", type=int, default=None, help=f"control steps per video frame (default {d.video_stride})")
    R.add_run_arguments(parser, "run directory (default: <checkpoint>/eval/<suite>); with several suites, one "
                                "sub-directory per suite")
    parser.add_argument("--list-suites", action="store_true", help="print the available suites and exit")
    return parser


def checkpoint_eval_defaults(policy: str | None) -> EvalConfig:
    """The eval section recorded in a checkpoint's config.json (defaults when absent).

    `policy` may be a training checkpoint (`<run>/last`, `<run>/step-N`) or its `pretrained_model/`. Cameras render
    at `eval.image_size` (the resolution the demonstrations were recorded at), never at `data.image_size`: the
    policy resizes every camera itself, exactly as it did in training.
    """
    if not policy or policy == RANDOM_POLICY:
        return EvalConfig()
    from vla.config import VLAConfig
    from vla.training.layout import CONFIG_NAME, resolve_pretrained

    try:
        path = resolve_pretrained(policy) / CONFIG_NAME
    except FileNotFoundError:
        return EvalConfig()
    if not path.is_file():
        return EvalConfig()
    try:
        return VLAConfig.from_json(path).eval
    except (ConfigError, ValueError, TypeError) as e:
        logger.warning("ignoring eval defaults of %s: %s", path, e)
        return EvalConfig()


def config_from_args(args: argparse.Namespace, base: EvalConfig) -> EvalConfig:
    def pick(value, default):
        return default if value is None else value

    from vla.sim.libero_env import parse_task_indices

    try:
        tasks = tuple(parse_task_indices(args.tasks)) if args.tasks else base.tasks
    except ValueError as e:
        raise ConfigError(f"--tasks: {e}") from None
    return dataclasses.replace(
        base,
        tasks=tasks,
        episodes_per_task=pick(args.episodes, base.episodes_per_task),
        seed=pick(args.seed, base.seed),
        num_workers=pick(args.workers, base.num_workers),
        image_size=pick(args.image_size, base.image_size),
        replan_steps=pick(args.replan_steps, base.replan_steps),
        max_steps=pick(args.max_steps, base.max_steps),
        videos_per_task=pick(args.videos, base.videos_per_task),
        failure_videos=base.failure_videos and not args.no_failure_videos,
        fast_reset=base.fast_reset or args.fast_reset,
        init_states=pick(args.init_states, base.init_states),
        video_stride=pick(args.video_stride, base.video_stride),
    ).validate()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`eval/libero.py`: parse options, evaluate each suite, print the summary table. Returns results by suite."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list_suites:
        for suite in available_suites():
            print(f"{suite}\t{suite_max_steps(suite)} steps")
        return {}
    if args.remote:
        check_remote_arguments(args, parser)
    elif not args.policy:
        parser.error("--policy is required (a checkpoint directory or 'random'), or --remote ws://HOST:PORT")
    elif args.policy != RANDOM_POLICY and not Path(args.policy).exists():
        parser.error(f"--policy {args.policy}: no such checkpoint directory")
    forced = client_protocol(args.protocol)
    for flag, value, want in (("--image-size", args.image_size, forced.image_size),
                              ("--replan-steps", args.replan_steps, forced.replan_steps),
                              ("--seed", args.seed, forced.seed)):
        if value is not None and want is not None and value != want:
            parser.error(f"--protocol {args.protocol} fixes {flag} {want}; drop {flag} {value}")
    base = checkpoint_eval_defaults(args.policy)
    suites = [s for s in (args.suite or base.suite).replace(" ", "").split(",") if s]
    try:
        for suite in suites:
            base_suite(suite)
        cfg = config_from_args(args, base)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    if args.out is None and args.policy == RANDOM_POLICY:
        parser.error("--out is required with --policy random (there is no checkpoint directory to write into)")
    if args.remote:
        source = connect_remote(args.remote, parser)
    else:
        source = policy_with_settings(args.policy, args.policy_set, parser.error)

    all_results = {}
    for suite in suites:
        if args.out is None:
            out = Path(args.policy) / "eval" / suite
        else:
            out = Path(args.out) / suite if len(suites) > 1 else Path(args.out)
        try:
            all_results[suite] = evaluate_libero(
                source, dataclasses.replace(cfg, suite=suite), out, resume=args.resume,
                overwrite=args.overwrite, progress=not args.no_progress, protocol=args.protocol,
            )
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        except KeyboardInterrupt:
            parser.exit(130, f"\ninterrupted: the finished episodes are in {out}; add --resume to complete the run\n")
        print((out / R.RESULTS_MD).read_text())
        print(f"results: {out}")
    if len(suites) > 1:
        rows = [[s, f"{r['summary']['success_rate']:.1%}", r["summary"]["episodes"]] for s, r in all_results.items()]
        mean = float(np.mean([r["summary"]["success_rate"] for r in all_results.values()]))
        print(R.markdown_table(["suite", "success", "episodes"], [["**average**", f"**{mean:.1%}**", ""], *rows]))
    return all_results

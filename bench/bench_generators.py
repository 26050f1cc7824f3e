"""Demonstration generators: what rendering only the recorded frames saves, measured side by side.

One scripted LIBERO-Object task-0 episode is recorded twice from the same seed (the same trajectory):
  - "every step": the env as LIBERO builds it by default: cameras rendered inside every `step`/`reset`
    (also during the settling steps) and a hard reset that rebuilds the model for every episode;
  - "on demand": the generator's env (`make_libero_env(render=False, hard_reset=False)`): physics-only steps,
    `render_cameras` once per recorded frame, in-place resets.
Also reported: the cost of one physics step, of rendering the two 128 px cameras, and of hard vs soft resets.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUITE, TASK, SEED = "libero_object", 0, 1234


def _expert_module():
    spec = importlib.util.spec_from_file_location("_bench_libero_expert", ROOT / "datasets" / "libero_expert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _episode(lx, env, image_size: int, on_demand: bool) -> tuple[float, int, bool]:
    """Record one expert episode; returns (seconds incl. reset, steps, success)."""
    from vla.sim import libero_env as L

    start = time.perf_counter()
    env.seed(SEED)
    raw = env.reset()
    for _ in range(lx.SETTLE_STEPS):
        raw, _, _, _ = env.step(np.r_[np.zeros(6), L.GRIPPER_OPEN])
    expert = lx.PickPlaceExpert(env.env, env.env.parsed_problem["goal_state"], np.random.default_rng(SEED))
    frames, success = [], False
    while len(frames) < 300:
        action = expert.act(raw)
        pixels = L.render_cameras(env) if on_demand else raw
        frames.append(L.libero_images(pixels, image_size=image_size))
        raw, _, _, _ = env.step(action)
        if expert.released and env.env._check_success():
            success = True
            break
    return time.perf_counter() - start, len(frames), success


def _mean_time(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def run(quick: bool) -> list[dict]:
    os.environ.setdefault("MUJOCO_GL", "egl")
    from vla.sim import libero_env as L

    lx = _expert_module()
    size, n = 128, (5 if quick else 20)
    noop = np.r_[np.zeros(6), L.GRIPPER_OPEN]
    # one env alive at a time: robosuite frees a renderer without making its GL context current, so tearing
    # down one env (a hard reset, a close) would corrupt the renderer of another env in the same process
    env, _ = L.make_libero_env(SUITE, TASK, image_size=size, render=True, hard_reset=True)
    try:
        t_default, steps_a, ok_a = _episode(lx, env, size, on_demand=False)
        step_render_ms = 1000 * _mean_time(lambda: env.step(noop), n)
        hard_reset_s = _mean_time(env.reset, 1 if quick else 3)
    finally:
        env.close()
    env, _ = L.make_libero_env(SUITE, TASK, image_size=size, render=False, hard_reset=False)
    try:
        t_demand, steps_b, ok_b = _episode(lx, env, size, on_demand=True)
        step_ms = 1000 * _mean_time(lambda: env.step(noop), n)
        render_ms = 1000 * _mean_time(lambda: L.render_cameras(env), n)
        soft_reset_s = _mean_time(env.reset, 3)
    finally:
        env.close()
    same = steps_a == steps_b and ok_a == ok_b
    return [
        {
            "benchmark": "LIBERO demo recording",
            "metric": "episode time, render every step / render recorded frames only",
            "value": round(t_default / t_demand, 2),
            "goal": "> 1 (same trajectory)",
            "met": t_default > t_demand and same,
            "figures": {
                "every_step_s": round(t_default, 2), "on_demand_s": round(t_demand, 2), "steps": steps_b,
                "success": ok_b, "same_trajectory": same,
            },
            "notes": "one scripted libero_object task-0 episode, 2 cameras at 128 px, incl. reset and 10 settle steps",
        },
        {
            "benchmark": "LIBERO step cost",
            "metric": "render 2 cameras / physics step",
            "value": round(render_ms / step_ms, 2),
            "goal": "-",
            "met": None,
            "figures": {
                "physics_step_ms": round(step_ms, 1), "render_2cams_ms": round(render_ms, 1),
                "step_rendering_every_step_ms": round(step_render_ms, 1),
                "soft_reset_s": round(soft_reset_s, 3), "hard_reset_s": round(hard_reset_s, 2),
            },
            "notes": "MSAA off (offsamples=0); Mesa software rendering via EGL",
        },
    ]


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        print(result)

"""Simulator evaluation benchmarks: LIBERO throughput with 1 vs 2 worker processes, and where the time goes.

1. Throughput: the same LIBERO episodes (official protocol, hard resets, random policy that asks for an
   observation every 5 steps like the tiny-cpu preset) evaluated with 1 and with 2 worker processes, side by side.
   Steps/s counts every env step (settle steps included) over the wall time of the whole evaluation, env builds
   and resets included: what a user waits for.
2. Time split: an untrained `tiny-cpu` VLAPolicy (real network, real inference cost; its actions are arbitrary)
   evaluated in-process; the share of episode time spent in resets, physics, rendering and the policy. When the
   policy cannot be built the benchmark fails: it never times a stand-in under the policy's name.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from bench_policy import tiny_cpu_policy

from vla.config import EvalConfig
from vla.sim.libero import SETTLE_STEPS, evaluate_libero
from vla.sim.policies import RandomPolicy


def _run(policy, cfg: EvalConfig, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    results = evaluate_libero(policy, cfg, out, progress=False)
    return results, time.perf_counter() - start


def _records(results: dict) -> list[dict]:
    return [r for t in results["tasks"] for r in t["records"]]


def _steps(results: dict) -> int:
    return sum(r["steps"] + SETTLE_STEPS for r in _records(results))


def _rollout_span(results: dict) -> float:
    """Seconds from the first episode's start to the last episode's end: the wall time of the episodes
    themselves (env builds and resets included), without starting processes and importing libraries."""
    records = _records(results)
    return max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)


def run(quick: bool) -> list[dict]:
    episodes, max_steps = (4, 20) if quick else (8, 100)
    base = EvalConfig(suite="libero_object", tasks=(0,), episodes_per_task=episodes, max_steps=max_steps,
                      videos_per_task=0, failure_videos=False)
    out: list[dict] = []
    # the time split measures this policy: built first, so a policy that does not build fails the benchmark
    # at once (never replaced by a stand-in whose cost would be reported as the policy's)
    policy = tiny_cpu_policy()
    c = policy.config
    note = (f"untrained tiny-cpu VLAPolicy (flow matching, {c.objective.num_inference_steps} denoising steps, "
            f"chunk {c.action.chunk_size}, executes {c.action.n_action_steps})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        throughput = {}
        for workers in (1, 2):
            cfg = dataclasses.replace(base, num_workers=workers)
            results, wall = _run(RandomPolicy(7, chunk=5), cfg, tmp / f"w{workers}")
            steps = _steps(results)
            throughput[workers] = {"rollout": steps / _rollout_span(results), "end_to_end": steps / wall,
                                   "wall": wall, "share": results["summary"]["time_share"]}
        ratio = throughput[2]["rollout"] / throughput[1]["rollout"]
        out.append({
            "benchmark": "LIBERO eval throughput",
            "metric": "env steps/s, 2 workers / 1 worker",
            "value": round(ratio, 2),
            "goal": ">= 1.5 on 2 free cores",
            "met": ratio >= 1.5,
            "figures": {
                "steps_per_s_1_worker": round(throughput[1]["rollout"], 2),
                "steps_per_s_2_workers": round(throughput[2]["rollout"], 2),
                "end_to_end_steps_per_s_1_worker": round(throughput[1]["end_to_end"], 2),
                "end_to_end_steps_per_s_2_workers": round(throughput[2]["end_to_end"], 2),
                "wall_s_1_worker": round(throughput[1]["wall"], 1), "wall_s_2_workers": round(throughput[2]["wall"], 1),
                **{f"share_{k}": round(v, 3) for k, v in throughput[1]["share"].items()},
                "load_average_1min": round(os.getloadavg()[0], 1),
            },
            "notes": f"libero_object task 0, {episodes} episodes x ({max_steps} + {SETTLE_STEPS}) steps, hard resets, "
                     "random policy queried every 5 steps (2 cameras x 128 px rendered then); steps/s from the first "
                     "episode start to the last episode end (env builds and resets included, process start-up not)",
        })

        cfg = dataclasses.replace(base, episodes_per_task=1 if quick else 2)
        results, wall = _run(policy, cfg, tmp / "split")
        records = _records(results)
        share = results["summary"]["time_share"]
        queries = sum(r["policy_queries"] for r in records)
        policy_s = sum(r["time_s"]["policy"] for r in records)
        render_s = sum(r["time_s"]["render"] for r in records)
        sim_s = sum(r["time_s"]["sim"] for r in records)
        steps = _steps(results)
        out.append({
            "benchmark": "LIBERO eval time split",
            "metric": "policy share of episode time",
            "value": round(share["policy"], 3),
            "goal": "",
            "met": None,
            "figures": {
                **{f"share_{k}": round(v, 3) for k, v in share.items()},
                "policy_ms_per_query": round(1000 * policy_s / max(1, queries), 1),
                "render_ms_per_query": round(1000 * render_s / max(1, queries), 1),
                "physics_ms_per_step": round(1000 * sim_s / max(1, steps), 1),
                "errors": results["summary"]["errors"],
                "load_average_1min": round(os.getloadavg()[0], 1),
            },
            "notes": f"{note}; {len(records)} episode(s) x {max_steps} steps, hard resets, 1 worker",
        })
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))

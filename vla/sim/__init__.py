"""Simulator evaluations with the official protocols, and the simulator adapters they use.

    libero_env.py   LIBERO envs and the simulator -> policy observation mapping (shared with the data generators)
    libero.py       the official LIBERO protocol: `evaluate_libero(policy, EvalConfig, out_dir)`, eval/libero.py
    calvin.py       the official CALVIN long-horizon protocol: `evaluate_calvin(...)`, eval/calvin.py
    robosuite_env.py  the robosuite robots, envs, cameras and state (shared with datasets/robosuite_expert.py)
    robosuite.py    per-robot success from seeded fresh resets: `evaluate_robosuite(...)`, eval/robosuite.py
    policies.py     the policy interface an evaluation drives, policy sources, a random reference policy
    runner.py       episodes in parallel worker processes, each with its own env and policy; crash-tolerant
    results.py      results.json / results.md / plots / videos and the crash-safe episode log behind --resume

Importing this package loads no simulator: the `evaluate_*` functions are imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_calvin", "evaluate_libero", "evaluate_robosuite"]


def __getattr__(name: str) -> Any:
    if name == "evaluate_libero":
        from vla.sim.libero import evaluate_libero

        return evaluate_libero
    if name == "evaluate_calvin":
        from vla.sim.calvin import evaluate_calvin

        return evaluate_calvin
    if name == "evaluate_robosuite":
        from vla.sim.robosuite import evaluate_robosuite

        return evaluate_robosuite
    raise AttributeError(f"module 'vla.sim' has no attribute {name!r}")

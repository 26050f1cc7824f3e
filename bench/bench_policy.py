"""Policy inference rate: `tiny-cpu` chunks per second on this CPU (2 cameras x 128 px, batch 1).

One `predict_action_chunk` call is the whole query a simulator or robot makes: raw uint8 images and state in,
pre-processing (resize, normalisation), the compact backbone, the preset's flow-matching steps of the head, and
un-normalised actions out. Measured with the expert cache on (the default at inference) and off (the general
routed path), in alternating blocks of back-to-back calls, and split into its stages so the budget is visible. The
policy is untrained: speed does not depend on the weights.

    .venv/bin/python bench/run.py --only policy [--quick]
"""

from __future__ import annotations

import numpy as np
import torch
from bench_action import THREADS, interleaved_ms

from vla.config import get_preset
from vla.constants import ACTION_MASK, OBS_STATE, STATE_MASK
from vla.data.normalize import Normalizer
from vla.data.transforms import prepare_observation
from vla.policy import VLAPolicy

GOAL_CHUNKS_PER_S = 20.0
FEW_FLOW_STEPS = 3
"""The head's share of a query grows with its flow steps; the same weights are also timed with this many
(`--policy-set objective.num_inference_steps=3` at evaluation). On the trained tiny-cpu arm of bench_learning,
LIBERO-Object task 0 success was 84 % with the preset's 5 steps, 80 % with 4 and 80 % with 3."""
BLOCK = 5
"""Back-to-back calls per turn: a rate is measured on consecutive queries, as a control loop makes them (a call
right after a different function starts from caches that hold that function's data)."""


def timing(repeats: int) -> str:
    """The timing method, named beside each rate (bench_learning times single queries after a reset instead)."""
    return (f"timing: back-to-back predict_action_chunk calls of an untrained policy, medians of {repeats} calls in "
            f"alternating blocks of {BLOCK}")


def tiny_cpu_policy(image_size: int = 128, flow_steps: int | None = None) -> VLAPolicy:
    """An untrained tiny-cpu VLAPolicy with normalization statistics for the LIBERO Panda, sampling with the
    preset's flow steps or `flow_steps`."""
    rng = np.random.default_rng(0)
    normalizer = Normalizer.from_arrays({"libero_panda": {"state": [rng.normal(size=(256, 8))],
                                                          "action": [rng.uniform(-1, 1, size=(256, 7))]}})
    cfg = get_preset("tiny-cpu")
    cfg.data.image_size = image_size
    if flow_steps is not None:
        cfg.objective.num_inference_steps = flow_steps
    return VLAPolicy(cfg, normalizer=normalizer).eval()


def libero_observation(image_size: int = 128) -> dict:
    """One raw LIBERO-shaped observation: two uint8 cameras, the 8-dim Panda state and an instruction."""
    rng = np.random.default_rng(0)
    return {
        "observation.images.base": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation.images.wrist": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation.state": rng.normal(size=8).astype(np.float32),
        "task": "pick up the alphabet soup and place it in the basket",
        "embodiment": "libero_panda",
    }


def predict_uncached(policy: VLAPolicy, obs: dict) -> torch.Tensor:
    """`predict_action_chunk` through the general routed path (expert cache switched off for this call)."""
    policy.head.cfg.expert_cache = False
    try:
        return policy.predict_action_chunk(obs)
    finally:
        policy.head.cfg.expert_cache = True


def stage_ms(size: int, repeats: int) -> tuple[dict[str, float], VLAPolicy]:
    """Median ms of a whole query (cached and uncached) and of each stage, for one image size."""
    policy, obs = tiny_cpu_policy(size), libero_observation(size)
    few_steps = tiny_cpu_policy(size, flow_steps=FEW_FLOW_STEPS)
    few_steps.load_state_dict(policy.state_dict())  # the same weights, fewer steps

    def prepare():
        return prepare_observation(obs, registry=policy.registry, normalizer=policy.normalizer,
                                   data_cfg=policy.config.data, default_embodiment="libero_panda")

    with torch.inference_mode():
        batch, _ = prepare()
        prefix = policy.encode(batch)
        head_args = (prefix, batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK])
        ms = interleaved_ms({
            "cached": lambda: policy.predict_action_chunk(obs),
            "cached_few_steps": lambda: few_steps.predict_action_chunk(obs),
            "uncached": lambda: predict_uncached(policy, obs),
            "prepare": prepare,
            "backbone": lambda: policy.encode(batch),
            "head_cached": lambda: policy.head.sample(*head_args),
            "head_uncached": lambda: policy.head.sample(*head_args, use_expert_cache=False),
        }, repeats=max(1, repeats // BLOCK), warmup=2, block=BLOCK)
    return ms, policy


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(THREADS)
    repeats = 5 if quick else 30
    results = []
    for size in (128,) if quick else (128, 96):
        ms, policy = stage_ms(size, repeats)
        rate = 1e3 / ms["cached"]
        results.append({
            "benchmark": f"tiny-cpu chunk rate @ 2 x {size}px",
            "metric": "chunks/s, batch 1, expert cache on",
            "value": round(rate, 1),
            "goal": f">= {GOAL_CHUNKS_PER_S:g}" if size == 128 else "",
            "met": rate >= GOAL_CHUNKS_PER_S if size == 128 else None,
            "figures": {"uncached_chunks_per_s": round(1e3 / ms["uncached"], 1),
                        **{f"{k}_ms": round(v, 2) for k, v in ms.items()}},
            "notes": f"{THREADS} torch thread(s); {policy.config.objective.num_inference_steps} flow steps, chunk "
                     f"{policy.config.action.chunk_size}; {timing(repeats)}",
        })
        if size == 128:
            few = 1e3 / ms["cached_few_steps"]
            results.append({
                "benchmark": f"tiny-cpu chunk rate @ 2 x {size}px, {FEW_FLOW_STEPS} flow steps",
                "metric": "chunks/s, batch 1, expert cache on",
                "value": round(few, 1),
                "goal": f">= {GOAL_CHUNKS_PER_S:g}",
                "met": few >= GOAL_CHUNKS_PER_S,
                "figures": {"cached_ms": round(ms["cached_few_steps"], 2),
                            "speedup_vs_preset_steps": round(ms["cached"] / ms["cached_few_steps"], 2)},
                "notes": f"the same weights sampled with {FEW_FLOW_STEPS} instead of "
                         f"{policy.config.objective.num_inference_steps} flow steps, timed in the same blocks (the success "
                         "cost of fewer steps: README)",
            })
    return results

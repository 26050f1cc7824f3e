#!/usr/bin/env python
"""Expert merging and compression after training (vla.tools.merge_experts): what K experts per layer cost and keep.

For every trained MoE checkpoint present (the `tiny-cpu`, `tiny-cpu-2400`, `himoe`, `mode`, `panda+ur5e`,
`himoe-ref` and `mode-ref` arms of bench/bench_learning.py in `checkpoints/bench-learning/<arm>/last`; arms not
trained yet are skipped and named; `VLA_MERGE_ARMS=tiny-cpu-2400,himoe-ref` measures only those), and
for K in {1, 2, E/2} (per routed kind, capped at its E): MC-SMoE merging (aligned, frequency-weighted), the same with
low-rank + sparse compression, and naive uniform averaging of the same groups. Reported per variant against the
unmerged model, all on the same calibration / held-out observations of the arm's own training mixture:

- parameters of the whole policy and of the expert banks (memory in MiB at the stored dtype; with compression the
  loaded model's factored banks: low-rank factors, sparse columns' values and their indices);
- inference ms per chunk (batch 1, expert cache on, median of repeats, this process's threads);
- held-out flow loss (fixed noise and times) with its standard error over batches, and the mean squared deviation
  of the predicted chunk from the unmerged model's (same noise).
- LIBERO success of the variants `VLA_MERGE_LIBERO` names (default: K=1, 2 and E/2 with MC-SMoE, K=E/2 with
  compression, K=1 and 2 uniform; ~7 minutes of simulation each), against the arm's own in-process evaluation with the
  same protocol (read from its results.json): the merged checkpoint is saved to
  `checkpoints/bench-learning/<arm>/merged/<variant>/` and evaluated there (resumable), with the standard error of
  each rate and of its difference from the unmerged one. `VLA_MERGE_LIBERO=none` skips the simulator.

`--quick` trains its own small policy instead (the `debug` preset, layers as,hb,nm,d, for 300 steps on a generated
two-embodiment dataset in `bench/_work/merge_quick/`, ~3 minutes here) and measures K in {1, 2} on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_learning import display, parse_arm_list  # noqa: E402 - what every bench shares

from vla.constants import ACTION_MASK, OBS_STATE, STATE_MASK  # noqa: E402
from vla.policy import VLAPolicy, resolve_checkpoint  # noqa: E402
from vla.tools.calibration import collect_routing, mixture_batches, routed_layers  # noqa: E402
from vla.tools.merge_experts import merge_policy  # noqa: E402

ARMS = ("tiny-cpu", "tiny-cpu-2400", "himoe", "mode", "panda+ur5e", "himoe-ref", "mode-ref")
ARMS_ENV = "VLA_MERGE_ARMS"
"""Comma-separated arms to measure (default: all of ARMS); the rows of the others are kept by bench/run.py."""
LIBERO_ENV = "VLA_MERGE_LIBERO"
LIBERO_VARIANTS = ("K=1 mcsmoe", "K=1 uniform", "K=2 mcsmoe", "K=2 uniform", "K=E/2 mcsmoe",
                   "K=E/2 mcsmoe + rank 64")
"""Variants evaluated in LIBERO by default (`VLA_MERGE_LIBERO`, comma-separated; `none`: no simulation)."""
QUICK_STEPS = 300
EMBODIMENTS = {"libero_panda": ({"agentview": "base", "wrist": "wrist"}, 8, 7),
               "robosuite_ur5e_osc": ({"frontview": "base", "robot0_eye_in_hand": "wrist"}, 8, 4)}

logger = logging.getLogger(__name__)


# ---- the quick policy --------------------------------------------------------------------------------------------


def write_dataset(root: Path, embodiment: str, episodes: int, length: int, seed: int) -> Path:
    """A small learnable LeRobot image dataset: actions a fixed function of the state, image brightness following
    the first state entry."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    cameras, state_dim, action_dim = EMBODIMENTS[embodiment]
    features = {f"observation.images.{c}": {"dtype": "image", "shape": (32, 32, 3),
                                            "names": ["height", "width", "channels"]} for c in cameras}
    features["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    ds = LeRobotDataset.create(root.name, fps=20, features=features, root=root, robot_type=embodiment,
                               use_videos=False)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(state_dim, action_dim)) / np.sqrt(state_dim)
    for ep in range(episodes):
        for _ in range(length):
            state = rng.normal(size=state_dim).astype(np.float32)
            level = int(128 + 100 * np.tanh(state[0]))
            frame = {f"observation.images.{c}": np.full((32, 32, 3), level, np.uint8) for c in cameras}
            frame.update({"observation.state": state, "action": np.tanh(state @ w).astype(np.float32),
                          "task": ("pick up the bowl", "open the drawer")[ep % 2]})
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root


def quick_policy(work: Path) -> tuple[Path, str]:
    """Train (once) the debug preset on a generated Panda + UR5e mixture; returns (checkpoint, mixture)."""
    mixture = work / "mixture.yaml"
    run = work / "debug"
    if (run / "last").exists():
        return resolve_checkpoint(run / "last"), str(mixture)
    entries = []
    for i, name in enumerate(EMBODIMENTS):
        root = work / "data" / name
        if not (root / "meta" / "info.json").exists():
            write_dataset(root, name, episodes=8, length=40, seed=i)
        cams = ", ".join(f"{k}: {v}" for k, v in EMBODIMENTS[name][0].items())
        entries.append(f"  - dataset: {root}\n    embodiment: {name}\n    cameras: {{{cams}}}\n")
    mixture.write_text("datasets:\n" + "".join(entries))
    cmd = [sys.executable, "train.py", "--preset", "debug", "--data.mixture", str(mixture), "--data.image_size", "32",
           "--train.steps", str(QUICK_STEPS), "--train.warmup_steps", "20", "--train.lr", "1e-3",
           "--train.save_every", str(QUICK_STEPS), "--train.log_every", "50", "--data.batch_size", "8",
           "--train.output_dir", str(work), "--train.run_name", "debug"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    logger.info("$ %s", " ".join(cmd))
    log = work / "train.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"training the quick policy failed (exit {code}); see {log}")
    return resolve_checkpoint(run / "last"), str(mixture)


# ---- measurements ------------------------------------------------------------------------------------------------


def expert_params(policy: VLAPolicy) -> tuple[int, int]:
    """(numbers, bytes) every routed layer's expert bank holds: its parameters and buffers (a factored bank's column
    indices), not the dense `w_in`/`w_out` a factored bank reconstructs on access."""
    tensors = [t for ffn in routed_layers(policy).values() for t in (*ffn.experts.parameters(), *ffn.experts.buffers())]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def ms_per_chunk(batch: dict, *policies: VLAPolicy, repeats: int) -> list[float]:
    """Median ms of one chunk (encode + sampling) of each policy for the first sample of `batch`, expert cache on.

    The policies are timed in turns, one chunk each per round, so that a slow spell of a shared machine falls on
    all of them alike: timed one after the other, two merges of the same shape once read 31 and 21 ms here."""
    one = {k: v[:1] for k, v in batch.items()}
    noises = [torch.zeros(1, p.config.action.chunk_size, p.config.data.unified_action_dim) for p in policies]
    times: list[list[float]] = [[] for _ in policies]
    for _ in range(repeats + 1):
        for policy, noise, spent in zip(policies, noises, times, strict=True):
            start = time.perf_counter()
            prefix = policy.encode(one)
            policy.head.sample(prefix, one[OBS_STATE], one[STATE_MASK], one[ACTION_MASK], noise=noise)
            spent.append(1e3 * (time.perf_counter() - start))
    return [statistics.median(spent[1:]) for spent in times]  # the first call builds the expert cache


@torch.no_grad()
def held_out(policy: VLAPolicy, batches: list[dict], reference: list[torch.Tensor] | None
             ) -> tuple[float, float, list[torch.Tensor], float]:
    """(mean flow loss, its standard error, predicted chunks, mean squared deviation from `reference`)."""
    losses, chunks, devs = [], [], []
    for i, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(i)
        b, h, a = batch[OBS_STATE].shape[0], policy.config.action.chunk_size, policy.config.data.unified_action_dim
        noise, t = torch.randn(b, h, a, generator=gen), torch.rand(b, generator=gen).clamp(0.001, 1.0)
        losses.append(float(policy({**batch, "noise": noise, "time": t})["action_loss"]))
        prefix = policy.encode(batch)
        chunks.append(policy.head.sample(prefix, batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK],
                                         noise=noise).actions)
        if reference is not None:
            devs.append(float((chunks[-1] - reference[i]).pow(2).mean()))
    se = statistics.stdev(losses) / len(losses) ** 0.5 if len(losses) > 1 else 0.0
    return statistics.fmean(losses), se, chunks, statistics.fmean(devs) if devs else 0.0


def group_counts(policy: VLAPolicy, quick: bool) -> list[tuple[str, dict[str, int]]]:
    """(label, kind -> K) for K in {1, 2, E/2}, each capped at the kind's E; duplicates dropped."""
    experts = {ffn.kind: ffn.router.num_experts for ffn in routed_layers(policy).values()}
    out, seen = [], set()
    for label in ("1", "2") if quick else ("1", "2", "E/2"):
        groups = {k: max(1, e // 2) if label == "E/2" else min(int(label), e) for k, e in experts.items()}
        key = tuple(sorted(groups.items()))
        if key not in seen:
            seen.add(key)
            out.append((f"K={label}", groups))
    return out


def libero_variants() -> set[str]:
    text = os.environ.get(LIBERO_ENV, ",".join(LIBERO_VARIANTS))
    return set() if text.strip().lower() == "none" else {v.strip() for v in text.split(",") if v.strip()}


def success_se(successes: int, episodes: int) -> float:
    p = successes / episodes
    return (p * (1 - p) / episodes) ** 0.5


def libero_success(policy: VLAPolicy, out: Path, protocol: dict, source_sha256: str | None) -> dict:
    """Save `policy` to `out` (once) and evaluate it with `protocol` (an arm's in-process one) into `out/eval`.

    `out/source.json` records the hash of the checkpoint the variant was merged from: a variant of an older training
    of the arm is deleted and merged and evaluated again instead of being reported beside the new one."""
    source = out / "source.json"
    if out.exists() and (not source.is_file() or json.loads(source.read_text()).get("sha256") != source_sha256):
        logger.info("%s was merged from another checkpoint: merging and evaluating it again", out)
        shutil.rmtree(out)
    if not (out / "config.json").is_file():
        policy.save_pretrained(out)
        source.write_text(json.dumps({"sha256": source_sha256}))
    eval_dir = out / "eval"
    results = eval_dir / "results.json"
    if not (results.is_file() and json.loads(results.read_text()).get("complete")):
        cmd = [sys.executable, "eval/libero.py", "--policy", str(out), "--suite", protocol["suite"], "--tasks",
               ",".join(map(str, protocol["tasks"])), "--episodes", str(protocol["episodes_per_task"]),
               "--image-size", str(protocol["image_size"]), "--replan-steps", str(protocol["replan_steps"]),
               "--seed", str(protocol["seed"]), "--workers", "2", "--videos", "0", "--no-progress",
               "--out", str(eval_dir), *(["--resume"] if (eval_dir / "run.json").exists() else [])]
        logger.info("$ %s", " ".join(cmd))
        with (out / "eval.log").open("a") as f:
            code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"LIBERO evaluation of {out} failed (exit {code}); see {out / 'eval.log'}")
    return json.loads(results.read_text())["summary"]


def measure_checkpoint(name: str, ckpt: Path, data: str, quick: bool, arm_dir: Path | None = None) -> list[dict]:
    policy = VLAPolicy.from_pretrained(ckpt)
    batch_size, n_calib, n_eval, repeats = (8, 64, 4, 5) if quick else (16, 256, 8, 10)
    stream = mixture_batches(policy, data, batch_size)
    calib = [next(stream) for _ in range(n_calib // batch_size)]
    evaluation = [next(stream) for _ in range(n_eval)]
    calibration = collect_routing(policy, calib, n_calib)
    base_params = sum(p.numel() for p in policy.parameters())
    base_experts, base_bytes = expert_params(policy)
    (base_ms,) = ms_per_chunk(evaluation[0], policy, repeats=repeats)
    base_loss, base_se, reference, _ = held_out(policy, evaluation, None)
    rank = 8 if quick else 64
    local = None  # the arm's in-process LIBERO evaluation, the reference of the merged variants' success
    libero = set() if quick or arm_dir is None else libero_variants()
    if libero and (arm_dir / "eval" / "results.json").is_file():
        local = json.loads((arm_dir / "eval" / "results.json").read_text())
        local = local if local.get("complete") else None
    rows = [{"benchmark": f"expert merging ({name})", "metric": "unmerged", "value": 1.0, "goal": "", "met": None,
             "figures": {"params": base_params, "expert_params": base_experts, "expert_MiB": base_bytes / 2**20,
                         "ms_per_chunk": base_ms, "heldout_loss": base_loss, "heldout_loss_se": base_se},
             "notes": f"{display(ckpt)}; calibration {n_calib} and held-out {n_eval * batch_size} observations of "
                      f"{display(data)}"}]
    for label, groups in group_counts(policy, quick):
        for method, compress in (("mcsmoe", False), ("mcsmoe", True), ("uniform", False)):
            merged, _ = merge_policy(policy, calibration, groups, method=method, rank=rank if compress else None,
                                     sparse_fraction=0.05, checkpoint_dir=ckpt)
            experts, nbytes = expert_params(merged)  # with compression: the factored banks the model holds
            loss, se, _, dev = held_out(merged, evaluation, reference)
            merged_ms, unmerged_ms = ms_per_chunk(evaluation[0], merged, policy, repeats=repeats)
            variant = f"{label} {method}" + (f" + rank {rank}" if compress else "")
            rows.append({
                "benchmark": f"expert merging ({name})", "metric": f"{variant}: expert memory vs unmerged",
                "value": nbytes / base_bytes, "goal": "", "met": None,
                "figures": {"groups": ",".join(f"{k}={v}" for k, v in groups.items()),
                            "params": sum(p.numel() for p in merged.parameters()), "expert_params": experts,
                            "expert_MiB": nbytes / 2**20, "ms_per_chunk": merged_ms,
                            "ms_per_chunk_unmerged": unmerged_ms, "heldout_loss": loss, "heldout_loss_se": se,
                            "heldout_loss_unmerged": base_loss, "chunk_msd_vs_unmerged": dev},
                "notes": "compressed: the loaded model's factored expert banks (factors, sparse values, indices)"
                if compress else "",
            })
            logger.info("%s %s: %s", name, variant, json.dumps(rows[-1]["figures"]))
            if local is not None and variant in libero:
                slug = variant.replace("K=E/2", "Khalf").replace("=", "").replace(" + ", "-").replace(" ", "-")
                rows.append(libero_row(name, variant, libero_success(merged, arm_dir / "merged" / slug,
                                                                     local["protocol"], local["policy"].get("sha256")),
                                         local["summary"]))
    return rows


def libero_row(name: str, variant: str, merged: dict, unmerged: dict) -> dict:
    se_m = success_se(merged["successes"], merged["episodes"])
    se_u = success_se(unmerged["successes"], unmerged["episodes"])
    diff = merged["success_rate"] - unmerged["success_rate"]
    return {"benchmark": f"expert merging ({name})", "metric": f"{variant}: LIBERO success",
            "value": round(merged["success_rate"], 3), "goal": "", "met": None,
            "figures": {"successes": merged["successes"], "episodes": merged["episodes"], "se": round(se_m, 3),
                        "unmerged_success": round(unmerged["success_rate"], 3), "difference": round(diff, 3),
                        "se_difference": round((se_m ** 2 + se_u ** 2) ** 0.5, 3),
                        "actions_per_query": round(merged.get("actions_per_query", 0.0), 2)},
            "notes": "the merged checkpoint evaluated with the protocol of the arm's in-process evaluation "
                     "(its results.json)"}


def run(quick: bool) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    if quick:
        work = HERE / "_work" / "merge_quick"
        work.mkdir(parents=True, exist_ok=True)
        ckpt, data = quick_policy(work)
        return measure_checkpoint("debug, quick", ckpt, data, quick=True)
    rows, missing = [], []
    for arm in chosen_arms():
        last = REPO / "checkpoints" / "bench-learning" / arm / "last"
        if not last.exists():
            missing.append(arm)
            continue
        ckpt = resolve_checkpoint(last)
        data = VLAPolicy.from_pretrained(ckpt).config.data.mixture
        rows += measure_checkpoint(arm, ckpt, data, quick=False, arm_dir=last.parent)
    if missing:
        rows.append({"benchmark": "expert merging", "metric": "trained MoE checkpoints missing", "value": len(missing),
                     "goal": "0", "met": not missing, "figures": {},
                     "notes": f"not trained yet (run bench/bench_learning.py --arms ...): {', '.join(missing)}"})
    return rows


def chosen_arms() -> tuple[str, ...]:
    """The arms `VLA_MERGE_ARMS` names (all of ARMS when it is unset); an unknown name is an error."""
    text = os.environ.get(ARMS_ENV, "").strip()
    return tuple(parse_arm_list(text, list(ARMS), f"bench_merge ({ARMS_ENV})")) if text else ARMS


def partial() -> bool:
    """True when some arms are not measured (not chosen, or no checkpoint here: a fresh machine, arms not trained
    yet): bench/run.py then keeps those arms' rows from the run that measured them, each with its date."""
    return set(chosen_arms()) != set(ARMS) or any(
        not (REPO / "checkpoints" / "bench-learning" / arm / "last").exists() for arm in ARMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

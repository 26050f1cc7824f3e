#!/usr/bin/env python
"""Heterogeneous robots: pretrain one policy on five embodiments, fine-tune it on a sixth, read its routers.

The setting the MoE heads were designed for. The pretraining set is `datasets/mixtures/hetero_pretrain.yaml`: LIBERO's
Panda (OSC_POSE, 7-D, two cameras) on LIBERO-Object tasks 0-9, and four robosuite embodiments — UR5e (OSC_POSITION,
4-D), a single-camera Panda at 10 Hz (OSC_POSITION), an IIWA under joint-position control (8-D) and two Pandas
(bimanual OSC_POSE, 14-D) — written by the scripted experts of `datasets/`. The new robot, held out of pretraining,
is a Kinova Gen3 (OSC_POSE at 10 Hz; `hetero_new_robot.yaml`). Every arm is a unit of work that resumes from its own
checkpoints and episode logs, so a run stopped anywhere continues where it stopped:

    data               every dataset of both mixtures (and the new robot's 10-demonstration subset)   ~60 min
    pre-<head>         pretrain `tiny-cpu` with that head on the mixture, PRE_STEPS steps; evaluate on every
                       pretraining embodiment (LIBERO: tasks 0-9 x 5 official init states; robosuite: 50 seeded
                       episodes per robot, `eval/robosuite.py`); routing report of the MoE heads        ~80 min
    ft-<head>          fine-tune pre-<head> on the new robot with 10 and 25 demonstrations per task (and, for the
                       MoE heads, the same with `--train.freeze_routers true`), FT_STEPS steps each; 50 episodes
                       on the new robot each                                                            ~60 min
    scratch-<head>     the same head trained from scratch on the same demonstrations for the same steps  ~30 min
    seeds-<head>       the 10-demonstration fine-tune (routers free) and scratch run again at training seeds
                       REPEAT_SEEDS: how far one training's success moves, and the difference over all seeds ~40 min
    as-study           why an `as` layer stays unspecialised: the tiny-cpu head pretrained STUDY_STEPS steps at each
                       AS-Reg weight of AS_REG_WEIGHTS, the separation of each `as` layer read by routing_report
                                                                                                        ~40 min

The heads (equal active FFN width, as in bench/bench_learning.py): `tiny-cpu` (the preset, as,nm,nm,nm,nm,as), `dense`
(d x 6), `himoe` (as,hb,hb,hb,hb,as) and `mode` (nm x 6). Rows: pooled and per-embodiment success of each pretrained
head with standard errors, final loss, steps/s and parameters; new-robot success of every fine-tune beside the
scratch arm of the same head, with the difference, its standard error and whether it is within noise; per routed
layer the specialisation (normalised mutual information between expert choice and embodiment / action space /
denoising step) and the usage heatmaps under `bench/hetero_routing/<head>/`.

    python bench/bench_hetero.py --arms data,pre-tiny-cpu          # printed as JSON rows
    VLA_HETERO_ARMS=data,pre-tiny-cpu python bench/run.py --only hetero   # into bench/results.md
    python bench/bench_hetero.py --quick                           # the whole pipeline at toy size (~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import bench_learning as BL  # noqa: E402 - the stage runner and run readers the learning bench uses

from vla.training.layout import read_last  # noqa: E402

PRETRAIN_MIXTURE = REPO / "datasets" / "mixtures" / "hetero_pretrain.yaml"
NEW_ROBOT_MIXTURE = REPO / "datasets" / "mixtures" / "hetero_new_robot.yaml"
REGISTRY = REPO / "datasets" / "embodiments.yaml"
NEW_ROBOT = "robosuite_kinova3_osc_pose"
PRE_STEPS = 3000
"""Pretraining steps (batch 32, ~0.9 s a step here: ~45 min) — fewer than the single-robot preset's 4800 so that
an arm, evaluation included, fits one sitting of this machine."""
FT_STEPS = 600
"""Fine-tuning (and from-scratch) steps on the new robot."""
STUDY_STEPS = 500
"""Pretraining steps of each as-study run. AS-Reg acts on the router alone, so its effect shows early: at the preset's
weight the 3000-step run's AS-Reg loss only went from 3.43 (log 31, routing blind to the descriptor at batch 32) to
3.23."""
AS_REG_WEIGHTS = (0.002, 0.1, 1.0)
"""AS-Reg weights of the as-study: HiMoE's (the tiny-cpu preset's until this study), and two that let AS-Reg dominate
the router's gradient (0.1 is the tiny-cpu preset's now)."""
DEMOS = (10, 25)
"""Demonstrations per task of the new robot in the two fine-tuning sizes."""
REPEAT_SEEDS = (1, 2)
"""Training seeds (`--train.seed`, `--data.seed`) of the seeds arms, beside the ft and scratch arms' seed 0."""
REPEAT_DEMOS = 10
"""Demonstrations per task of the seeds arms: the size where the heads' gains from pretraining differ most."""

GENERATORS: dict[str, tuple[str, ...]] = {
    "libero_object_tasks0-9": ("datasets/libero_expert.py", "--suite", "libero_object", "--tasks", "0-9",
                               "--episodes", "10"),
    "robosuite_ur5e_lift_stack": ("datasets/robosuite_expert.py", "--robot", "ur5e_osc_position", "--tasks",
                                  "lift,stack", "--episodes", "25"),
    "robosuite_panda_lift_stack": ("datasets/robosuite_expert.py", "--robot", "panda_osc_position", "--tasks",
                                   "lift,stack", "--episodes", "25"),
    "robosuite_iiwa_lift_stack": ("datasets/robosuite_expert.py", "--robot", "iiwa_joint_position", "--tasks",
                                  "lift,stack", "--episodes", "25"),
    "robosuite_bimanual_panda_two_arm_lift": ("datasets/robosuite_expert.py", "--robot", "panda_bimanual", "--tasks",
                                              "two_arm_lift", "--episodes", "50"),
    "robosuite_kinova3_lift_stack": ("datasets/robosuite_expert.py", "--robot", "kinova3_osc_pose", "--tasks",
                                     "lift,stack", "--episodes", "25"),
    "robosuite_kinova3_lift_stack_10": ("datasets/robosuite_expert.py", "--robot", "kinova3_osc_pose", "--tasks",
                                        "lift,stack", "--episodes", "10"),
}
"""Dataset directory -> the generator command that writes it (the commands of the mixture files' comments)."""
NEW_ROBOT_DATA = {10: "robosuite_kinova3_lift_stack_10", 25: "robosuite_kinova3_lift_stack"}

EVALS: dict[str, tuple[str, ...]] = {
    "libero_panda": ("eval/libero.py", "--suite", "libero_object", "--tasks", "0-9", "--episodes", "5"),
    "robosuite_ur5e_osc": ("eval/robosuite.py", "--robot", "ur5e_osc_position", "--episodes", "25"),
    "robosuite_panda_osc": ("eval/robosuite.py", "--robot", "panda_osc_position", "--episodes", "25"),
    "robosuite_iiwa_joint_pos": ("eval/robosuite.py", "--robot", "iiwa_joint_position", "--episodes", "25"),
    "robosuite_bimanual_panda_osc_pose": ("eval/robosuite.py", "--robot", "panda_bimanual", "--episodes", "50"),
    NEW_ROBOT: ("eval/robosuite.py", "--robot", "kinova3_osc_pose", "--episodes", "25"),
}
"""Embodiment -> its evaluation: 50 episodes each (LIBERO: 10 tasks x the first 5 official init states; robosuite:
25 seeded episodes per task, 50 for the one-task bimanual robot)."""
QUICK_EVALS = {"libero_panda": ("eval/libero.py", "--suite", "libero_object", "--tasks", "0", "--episodes", "1")}

HEADS: dict[str, tuple[str, ...]] = {name: BL.ARMS[name].overrides for name in ("tiny-cpu", "dense", "himoe", "mode")}
"""The heads compared, as `train.py` overrides of the tiny-cpu preset (the learning bench's arms)."""
ROUTED_HEADS = ("tiny-cpu", "himoe", "mode")


def arm_names() -> list[str]:
    return ["data", *(f"{kind}-{head}" for kind in ("pre", "ft", "scratch", "seeds") for head in HEADS), "as-study"]


@dataclass
class Plan:
    """Where the arms run and at what size."""

    work: Path
    data: Path
    figures: Path  # the routing heatmaps: bench/hetero_routing for the full run (committed)
    quick: bool = False
    pre_args: list[str] = field(default_factory=list)
    ft_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    workers: int = 2
    routing_samples: int = 256
    study_args: list[str] = field(default_factory=list)


def make_plan(quick: bool) -> Plan:
    if quick:
        work = HERE / "_work" / "hetero_quick"
        plan = Plan(work=work, data=work / "data", figures=work / "routing", quick=True, workers=1,
                    routing_samples=16)
        small = ["--train.warmup_steps", "2", "--train.log_every", "2", "--data.batch_size", "4",
                 "--data.num_workers", "0"]
        plan.pre_args = ["--train.steps", "8", "--train.save_every", "4", *small]
        plan.ft_args = ["--train.steps", "4", "--train.save_every", "2", *small]
        plan.study_args = plan.ft_args
        plan.eval_args = ["--episodes", "1", "--max-steps", "10", "--videos", "0"]
        return plan
    plan = Plan(work=REPO / "checkpoints" / "bench-hetero", data=REPO / "datasets" / "local",
                figures=HERE / "hetero_routing")
    plan.pre_args = ["--train.steps", str(PRE_STEPS), "--train.save_every", str(PRE_STEPS // 6)]
    plan.ft_args = ["--train.steps", str(FT_STEPS), "--train.save_every", str(FT_STEPS // 3),
                    "--train.warmup_steps", "50"]
    plan.study_args = ["--train.steps", str(STUDY_STEPS), "--train.save_every", str(STUDY_STEPS)]
    return plan


# ---- stages --------------------------------------------------------------------------------------------------------


def generator_command(name: str, quick: bool) -> list[str]:
    cmd = list(GENERATORS[name])
    if quick:  # one or two demonstrations per task, LIBERO tasks 0-1 only
        cmd[cmd.index("--episodes") + 1] = "2" if name == NEW_ROBOT_DATA[25] else "1"
        if "--suite" in cmd:
            cmd[cmd.index("--tasks") + 1] = "0-1"
    return cmd


def ensure_data(plan: Plan) -> None:
    """Write every dataset of both mixtures; the generators skip one that is already complete."""
    for name in GENERATORS:
        BL.stage([sys.executable, *generator_command(name, plan.quick), "--workers", str(plan.workers), "--out",
                  str(plan.data / name)], plan.work / "data.log")


def write_mixture(plan: Plan, source: Path, out: Path, rename: dict[str, str] | None = None) -> Path:
    """A copy of a mixture file whose datasets live in the plan's data directory (`rename`: dataset -> another)."""
    mixture = yaml.safe_load(source.read_text())
    for entry in mixture["datasets"]:
        name = Path(entry["dataset"]).name
        entry["dataset"] = str(plan.data / (rename or {}).get(name, name))
    mixture["embodiments_file"] = str(REGISTRY)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# written by bench/bench_hetero.py from {source.relative_to(REPO)}\n"
                   + yaml.safe_dump(mixture, sort_keys=False))
    return out


def new_robot_mixture(plan: Plan, demos: int) -> Path:
    return write_mixture(plan, NEW_ROBOT_MIXTURE, plan.work / f"new_robot_{demos}.yaml",
                         rename={NEW_ROBOT_DATA[25]: NEW_ROBOT_DATA[demos]})


def evaluate(plan: Plan, run_dir: Path, embodiment: str, again: str) -> Path:
    """Evaluate a run's last checkpoint on one embodiment into `<run>/eval-<embodiment>/`."""
    out = run_dir / f"eval-{embodiment}"
    cmd = list(QUICK_EVALS.get(embodiment, EVALS[embodiment]) if plan.quick else EVALS[embodiment])
    BL.stage([sys.executable, *cmd, "--policy", str(run_dir / BL.LAST), "--workers", str(plan.workers), "--out",
              str(out), again, *plan.eval_args], run_dir / "bench.log")
    return out


def train(plan: Plan, run: str, args: list[str]) -> tuple[Path, str]:
    """Train (resuming) one run; returns its directory and the evaluation flag (--resume unless it changed)."""
    run_dir = plan.work / run
    before = read_last(run_dir)
    BL.stage([sys.executable, "train.py", *args, "--train.run_name", run, "--train.output_dir", str(plan.work),
              "--train.resume", "true"], run_dir / "bench.log")
    return run_dir, "--resume" if read_last(run_dir) == before else "--overwrite"


def pretrain_mixture(plan: Plan) -> Path:
    """The pretraining mixture, pointed at the plan's datasets (written by the arms that train on it)."""
    return plan.work / "pretrain.yaml"


def pretrain(plan: Plan, head: str) -> Path:
    mixture = write_mixture(plan, PRETRAIN_MIXTURE, pretrain_mixture(plan))
    run_dir, again = train(plan, f"pre-{head}", ["--preset", "tiny-cpu", "--data.mixture", str(mixture),
                                                 *plan.pre_args, *HEADS[head]])
    for embodiment in pretrain_embodiments():
        evaluate(plan, run_dir, embodiment, again)
    if head in ROUTED_HEADS:
        routing_report(plan, run_dir, mixture, plan.figures / head)
    return run_dir


def routing_report(plan: Plan, run_dir: Path, mixture: Path, out: Path) -> None:
    BL.stage([sys.executable, "-m", "vla.tools.routing_report", "--policy", str(run_dir / BL.LAST), "--data",
              str(mixture), "--out", str(out), "--samples", str(plan.routing_samples)], run_dir / "bench.log")


def as_study_run(weight: float) -> str:
    return f"as-study-{weight:g}"


def as_study(plan: Plan) -> None:
    """Pretrain the tiny-cpu head briefly at each AS-Reg weight and read its routers (report under the run)."""
    mixture = write_mixture(plan, PRETRAIN_MIXTURE, pretrain_mixture(plan))
    for weight in AS_REG_WEIGHTS:
        run_dir, _ = train(plan, as_study_run(weight), ["--preset", "tiny-cpu", "--data.mixture", str(mixture),
                                                        *plan.study_args, "--action.as_reg_weight", str(weight)])
        routing_report(plan, run_dir, mixture, run_dir / "routing")


def fine_tunes(head: str) -> list[tuple[int, bool]]:
    """(demonstrations per task, routers frozen) of a head's fine-tuning runs."""
    return [(d, frozen) for d in DEMOS for frozen in ((False, True) if head in ROUTED_HEADS else (False,))]


def ft_run_name(head: str, demos: int, frozen: bool) -> str:
    return f"ft-{head}-{demos}" + ("-frozen" if frozen else "")


def pretrained(plan: Plan, head: str) -> Path:
    """The pre-<head> run that fine-tunes start from; an error naming the arm to run when it has no checkpoint."""
    pre = plan.work / f"pre-{head}"
    if read_last(pre) is None:
        raise RuntimeError(f"{pre} has no checkpoint: run the pre-{head} arm first")
    return pre


def scratch_run_name(head: str, demos: int) -> str:
    return f"scratch-{head}-{demos}"


def ft_args(plan: Plan, head: str, demos: int, frozen: bool) -> list[str]:
    """`train.py` arguments of a fine-tune of pre-<head> on the new robot's demonstrations."""
    pre = pretrained(plan, head)
    return ["--config", str(pre / "config.json"), "--train.init_from", str(pre / BL.LAST),
            "--data.mixture", str(new_robot_mixture(plan, demos)), "--train.freeze_routers", str(frozen).lower(),
            *plan.ft_args]


def scratch_args(plan: Plan, head: str, demos: int) -> list[str]:
    """`train.py` arguments of the same head trained from scratch on the same demonstrations for the same steps."""
    return ["--preset", "tiny-cpu", "--data.mixture", str(new_robot_mixture(plan, demos)), *plan.ft_args,
            *HEADS[head]]


def fine_tune(plan: Plan, head: str) -> None:
    for demos, frozen in fine_tunes(head):
        run_dir, again = train(plan, ft_run_name(head, demos, frozen), ft_args(plan, head, demos, frozen))
        evaluate(plan, run_dir, NEW_ROBOT, again)


def from_scratch(plan: Plan, head: str) -> None:
    for demos in DEMOS:
        run_dir, again = train(plan, scratch_run_name(head, demos), scratch_args(plan, head, demos))
        evaluate(plan, run_dir, NEW_ROBOT, again)


def seed_run_name(kind: str, head: str, seed: int) -> str:
    """The ft / scratch arm's 10-demonstration run at seed 0 (reused), that name + `-seed<s>` otherwise."""
    run = ft_run_name(head, REPEAT_DEMOS, False) if kind == "ft" else scratch_run_name(head, REPEAT_DEMOS)
    return run + (f"-seed{seed}" if seed else "")


def repeat_seeds(plan: Plan, head: str) -> None:
    """Fine-tune (routers free) and train from scratch at every seed of REPEAT_SEEDS, and at seed 0 if missing."""
    commands = {"ft": ft_args(plan, head, REPEAT_DEMOS, False), "scratch": scratch_args(plan, head, REPEAT_DEMOS)}
    for seed in (0, *REPEAT_SEEDS):
        for kind, args in commands.items():
            run_dir, again = train(plan, seed_run_name(kind, head, seed),
                                   [*args, "--train.seed", str(seed), "--data.seed", str(seed)])
            evaluate(plan, run_dir, NEW_ROBOT, again)


def pretrain_embodiments() -> list[str]:
    return [entry["embodiment"] for entry in yaml.safe_load(PRETRAIN_MIXTURE.read_text())["datasets"]]


# ---- reading finished arms -----------------------------------------------------------------------------------------


def success(eval_dir: Path) -> tuple[int, int]:
    """(successes, episodes) of a finished evaluation (LIBERO or robosuite results.json)."""
    summary = json.loads((eval_dir / "results.json").read_text())["summary"]
    return int(summary["successes"]), int(summary["episodes"])


def se(successes: int, episodes: int) -> float:
    p = successes / max(episodes, 1)
    return (p * (1 - p) / max(episodes, 1)) ** 0.5


def difference(a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float]:
    """Success rate of a minus that of b, each given as (successes, episodes), and its standard error."""
    return a[0] / a[1] - b[0] / b[1], (se(*a) ** 2 + se(*b) ** 2) ** 0.5


def final_loss(losses: list[tuple[int, float]]) -> float | None:
    """The mean of the last tenth of a run's logged losses (one logged value is too noisy to compare)."""
    tail = losses[-max(1, len(losses) // 10):]
    return round(sum(v for _, v in tail) / len(tail), 4) if tail else None


def training_figures(run_dir: Path) -> dict:
    """A run's losses, speed and size. `final_loss` is the objective trained (action loss plus each router loss times
    its weight), so it moves with the AS-Reg weight and the head; `final_action_loss` compares heads."""
    tb = BL.scalars(run_dir)
    losses = tb.get("loss/loss", [])
    rates = sorted(v for _, v in tb.get("perf/steps_per_s", []))
    total_m, active_m = BL.head_parameters(run_dir)
    return {"final_loss": final_loss(losses), "final_action_loss": final_loss(tb.get("loss/action_loss", [])),
            "steps": losses[-1][0] if losses else 0,
            "train_steps_per_s": round(rates[len(rates) // 2], 3) if rates else None,
            "params_M": round(total_m, 2), "active_params_M": round(active_m, 2)}


def separations(layers: list[dict], axes: tuple[str, ...] | None = None) -> dict[str, float]:
    """`layer<i>_<kind>_<axis>` -> separation, for the layers of a routing report (every axis unless `axes`)."""
    return {f"layer{e['layer']}_{e['kind']}_{axis.replace(' ', '_')}": round(v["separation"], 3)
            for e in layers for axis, v in e["specialisation"].items() if axes is None or axis in axes}


def pretrain_rows(plan: Plan, head: str) -> list[dict]:
    run_dir = plan.work / f"pre-{head}"
    figures, total = training_figures(run_dir), [0, 0]
    for embodiment in pretrain_embodiments():
        s, n = success(run_dir / f"eval-{embodiment}")
        figures[f"{embodiment}_success"] = round(s / n, 3)
        figures[f"{embodiment}_episodes"] = n
        total = [total[0] + s, total[1] + n]
    figures["pooled_se"] = round(se(*total), 3)
    action = json.loads((run_dir / "config.json").read_text())["action"]
    as_reg = f", AS-Reg weight {action['as_reg_weight']:g}" if "as" in action["layers"].split(",") else ""
    rows = [{"benchmark": f"hetero pretrain: {head}", "metric": f"pooled success, {len(pretrain_embodiments())} "
             "embodiments", "value": round(total[0] / total[1], 3), "goal": "", "met": None, "figures": figures,
             "notes": f"tiny-cpu preset with the {head} head on hetero_pretrain.yaml{as_reg}; per-embodiment success in the "
                      "figures (LIBERO: official init states; robosuite: seeded resets)"}]
    report = plan.figures / head / "report.json"
    if head in ROUTED_HEADS and report.is_file():
        layers = json.loads(report.read_text())["layers"]
        spec = separations(layers)
        by_embodiment = [e["specialisation"]["embodiment"]["separation"] for e in layers]
        rows.append({"benchmark": f"hetero routing: {head}", "metric": "separation of embodiments (MI / log2 "
                     "min(embodiments, experts)), mean over routed layers",
                     "value": round(sum(by_embodiment) / len(by_embodiment), 3),
                     "goal": "", "met": None, "figures": spec,
                     "notes": f"usage heatmaps and trees: {BL.display(report.parent)}/ (routing_report)"})
    return rows


def new_robot_rows(plan: Plan, head: str, kind: str) -> list[dict]:
    """Rows of a head's fine-tunes (`kind` ft) or from-scratch runs (scratch), each beside its scratch arm."""
    rows = []
    runs = ([(ft_run_name(head, d, f), d, f) for d, f in fine_tunes(head)] if kind == "ft"
            else [(scratch_run_name(head, d), d, False) for d in DEMOS])
    for run, demos, frozen in runs:
        s, n = success(plan.work / run / f"eval-{NEW_ROBOT}")
        figures = {"successes": s, "episodes": n, "se": round(se(s, n), 3)}
        scratch = plan.work / scratch_run_name(head, demos) / f"eval-{NEW_ROBOT}" / "results.json"
        if kind == "ft" and scratch.is_file():
            s0, n0 = success(scratch.parent)
            diff, se_diff = difference((s, n), (s0, n0))
            figures.update(scratch_success=round(s0 / n0, 3), difference=round(diff, 3),
                           se_difference=round(se_diff, 3), within_noise=abs(diff) <= 2 * se_diff)
        what = "fine-tuned from pre-" + head if kind == "ft" else "from scratch"
        rows.append({"benchmark": f"hetero new robot: {head}",
                     "metric": f"{what}, {demos} demos/task" + (", routers frozen" if frozen else ""),
                     "value": round(s / n, 3), "goal": "", "met": None, "figures": figures,
                     "notes": f"Kinova3 (held out of pretraining), {FT_STEPS if not plan.quick else 4} steps"})
    return rows


def seeds_rows(plan: Plan, head: str) -> list[dict]:
    """The fine-tune's gain over scratch across training seeds: pooled over every seed's episodes, and per seed.

    Two standard errors are given: the binomial one of the pooled episodes (evaluation noise only) and the spread
    of the per-seed differences over the square root of the number of seeds (training and evaluation noise, rough
    with three seeds). `within_noise` uses the larger.
    """
    seeds = (0, *REPEAT_SEEDS)
    counts = {kind: [success(plan.work / seed_run_name(kind, head, s) / f"eval-{NEW_ROBOT}") for s in seeds]
              for kind in ("ft", "scratch")}
    (ft, n_ft), (scratch, n_scratch) = pooled = [tuple(map(sum, zip(*counts[k], strict=True))) for k in ("ft", "scratch")]
    diff, se_pooled = difference(*pooled)
    per_seed = [difference(a, b)[0] for a, b in zip(counts["ft"], counts["scratch"], strict=True)]
    se_seeds = statistics.stdev(per_seed) / len(per_seed) ** 0.5
    figures = {"seeds": len(seeds), "ft_per_seed": [round(s / n, 3) for s, n in counts["ft"]],
               "scratch_per_seed": [round(s / n, 3) for s, n in counts["scratch"]],
               "ft_success": round(ft / n_ft, 3), "scratch_success": round(scratch / n_scratch, 3),
               "episodes_each": n_ft, "se_difference_episodes": round(se_pooled, 3),
               "se_difference_seeds": round(se_seeds, 3),
               "within_noise": abs(diff) <= 2 * max(se_pooled, se_seeds)}
    return [{"benchmark": f"hetero new robot seeds: {head}", "metric": f"fine-tuned from pre-{head} - from scratch, "
             f"{REPEAT_DEMOS} demos/task, {len(seeds)} training seeds pooled", "value": round(diff, 3), "goal": "",
             "met": None, "figures": figures,
             "notes": f"Kinova3 (held out of pretraining), {FT_STEPS if not plan.quick else 4} steps a run, 50 "
                      f"episodes a run; seeds {', '.join(map(str, seeds))} (`--train.seed`, `--data.seed`)"}]


def router_gradients(run_dir: Path, mixture: Path, batches: int = 4) -> dict[str, float]:
    """Per `as` layer of a run's last checkpoint: how much of its router's training signal AS-Reg is.

    The router of an `as` layer sees only the action-space descriptor, so two losses move it: the action loss
    (through the selected expert's mixing weight) and AS-Reg. Figures: `layer<i>_as_reg_over_action` = norm of
    the gradient of the weighted AS-Reg over that of the action loss on the router's weights, each averaged over
    `batches` training batches of the mixture (the gradient Adam follows; the per-batch noise averages out).
    """
    import itertools

    import torch

    from vla.policy import VLAPolicy
    from vla.tools.calibration import mixture_batches

    policy = VLAPolicy.from_pretrained(run_dir / BL.LAST).train()
    action = policy.config.action
    routers = {i: list(policy.head.transformer.blocks[i].ffn.router.parameters())
               for i, kind in enumerate(action.layer_kinds) if kind == "as"}
    layer_of = [i for i, ps in routers.items() for _ in ps]  # the layer of each entry of `params`
    params = [p for ps in routers.values() for p in ps]
    sums = {name: [torch.zeros_like(p) for p in params] for name in ("action", "as_reg")}
    for batch in itertools.islice(mixture_batches(policy, str(mixture), 32), batches):
        losses = policy(batch)
        for name, loss in (("action", losses["action_loss"]), ("as_reg", losses["as_reg"] * action.as_reg_weight)):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # one backward a loss
            sums[name] = [s if g is None else s + g for s, g in zip(sums[name], grads, strict=True)]

    def norm(name: str, layer: int) -> float:
        return float(torch.cat([g.flatten() for g, i in zip(sums[name], layer_of, strict=True) if i == layer]).norm())

    return {f"layer{i}_as_reg_over_action": round(norm("as_reg", i) / norm("action", i), 3) for i in routers}


def as_study_rows(plan: Plan) -> list[dict]:
    """One row per AS-Reg weight: the embodiment separation of the `as` layers, and what the run's loss did."""
    rows = []
    for weight in AS_REG_WEIGHTS:
        run_dir = plan.work / as_study_run(weight)
        layers = [e for e in json.loads((run_dir / "routing" / "report.json").read_text())["layers"]
                  if e["kind"] == "as"]
        separation = [e["specialisation"]["embodiment"]["separation"] for e in layers]
        figures = separations(layers, ("embodiment", "action space"))
        tb = BL.scalars(run_dir)
        losses, as_reg = tb.get("loss/action_loss", []), tb.get("loss/as_reg", [])
        steps = losses[-1][0] if losses else 0
        figures.update(final_action_loss=final_loss(losses), steps=steps)  # the total adds weight x AS-Reg
        if as_reg:
            figures.update(as_reg_first=round(as_reg[0][1], 3), as_reg_last=round(as_reg[-1][1], 3))
        figures.update(router_gradients(run_dir, pretrain_mixture(plan)))
        rows.append({"benchmark": "hetero as-router study: tiny-cpu", "metric": f"embodiment separation of the as "
                     f"layers (mean), AS-Reg weight {weight:g}", "value": round(sum(separation) / len(separation), 3),
                     "goal": "", "met": None, "figures": figures,
                     "notes": f"tiny-cpu head on hetero_pretrain.yaml, {steps} steps, "
                              f"--action.as_reg_weight {weight:g}; routing_report over "
                              f"{plan.routing_samples} samples, {run_dir.relative_to(plan.work)}/routing"})
    return rows


# ---- the arms --------------------------------------------------------------------------------------------------


def data_rows(plan: Plan) -> list[dict]:
    """One row per dataset: its scripted expert's success over the attempted episodes (`meta/generation.json`)."""
    rows = []
    for name in GENERATORS:
        meta = json.loads((plan.data / name / "meta" / "generation.json").read_text())
        attempts = sum(t["attempts"] for t in meta["tasks"])
        successes = sum(t["successes"] for t in meta["tasks"])
        rows.append({"benchmark": f"hetero data: {name}", "metric": "expert success over attempted episodes",
                     "value": round(successes / max(attempts, 1), 3), "goal": ">= 0.9",
                     "met": successes >= 0.9 * attempts,
                     "figures": {"episodes": meta["episodes"], "frames": meta["frames"], "attempts": attempts,
                                 "per_task": {t["task"]: f"{t['successes']}/{t['attempts']}" for t in meta["tasks"]},
                                 "wall_s": meta.get("wall_seconds")},
                     "notes": " ".join(generator_command(name, plan.quick))})
    return rows


def run_arm(plan: Plan, arm: str) -> list[dict]:
    if arm == "data":
        ensure_data(plan)
        return data_rows(plan)
    if arm == "as-study":
        as_study(plan)
        return as_study_rows(plan)
    kind, head = arm.split("-", 1)
    if kind == "pre":
        pretrain(plan, head)
        return pretrain_rows(plan, head)
    if kind == "seeds":
        repeat_seeds(plan, head)
        return seeds_rows(plan, head)
    if kind == "ft":
        fine_tune(plan, head)
    else:
        from_scratch(plan, head)
    return new_robot_rows(plan, head, kind)


def compare(plan: Plan, arms: list[str]) -> list[dict]:
    rows = []
    for arm in arms:
        try:
            rows += run_arm(plan, arm)
        except Exception as e:  # noqa: BLE001 - the other arms still run; bench/run.py fails the run on this row
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"hetero arm {arm} FAILED: {message}", file=sys.stderr, flush=True)
            rows.append({"benchmark": f"hetero: {arm}", "metric": "arm", "value": "error", "error": message,
                         "goal": "", "met": None, "figures": {}, "notes": ""})
    return rows


ARMS_ENV = "VLA_HETERO_ARMS"
DEFAULT_ARMS = "data,pre-tiny-cpu"
"""What `bench/run.py` runs unless `VLA_HETERO_ARMS` says otherwise: the other arms are hours each, run them by
name (every arm resumes)."""


def chosen_arms() -> list[str]:
    return parse_arms(os.environ.get(ARMS_ENV, DEFAULT_ARMS))


def parse_arms(text: str) -> list[str]:
    return BL.parse_arm_list(text, arm_names(), "bench_hetero")


def run(quick: bool) -> list[dict]:
    return compare(make_plan(quick), arm_names() if quick else chosen_arms())


def partial() -> bool:
    """Always: an arm's rows replace that arm's only, the others' recorded rows stay (bench/run.py)."""
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, in order (all: {','.join(arm_names())})")
    parser.add_argument("--quick", action="store_true", help="every arm at toy size in bench/_work/hetero_quick")
    args = parser.parse_args()
    plan = make_plan(args.quick)
    for row in compare(plan, arm_names() if args.quick and args.arms == DEFAULT_ARMS else parse_arms(args.arms)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

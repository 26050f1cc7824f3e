"""`make demo`: scripted LIBERO demonstrations -> train the tiny-cpu preset -> official LIBERO evaluation.

Each stage is the command a user would type (printed before it runs), and each skips work already done, so a
second `make demo` only prints the table again:

1. `datasets/libero_expert.py` drives LIBERO with a scripted expert from fresh resets and writes a LeRobot dataset
   (skipped when the dataset is complete);
2. `train.py --preset tiny-cpu` trains into `checkpoints/<run>/` (resumed when a partial run exists, skipped when
   it reached its last step);
3. `eval/libero.py` runs the official protocol (the benchmark's fixed init states) on the trained tasks, resuming
   an interrupted evaluation, and the success table is printed with the paths of the videos and the plot.

`python -m vla.demo --help` lists the knobs; `--quick` is a minutes-long smoke run of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vla.training.layout import LAST, read_last

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default: libero_object)")
    p.add_argument("--tasks", default="0", help="task indices to learn and evaluate, e.g. 0 or 0-4 (default: 0)")
    p.add_argument("--episodes", type=int, default=50, help="scripted demonstrations per task (default: 50)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per task (official: 50)")
    p.add_argument("--workers", type=int, default=2, help="parallel simulator processes (default: 2)")
    p.add_argument("--run", default="demo", help="run name under checkpoints/ (default: demo)")
    p.add_argument("--preset", default="tiny-cpu", help="training preset (default: tiny-cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 demos, 12 training steps at batch 4, 2 short evaluation episodes")
    p.add_argument("--workdir", type=Path, default=REPO,
                   help="where datasets/local/ and checkpoints/ go (default: the repository)")
    p.add_argument("overrides", nargs="*", help="extra training overrides, e.g. --train.lr=1e-4 (after --)")
    return p


def run_stage(title: str, cmd: list[str], *, cwd: Path) -> float:
    """Run one stage's command with inherited stdout (its own progress bars); return its wall time."""
    print(f"\n== {title}\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("MUJOCO_GL", "egl")
    result = subprocess.run(cmd, cwd=cwd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage '{title}' failed (exit {result.returncode}); fix the error above and re-run")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root, work = REPO, args.workdir.resolve()
    py = sys.executable
    tag = args.tasks.replace(",", "_")
    episodes, eval_episodes, steps = args.episodes, args.eval_episodes, args.steps
    extra_eval: list[str] = []
    if args.quick:
        episodes, eval_episodes, steps = 2, 2, 12
        extra_eval = ["--max-steps", "30", "--videos", "1"]
    dataset = work / "datasets" / "local" / f"{args.suite}_{tag}_{episodes}ep"
    run_dir = work / "checkpoints" / args.run
    mixture = run_dir / "mixture.yaml"
    timings: dict[str, float] = {}

    timings["demonstrations"] = run_stage(
        "1/3 scripted demonstrations",
        [py, "datasets/libero_expert.py", "--suite", args.suite, "--tasks", args.tasks, "--episodes", str(episodes),
         "--workers", str(args.workers), "--out", str(dataset)],
        cwd=root,
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    mixture.write_text(
        "# written by vla.demo: the demo's single dataset\n"
        f"- dataset: {dataset}\n  weight: 1.0\n  embodiment: libero_panda\n"
        "  cameras: {agentview: base, wrist: wrist}\n"
    )
    train_cmd = [py, "train.py", "--preset", args.preset, "--data.mixture", str(mixture),
                 "--train.run_name", args.run, "--train.output_dir", str(work / "checkpoints"),
                 "--train.resume", "true"]
    if steps is not None:
        train_cmd += ["--train.steps", str(steps), "--train.save_every", str(max(1, steps // 4))]
    if args.quick:
        train_cmd += ["--train.warmup_steps", "5", "--data.num_workers", "0", "--data.batch_size", "4",
                      "--train.log_every", "2"]
    before = read_last(run_dir)
    timings["training"] = run_stage("2/3 training", train_cmd + list(args.overrides), cwd=root)
    # a new checkpoint invalidates earlier evaluation results; an unchanged one lets an interrupted eval resume
    continue_flag = "--resume" if read_last(run_dir) == before else "--overwrite"

    eval_dir = run_dir / "eval" / args.suite
    timings["evaluation"] = run_stage(
        "3/3 LIBERO evaluation (official protocol)",
        [py, "eval/libero.py", "--policy", str(run_dir / LAST), "--suite", args.suite, "--tasks", args.tasks,
         "--episodes", str(eval_episodes), "--workers", str(args.workers), "--out", str(eval_dir), continue_flag,
         *extra_eval],
        cwd=root,
    )

    print(f"\nresults: {eval_dir / 'results.md'} (table), {eval_dir / 'results.json'}\n"
          f"plot:    {eval_dir / 'success_per_task.png'}\nvideos:  {eval_dir / 'videos'}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    (run_dir / "demo_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

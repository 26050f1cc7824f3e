"""Is data loading the training loop's bottleneck? tiny-cpu preset, two 128 px cameras, the real loop (`fit`).

Three measurements in one run, on the LIBERO-shaped dataset of bench_data (the generated LIBERO-Object demos when
present, otherwise the synthetic stand-in cached in bench/_work/):

1. loader alone: samples/s of this process's `make_dataloader` (2 workers, augmentation on), nothing else running;
2. the training loop on a batch held in memory: samples/s the loop consumes when data costs nothing;
3. the training loop fed by the real 2-worker loader: steps/s and the share of time spent waiting for batches.

The goal is (1) >= 2 x (2): a loader with that margin keeps up even while its workers share the CPU with training.
On this 2-core machine they do share it, which (3) shows directly (fed vs held steps/s, data-wait fraction).

    .venv/bin/python bench/run.py --only training [--quick]
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from vla.config import VLAConfig, get_preset
from vla.data.mixture import load_mixture, make_dataloader
from vla.training.loop import build, fit, make_accelerator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_data import GENERATED, synthetic_dataset  # the dataset is shared with the data benchmark

logger = logging.getLogger("bench_training")


class HeldBatchLoader:
    """Yields one batch over and over (an epoch of `length`), so a training loop runs with free data."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length, self.position = batch, length, 0

    def __iter__(self):
        for _ in range(self.length):
            self.position += 1
            yield self.batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def config(quick: bool, out: Path) -> VLAConfig:
    cfg = get_preset("tiny-cpu")
    generated = (GENERATED / "meta" / "info.json").is_file()
    cfg.data.mixture = str(GENERATED if generated else synthetic_dataset(400))
    cfg.data.embodiment = "libero_panda"
    cfg.data.num_workers = 2
    if quick:
        cfg.data.batch_size = 8
    steps = 4 if quick else 8
    cfg.train.steps, cfg.train.warmup_steps = steps, 1
    cfg.train.log_every = steps // 2  # the first interval pays for warm-up; the second is reported
    cfg.train.save_every = steps
    cfg.train.output_dir = str(out)
    return cfg.validate()


def loader_samples_per_s(cfg: VLAConfig, batches: int) -> float:
    mixture = load_mixture(cfg.data)
    mixture.validate()
    loader = make_dataloader(cfg, mixture, mixture.compute_stats())
    it = iter(loader)
    next(it)  # pays for starting the workers
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.data.batch_size / (time.perf_counter() - start)


def loop_figures(cfg: VLAConfig, run_name: str, held: bool) -> dict[str, float]:
    """Run `fit` and return the perf scalars it logged over its last log interval(s) (the first one warms up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg.train.run_name = run_name
    run_dir = Path(cfg.train.output_dir) / run_name
    accelerator = make_accelerator(cfg, run_dir)
    policy, loader = build(cfg, accelerator)
    if held:
        loader = HeldBatchLoader(next(iter(loader)), length=10**6)
    fit(cfg, accelerator, policy, loader, run_dir)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = {}
    for events in {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in ("perf/steps_per_s", "perf/samples_per_s", "perf/data_wait_fraction"):
            if tag in acc.Tags()["scalars"]:
                values = [e.value for e in acc.Scalars(tag)][1:]
                out[tag.split("/")[1]] = sum(values) / len(values)
    return out


def run(quick: bool) -> list[dict]:
    logging.getLogger("vla").setLevel(logging.WARNING)
    out = HERE / "_work" / "training_runs"
    shutil.rmtree(out, ignore_errors=True)
    cfg = config(quick, out)
    loader_sps = loader_samples_per_s(cfg, 3 if quick else 10)
    held = loop_figures(cfg, "held", held=True)
    fed = loop_figures(config(quick, out), "fed", held=False)
    shutil.rmtree(out, ignore_errors=True)
    ratio = loader_sps / held["samples_per_s"]
    note = (f"tiny-cpu, batch {cfg.data.batch_size}, 2 x {cfg.data.image_size} px cameras, 2 loader workers, "
            f"{cfg.train.steps} steps per loop run; loader and training share the same 2 cores")
    return [
        {
            "benchmark": "training", "metric": "loader samples/s / training-loop samples/s (held batch)",
            "value": round(ratio, 2), "goal": ">= 2", "met": bool(ratio >= 2),
            "figures": {"loader_samples_per_s": round(loader_sps, 1),
                        "loop_samples_per_s_held": round(held["samples_per_s"], 2)},
            "notes": note,
        },
        {
            "benchmark": "training", "metric": "training steps/s (real loader)",
            "value": round(fed["steps_per_s"], 3), "goal": "", "met": None,
            "figures": {"steps_per_s_held_batch": round(held["steps_per_s"], 3),
                        "fed_over_held": round(fed["steps_per_s"] / held["steps_per_s"], 3),
                        "data_wait_fraction": round(fed["data_wait_fraction"], 3),
                        "samples_per_s": round(fed["samples_per_s"], 2)},
            "notes": "fed_over_held ~ 1 and a small data_wait_fraction mean the loader is not the bottleneck",
        },
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

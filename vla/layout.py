"""Where a training run keeps its checkpoints, and how to find them: paths and names only, no torch.

Layout of a run (`output_dir/run_name/`):

    config.json                 the run's VLAConfig, written at start
    train.log                   the run's log lines (main process)
    tensorboard/                Accelerate's TensorBoard tracker
    step-000500/
        pretrained_model/       policy.save_pretrained(): config.json (the run's VLAConfig), weights (EMA weights
                                when EMA is on), normalization, embodiments; what eval and fine-tuning load
        training_state/         accelerator.save_state(): raw weights, optimizer, scheduler (+ grad scaler)
            trainer_state.json  step, world size, batch size, gradient accumulation
            ema.safetensors     EMA shadow weights (when EMA is on)
            rank_<r>.json       per process: RNG states (python, numpy, torch, cuda) and the data position
    last -> step-000500         symlink (or, where symlinks fail, a file naming the directory)

`vla.training.checkpoint` writes and restores checkpoints in this layout; everything that only needs to find
them (the policy's `from_pretrained`, evaluation, the demo, benchmarks) imports this module, which costs no torch or
accelerate import. It sits beside `vla.policy` rather than inside `vla.training` so that loading a policy never
imports the trainer (`vla.training.layout` re-exports it for the training code).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
LAST = "last"
CONFIG_NAME = "config.json"
PRETRAINED_DIR = "pretrained_model"
TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank}.json"


# ---- layout ------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `step-N` directory name, or None for anything else."""
    name = Path(path).name
    if not name.startswith(STEP_PREFIX):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None if it has none)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_last(run_dir: str | Path) -> Path | None:
    """Where `run_dir/last` points (symlink or pointer file), or None if it is missing or dangling."""
    last = Path(run_dir) / LAST
    if last.is_symlink() or last.is_dir():
        target = last.resolve()
    elif last.is_file():
        target = (Path(run_dir) / last.read_text().strip()).resolve()
    else:
        return None
    return target if target.is_dir() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run directory, its `last` entry, or a step directory itself."""
    p = Path(path)
    if p.name == LAST and p.is_file() and not p.is_symlink():
        target = read_last(p.parent)
        if target is None:
            raise FileNotFoundError(f"{p} names a checkpoint that does not exist")
        return target
    if (p / TRAINING_STATE_DIR).is_dir() or (p / PRETRAINED_DIR).is_dir():
        return p.resolve()
    if p.is_dir():
        newest = latest_checkpoint(p)
        if newest is not None:
            return newest
    raise FileNotFoundError(f"no checkpoint at {p}: expected a run directory, its '{LAST}', or a "
                            f"'{STEP_PREFIX}N' directory containing {PRETRAINED_DIR}/")


def resolve_pretrained(path: str | Path) -> Path:
    """The directory `VLAPolicy.from_pretrained` reads, from a run dir, `last`, a step dir, or that directory itself.

    Lets users pass `checkpoints/<run>/last` to evaluation and fine-tuning.
    """
    p = Path(path)
    if p.is_dir() and (p / CONFIG_NAME).is_file() and not (p / PRETRAINED_DIR).is_dir():
        return p
    return resolve_checkpoint(p) / PRETRAINED_DIR


def point_last_to(run_dir: Path, ckpt: Path) -> None:
    """Atomically repoint `run_dir/last` at ckpt: a relative symlink, or a one-line file where symlinks fail."""
    tmp = run_dir / f"{TMP_PREFIX}{LAST}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(ckpt.name, tmp, target_is_directory=True)
    except OSError:
        tmp.write_text(ckpt.name + "\n")
    last = run_dir / LAST
    if last.is_dir() and not last.is_symlink():
        raise FileExistsError(f"{last} is a real directory; refusing to replace it with a pointer")
    os.replace(tmp, last)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `last` points at)."""
    ckpts = list_checkpoints(run_dir)
    protected = read_last(run_dir)
    removed = []
    for p in ckpts[: max(len(ckpts) - keep, 0)]:
        if protected is not None and p.resolve() == protected:
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


def remove_partial(run_dir: Path) -> list[Path]:
    """Remove leftovers of interrupted saves (`.tmp-*`); they are never read."""
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return stale

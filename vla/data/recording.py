"""Recording scripted demonstrations into LeRobot v3 datasets, shared by the generators in `datasets/`.

A generator supplies an `EpisodeRunner` (builds its simulator lazily inside a worker process and turns
`(task_id, seed)` into one `Episode`) and the dataset features; `record_demonstrations` runs episodes in parallel
worker processes until every task has its successful episodes, keeps only the successful ones, and writes them
with LeRobot's own writer (`LeRobotDataset.create` -> `add_frame` (with "task") -> `save_episode` -> `finalize`).

Writing is crash-safe: the dataset is built in a hidden sibling directory and renamed into place only when it is
complete, with `meta/generation.json` recording what was asked for and how the expert did. A complete output that
matches the request is reused, so pipelines can call a generator unconditionally.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import queue
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vla.processes import exit_with_parent

logger = logging.getLogger(__name__)

MAX_ERRORS_BEFORE_SUCCESS = 3
"""Stop early when this many rollouts raised and none succeeded (a broken simulator install, not bad luck)."""

GENERATION_FILE = "meta/generation.json"
"""Written last into a finished dataset: the generator's request, per-task expert statistics and the disk size."""


# ---- command line ----------------------------------------------------------------------------------------------


def recording_parser(doc: str, *, max_steps: int) -> argparse.ArgumentParser:
    """An argument parser with the options every generator shares (episodes, image size, step limit, seed,
    workers, overwrite, progress); the generator adds its own task and output options. `doc` is the generator's
    module docstring: its first paragraph is the description, the rest the epilog."""
    description, _, epilog = doc.partition("\n\n")
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=50, help="successful episodes per task (default: 50)")
    p.add_argument("--image-size", type=int, default=128, help="square camera resolution (default: 128)")
    p.add_argument("--max-steps", type=int, default=max_steps,
                   help=f"step limit of one episode (default: {max_steps})")
    p.add_argument("--seed", type=int, default=0, help="base seed of initial states and expert noise (default: 0)")
    p.add_argument("--workers", type=int, default=2, help="parallel simulator processes, 0 = inline (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_recording_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a generator's command line, set up logging and reject out-of-range shared options before any
    simulator starts."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vla").setLevel(logging.INFO)
    if args.episodes < 1 or args.image_size < 16 or args.max_steps < 1 or args.workers < 0:
        parser.exit(2, "error: --episodes and --max-steps must be >= 1, --image-size >= 16 and --workers >= 0\n")
    return args


def record_from_args(args: argparse.Namespace, out: Path, **generator: Any) -> int:
    """`record_demonstrations` with the shared command-line options of `parse_recording_args`, then print what
    was written; returns the generator's exit code (1 when a task is missing episodes). `generator` holds the
    generator's own arguments: runner_factory, runner_kwargs, task_ids, features, fps, robot_type, request."""
    record = record_demonstrations(
        out, episodes_per_task=args.episodes, seed=args.seed, workers=args.workers, overwrite=args.overwrite,
        progress=not args.no_progress, **generator,
    )
    print(("reused " if record.get("reused") else "wrote ") + str(out))
    print(summary_lines(record))
    return 0 if not record.get("missing_episodes") else 1


# ---- image statistics ----------------------------------------------------------------------------------------


STATS_FILE = "meta/stats.json"
IMAGE_STATS_EXACT = "exact-uint8-histogram"
"""Marks (in `meta/generation.json`) a dataset whose image statistics this module computed; one without it was
written before, with lerobot's overflowed image statistics, and is repaired when it is reused."""


class ImageStats:
    """Exact per-channel statistics of the uint8 camera frames a dataset holds, from 256-bin histograms.

    lerobot 0.4.4 computes image statistics by squaring uint8 pixels before converting them to float, which
    overflows: its `meta/stats.json` then holds image std values near 0.001 where the true value is about 0.2, and
    any lerobot policy normalising with them scales images by hundreds. The histograms here count every pixel of
    every written frame, so mean, std, min, max and the quantiles are exact (in lerobot's units: [0, 1], shape
    (3, 1, 1)); `write` replaces the image entries of `meta/stats.json` with them.
    """

    def __init__(self) -> None:
        self.hist: dict[str, np.ndarray] = {}
        self.frames: dict[str, int] = {}

    def add(self, key: str, frames: np.ndarray) -> None:
        """frames: (T, H, W, 3) uint8, as the generators record them."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise TypeError(f"ImageStats: {key!r} frames must be (T, H, W, 3) uint8, got {frames.dtype} "
                            f"{tuple(frames.shape)}")
        hist = self.hist.setdefault(key, np.zeros((3, 256), dtype=np.int64))
        for c in range(3):
            hist[c] += np.bincount(frames[..., c].ravel(), minlength=256)
        self.frames[key] = self.frames.get(key, 0) + len(frames)

    def stats(self, key: str, quantiles: Sequence[str] = ("q01", "q10", "q50", "q90", "q99")) -> dict[str, Any]:
        """lerobot-style statistics of one camera: lists of shape (3, 1, 1) in [0, 1], count = frames."""
        hist = self.hist[key].astype(np.float64)
        values = np.arange(256, dtype=np.float64) / 255.0
        n = hist.sum(axis=1)
        mean = (hist * values).sum(axis=1) / n
        std = np.sqrt(np.maximum((hist * values**2).sum(axis=1) / n - mean**2, 0.0))
        nonzero = hist > 0
        lo = np.array([values[np.argmax(row)] for row in nonzero])
        hi = np.array([values[255 - np.argmax(row[::-1])] for row in nonzero])
        cdf = hist.cumsum(axis=1) / n[:, None]

        def shaped(v: np.ndarray) -> list:
            return v.reshape(3, 1, 1).tolist()

        out = {"min": shaped(lo), "max": shaped(hi), "mean": shaped(mean), "std": shaped(std),
               "count": [self.frames[key]]}
        for q in quantiles:
            level = int(q[1:]) / 100.0
            out[q] = shaped(np.array([values[np.searchsorted(row, level)] for row in cdf]))
        return out

    @classmethod
    def from_dataset(cls, root: str | Path) -> ImageStats:
        """Count every stored camera frame of a LeRobot image dataset at `root` (PNG frames are lossless, so the
        decoded [0, 1] floats are exactly the recorded uint8 values / 255)."""
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        root = Path(root)
        dataset = LeRobotDataset(repo_id=f"local/{root.name}", root=root)
        stats = cls()
        for key in dataset.meta.camera_keys:
            column = dataset.hf_dataset.select_columns([key])
            for start in range(0, len(column), 256):
                frames = np.stack([np.asarray(f) for f in column[start:start + 256][key]])  # (n, 3, H, W)
                stats.add(key, np.rint(frames.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8))
        return stats

    def write(self, root: str | Path) -> None:
        """Replace the image entries of `root/meta/stats.json` (keeping lerobot's quantile keys)."""
        path = Path(root) / STATS_FILE
        stats = json.loads(path.read_text()) if path.exists() else {}
        for key in self.hist:
            old = stats.get(key, {})
            quantiles = [q for q in old if q.startswith("q") and q[1:].isdigit()] or ["q01", "q10", "q50", "q90",
                                                                                      "q99"]
            stats[key] = self.stats(key, quantiles)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats, indent=4) + "\n")


# ---- features ----------------------------------------------------------------------------------------------------


def image_feature(image_size: int) -> dict[str, Any]:
    """A LeRobot `image` feature (stored as PNG inside the parquet files, not as video: no decoder needed)."""
    return {"dtype": "image", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}


def vector_feature(names: Sequence[str]) -> dict[str, Any]:
    """A float32 vector feature whose entries are named (the names document the units)."""
    return {"dtype": "float32", "shape": (len(names),), "names": list(names)}


def demo_features(
    cameras: Sequence[str], image_size: int, state_names: Sequence[str], action_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Features of a demonstration dataset: `observation.images.<camera>`, `observation.state`, `action`."""
    features = {f"observation.images.{camera}": image_feature(image_size) for camera in cameras}
    features["observation.state"] = vector_feature(state_names)
    features["action"] = vector_feature(action_names)
    return features


# ---- episodes and runners ----------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One scripted rollout.

    Attributes:
        task_id: the task's index in its suite / the generator's task list.
        seed: the seed of the initial state and the expert's noise (reproduces the rollout).
        success: the task's success predicate held at the end.
        steps: control steps taken.
        seconds: wall time of reset + rollout + rendering in the worker.
        task: the language instruction stored with every frame.
        frames: feature name -> (steps, ...) array, only for successful episodes (None otherwise).
        rejected: the initial state was unusable (e.g. an object fell over at reset) and no rollout was tried;
            counted apart from the expert's failures.
    """

    task_id: int
    seed: int
    success: bool
    steps: int
    seconds: float
    task: str
    frames: dict[str, np.ndarray] | None = None
    rejected: bool = False


class EpisodeRunner(Protocol):
    """Runs one episode of a task from a seed. Made inside each worker process, so it may own a simulator."""

    def __call__(self, task_id: int, seed: int) -> Episode: ...

    def close(self) -> None: ...


RunnerFactory = Callable[..., EpisodeRunner]
"""A picklable, module-level callable (e.g. the runner class) that builds a runner from keyword arguments."""


def episode_seed(base_seed: int, task_id: int, attempt: int) -> int:
    """Independent, reproducible seed of the `attempt`-th rollout of a task."""
    return int(np.random.SeedSequence([base_seed, task_id, attempt]).generate_state(1)[0])


# ---- statistics --------------------------------------------------------------------------------------------------


@dataclass
class TaskStats:
    """Expert statistics of one task: rollouts, successes, steps and seconds per rollout, rejected resets."""

    task_id: int
    task: str = ""
    attempts: int = 0
    successes: int = 0
    rejected: int = 0
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, episode: Episode) -> None:
        self.task = episode.task
        if episode.rejected:
            self.rejected += 1
            return
        self.attempts += 1
        self.successes += int(episode.success)
        self.steps.append(episode.steps)
        self.seconds.append(episode.seconds)

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.attempts, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "task": self.task,
            "attempts": self.attempts,
            "successes": self.successes,
            "success_rate": round(self.success_rate, 4),
            "rejected_resets": self.rejected,
            "steps_mean": round(float(np.mean(self.steps)), 1) if self.steps else 0.0,
            "steps_min": int(np.min(self.steps)) if self.steps else 0,
            "steps_max": int(np.max(self.steps)) if self.steps else 0,
            "seconds_per_episode": round(float(np.mean(self.seconds)), 2) if self.seconds else 0.0,
        }


def format_summary(tasks: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of per-task expert statistics (`TaskStats.summary()` dicts)."""
    rows = [f"{'task':>4}  {'success':>15}  {'steps (min-max)':>17}  {'s/episode':>9}  {'rejected':>8}  instruction"]
    for d in tasks:
        rows.append(
            f"{d['task_id']:>4}  {d['successes']:>4}/{d['attempts']:<4} {100 * d['success_rate']:5.1f}%"
            f"  {d['steps_mean']:6.1f} ({d['steps_min']:>3}-{d['steps_max']:<3})  {d['seconds_per_episode']:9.2f}"
            f"  {d.get('rejected_resets', 0):>8}  {d['task']}"
        )
    return "\n".join(rows)


# ---- output directory --------------------------------------------------------------------------------------------


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_generation(root: str | Path) -> dict[str, Any] | None:
    """The generation record of a finished dataset, or None if `root` holds no finished generator output."""
    path = Path(root) / GENERATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def existing_output(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished dataset at `out` made by the same request, None if there is nothing at `out`.

    Raises:
        FileExistsError: `out` exists but is not a finished dataset of this request (a different request, or
            a directory this module did not write); nothing is overwritten silently.
    """
    if not out.exists():
        return None
    record = read_generation(out)
    if record is None:
        raise FileExistsError(f"{out} exists but is not a finished generator output; remove it or pick --out")
    if record.get("request") != request:
        raise FileExistsError(
            f"{out} holds a dataset made with a different request:\n  on disk:   {record.get('request')}\n"
            f"  requested: {request}\nremove it, pass --overwrite, or pick another --out"
        )
    return record


# ---- parallel collection -----------------------------------------------------------------------------------------


def _run_job(runner: EpisodeRunner, task_id: int, seed: int) -> tuple[str, Any]:
    """("episode", Episode), or ("error", (task_id, seed, message)): a crashed rollout is a failed attempt."""
    try:
        return "episode", runner(task_id, seed)
    except Exception as exc:
        logger.exception("episode of task %d (seed %d) raised", task_id, seed)
        return "error", (task_id, seed, f"{type(exc).__name__}: {exc}")


def _worker_main(factory: RunnerFactory, factory_kwargs: dict, jobs, results) -> None:
    """Worker process: build the runner once, run jobs until the None sentinel, report each episode."""
    exit_with_parent()  # a killed recorder takes its simulators with it
    runner = factory(**factory_kwargs)
    try:
        while (job := jobs.get()) is not None:
            results.put(_run_job(runner, *job))
    finally:
        runner.close()


class _InlinePool:
    """`workers=0`: run episodes in this process (debugging, profiling)."""

    def __init__(self, factory: RunnerFactory, factory_kwargs: dict):
        self.runner = factory(**factory_kwargs)
        self.pending: deque = deque()

    def submit(self, task_id: int, seed: int) -> None:
        self.pending.append((task_id, seed))

    def next_result(self):
        return _run_job(self.runner, *self.pending.popleft())

    def close(self) -> None:
        self.runner.close()


class _ProcessPool:
    """Worker processes pulling `(task_id, seed)` jobs; spawned (not forked) so no GL context is inherited."""

    def __init__(self, factory: RunnerFactory, factory_kwargs: dict, workers: int):
        ctx = mp.get_context("spawn")
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker_main, args=(factory, factory_kwargs, self.jobs, self.results), daemon=True)
            for _ in range(workers)
        ]
        for p in self.procs:
            p.start()

    def submit(self, task_id: int, seed: int) -> None:
        self.jobs.put((task_id, seed))

    def next_result(self):
        while True:
            try:
                return self.results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    codes = [p.exitcode for p in dead]
                    raise RuntimeError(f"{len(dead)} demonstration worker(s) died (exit codes {codes})") from None

    def close(self) -> None:
        for _ in self.procs:
            self.jobs.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()


def record_demonstrations(
    out: str | Path,
    *,
    runner_factory: RunnerFactory,
    runner_kwargs: dict[str, Any],
    task_ids: Sequence[int],
    episodes_per_task: int,
    features: dict[str, dict[str, Any]],
    fps: int,
    robot_type: str,
    request: dict[str, Any],
    seed: int = 0,
    workers: int = 2,
    max_attempts_per_task: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect `episodes_per_task` successful scripted episodes of every task into a LeRobot dataset at `out`.

    Args:
        out: dataset root. Built in a hidden sibling directory, renamed here when complete.
        runner_factory, runner_kwargs: build one `EpisodeRunner` per worker.
        task_ids: tasks to record, in order.
        episodes_per_task: successful episodes wanted per task.
        features: LeRobot features (see `demo_features`); an episode's `frames` must hold exactly these keys.
        fps, robot_type: dataset metadata.
        request: the generator's arguments that define the dataset's content, stored in `meta/generation.json`;
            an existing output with an equal request is returned as is.
        seed: base seed; the k-th attempt of task t uses `episode_seed(seed, t, k)`.
        workers: parallel worker processes (0 = run in this process).
        max_attempts_per_task: stop trying a task after this many rollouts (default 2 * episodes + 10).
        overwrite: replace an existing output instead of reusing or refusing it.
        progress: show a tqdm bar of successful episodes.

    Returns:
        The generation record (also in `out/meta/generation.json`): request, per-task stats, totals, disk size,
        or the existing record when the output was reused (with "reused": True).
    """
    out = Path(out)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if not task_ids:
        raise ValueError("task_ids is empty: name at least one task")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    request = json.loads(json.dumps(request))  # compare as stored: tuples become lists
    if overwrite and out.is_symlink():
        out.unlink()
    elif overwrite and out.exists():
        shutil.rmtree(out)
    record = existing_output(out, request)
    if record is not None:
        logger.info("reusing the finished dataset at %s", out)
        if record.get("image_stats") != IMAGE_STATS_EXACT:  # written before the overflow fix: repair it once
            logger.info("recomputing the image statistics of %s from its frames", out)
            ImageStats.from_dataset(out).write(out)
            record["image_stats"] = IMAGE_STATS_EXACT
            (out / GENERATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return {**record, "reused": True}

    from datasets.utils import logging as datasets_logging
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # a crashed earlier run
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset = LeRobotDataset.create(
        repo_id=f"local/{out.name}", fps=fps, features=features, root=tmp, robot_type=robot_type,
        use_videos=False, image_writer_threads=2,
    )
    start = time.perf_counter()
    hf_bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one "Map" bar per saved episode would drown the demos bar
    try:
        image_stats = ImageStats()
        stats, wanted, errors = _collect(
            dataset, runner_factory, runner_kwargs, task_ids, episodes_per_task, features, seed, workers,
            max_attempts_per_task or 2 * episodes_per_task + 10, progress, out.name, image_stats,
        )
        written = sum(episodes_per_task - wanted[t] for t in task_ids)
        if written == 0:
            first_error = f"; first error: {errors[0]}" if errors else ""
            attempts = sum(s.attempts + s.rejected for s in stats.values())
            raise RuntimeError(f"no successful episode in {attempts} attempts; nothing written{first_error}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if hf_bars:
            datasets_logging.enable_progress_bar()
    if errors:
        logger.warning("%d rollouts raised; first: %s", len(errors), errors[0])
    record = {
        "request": request,
        "episodes": written,
        "frames": int(dataset.meta.total_frames),
        "missing_episodes": {str(t): n for t, n in wanted.items() if n > 0},
        "tasks": [stats[t].summary() for t in task_ids],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "workers": workers,
        "errors": errors[:10],
        "image_stats": IMAGE_STATS_EXACT,
    }
    image_stats.write(tmp)  # lerobot's own image statistics overflow (uint8 squared); replace them
    record["disk_bytes"] = dir_size_bytes(tmp)
    (tmp / GENERATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    return record


def _collect(
    dataset, runner_factory: RunnerFactory, runner_kwargs: dict[str, Any], task_ids: Sequence[int],
    episodes_per_task: int, features: dict[str, dict[str, Any]], seed: int, workers: int, max_attempts: int,
    progress: bool, name: str, image_stats: ImageStats | None = None,
) -> tuple[dict[int, TaskStats], dict[int, int], list[str]]:
    """Run rollouts until every task has its successful episodes (or its attempts run out), writing each kept
    episode into `dataset` as it arrives. Returns (per-task stats, episodes still missing per task, errors)."""
    from tqdm import tqdm

    stats = {t: TaskStats(t) for t in task_ids}
    attempts = {t: 0 for t in task_ids}
    wanted = {t: episodes_per_task for t in task_ids}
    errors: list[str] = []
    # Jobs are handed out one at a time (at most `workers` in flight), so retries of failed rollouts run before
    # new tasks start and a task never gets more rollouts than it needs.
    todo: deque[int] = deque(t for t in task_ids for _ in range(episodes_per_task))
    in_flight = 0
    pool = _InlinePool(runner_factory, runner_kwargs) if workers == 0 else _ProcessPool(
        runner_factory, runner_kwargs, workers
    )

    def submit_next() -> None:
        nonlocal in_flight
        while todo:
            t = todo.popleft()
            if attempts[t] < max_attempts:
                pool.submit(t, episode_seed(seed, t, attempts[t]))
                attempts[t] += 1
                in_flight += 1
                return
            logger.warning("task %d: giving up after %d attempts (%d successes)", t, attempts[t], stats[t].successes)

    bar = tqdm(total=episodes_per_task * len(task_ids), desc=f"demos -> {name}", unit="ep", disable=not progress)
    try:
        for _ in range(max(workers, 1)):
            submit_next()
        while in_flight:
            kind, payload = pool.next_result()
            in_flight -= 1
            if kind == "error":
                task_id, ep_seed, message = payload
                errors.append(f"task {task_id} seed {ep_seed}: {message}")
                stats[task_id].attempts += 1
                if len(errors) > MAX_ERRORS_BEFORE_SUCCESS and not any(s.successes for s in stats.values()):
                    raise RuntimeError(f"every rollout raised so far ({len(errors)}); first: {errors[0]}")
                todo.appendleft(task_id)
            else:
                episode: Episode = payload
                stats[episode.task_id].add(episode)
                if episode.success and wanted[episode.task_id] > 0:
                    _write_episode(dataset, episode, features, image_stats)
                    wanted[episode.task_id] -= 1
                    bar.update(1)
                elif not episode.success:
                    todo.appendleft(episode.task_id)
            tried = sum(s.attempts for s in stats.values())
            bar.set_postfix(success=f"{sum(s.successes for s in stats.values())}/{tried}")
            submit_next()
    finally:
        bar.close()
        pool.close()
        dataset.finalize()
    return stats, wanted, errors


def _write_episode(dataset, episode: Episode, features: dict[str, dict[str, Any]],
                   image_stats: ImageStats | None = None) -> None:
    """Append one successful episode to an open LeRobot dataset (images are PNG-encoded by writer threads) and
    count its pixels into `image_stats`."""
    frames = episode.frames
    if frames is None or set(frames) != set(features):
        got = None if frames is None else sorted(frames)
        raise KeyError(f"episode frames must hold exactly the features {sorted(features)}, got {got}")
    n = episode.steps
    for key, value in frames.items():
        if len(value) != n:
            raise ValueError(f"feature {key!r} has {len(value)} frames, the episode has {n} steps")
    for i in range(n):
        dataset.add_frame({**{key: value[i] for key, value in frames.items()}, "task": episode.task})
    dataset.save_episode()
    if image_stats is not None:
        for key, value in frames.items():
            if features[key]["dtype"] in ("image", "video"):
                image_stats.add(key, np.asarray(value))


def summary_lines(record: dict[str, Any]) -> str:
    """Human-readable summary of a generation record (per-task table, totals, disk size)."""
    total_attempts = sum(d["attempts"] for d in record["tasks"])
    total_success = sum(d["successes"] for d in record["tasks"])
    return (
        format_summary(record["tasks"])
        + f"\nexpert success {total_success}/{total_attempts} ({100 * total_success / max(total_attempts, 1):.1f}%), "
        f"{record['episodes']} episodes / {record['frames']} frames written, "
        f"{record['disk_bytes'] / 2**20:.1f} MiB on disk, {record['wall_seconds']:.0f} s wall"
    )

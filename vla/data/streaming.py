"""A weighted mixture of LeRobot v3 datasets read as streams: datasets larger than the local disk train too.

`vla.data.mixture` loads every dataset's columns into memory; this module reads the same datasets as
`datasets` streams of their parquet files (a local root, or `hf://datasets/<repo_id>/...` for a hub id), so only
the rows being read are ever held. What stays the same as the in-memory mixture:

- the mixture file, its weights, embodiments and camera mappings (`load_mixture`);
- the weighted choice of the dataset of every sample: `MixtureSampler`'s plan, so a 3:1 weight gives 3:1 samples;
- per-dataset statistics, merged per embodiment into one `Normalizer` (from each dataset's `meta/stats.json`:
  a stream is never read twice just for statistics; means and stds merge exactly, quantiles by frame-weighted
  average);
- the sample path: `Processor.frame` + `actions_to_model`, the batch keys of `vla.constants`.

What differs: frames arrive in file order, so an action chunk is taken from a rolling window of the next H rows,
samples are decorrelated by a shuffle buffer, and a rank (or DataLoader worker) reads the episodes whose index
falls to it (episode % shards == shard). Image cameras only: video cameras need frame-accurate seeking that a
parquet stream cannot give (lerobot's `StreamingLeRobotDataset` does it). A dataset in LeRobot v2.x format gets
the error naming lerobot's converter (`vla.data.lerobot_source.read_info`).

    stream = StreamingMixture(cfg, load_mixture(cfg.data), rank=r, world_size=w)
    normalizer = stream.normalizer                      # or Normalizer.load(checkpoint) when resuming
    loader = stream.loader(normalizer)                  # batches of cfg.data.batch_size, forever
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vla.config import VLAConfig
from vla.constants import ACTION, ACTION_IS_PAD, DATASET_ID
from vla.data.lerobot_source import (
    ACTION_KEY,
    IMAGE_PREFIX,
    STATE_KEY,
    DatasetInfo,
    Location,
    decode_rgb,
    fetch_hub_info,
    locate,
    read_info,
)
from vla.data.mixture import REPO_ROOT, Mixture, MixtureError
from vla.data.normalize import KEYS, STAT_NAMES, Normalizer
from vla.data.sampler import MixtureSampler
from vla.data.transforms import Processor, collate_frames

logger = logging.getLogger(__name__)

STATS_FILE = "meta/stats.json"
TASKS_FILE = "meta/tasks.parquet"


@dataclass
class StreamSpec:
    """One dataset of a streaming mixture: where its parquet files are and how its rows map to the policy."""

    name: str
    data_files: list[str]
    info: DatasetInfo
    embodiment: str
    cameras: dict[str, str]  # native -> canonical, the cameras this run uses
    tasks: dict[int, str]
    stats: dict[str, dict[str, np.ndarray]]  # "state" / "action" -> STAT_NAMES + count


class StreamingMixture(IterableDataset):
    """Endless stream of training batches from a mixture, reading each dataset sequentially.

    Args:
        cfg: the run's config (data.*, action.chunk_size).
        mixture: from `load_mixture`; local roots and hub ids (with HF_HUB_OFFLINE unset) both work.
        rank, world_size: this process's shard of the episodes.
        shuffle_buffer: samples held per dataset to decorrelate consecutive frames.
        train: augment images.
    """

    def __init__(self, cfg: VLAConfig, mixture: Mixture, *, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 64, train: bool = True) -> None:
        super().__init__()
        self.cfg, self.mixture = cfg, mixture
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.train = max(1, shuffle_buffer), train
        self.specs = resolve_streams(mixture)
        self.normalizer = merged_normalizer(self.specs, cfg.data.normalization)
        self._processor: Processor | None = None

    def loader(self, normalizer: Normalizer | None = None, num_workers: int | None = None) -> DataLoader:
        """A DataLoader of whole batches (the stream collates them itself)."""
        self._processor = Processor(self.cfg.data, self.mixture.registry, normalizer or self.normalizer)
        workers = self.cfg.data.num_workers if num_workers is None else num_workers
        return DataLoader(self, batch_size=None, num_workers=workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._processor is None:
            self._processor = Processor(self.cfg.data, self.mixture.registry, self.normalizer)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, shard = self.world_size * workers, self.rank * workers + worker
        bs = self.cfg.data.batch_size
        sampler = MixtureSampler([s.info.total_frames for s in self.specs], [e.weight for e in self.mixture.entries],
                                 bs, seed=self.cfg.data.seed, rank=shard, world_size=shards)
        streams = [self._samples(i, spec, shards, shard) for i, spec in enumerate(self.specs)]
        while True:
            for keys in sampler:
                frames = [next(streams[d]) for d, _, _ in keys]
                sampler.advance(1)
                yield collate_frames(frames)

    # ---- one dataset ----------------------------------------------------------------------------------------
    def _samples(self, dataset_id: int, spec: StreamSpec, shards: int, shard: int) -> Iterator[dict[str, Any]]:
        """Samples of one dataset, forever (a new pass per epoch), through a shuffle buffer."""
        rng = np.random.default_rng([self.cfg.data.seed, dataset_id, shard])
        buffer: list[dict[str, Any]] = []
        epoch = 0
        while True:
            produced = 0
            for sample in self._chunks(dataset_id, spec, shards, shard, epoch):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield sample
            if produced == 0 and not buffer:
                raise MixtureError(self.mixture.source, [f"{spec.name}: the stream has no episode for shard "
                                                         f"{shard} of {shards} (fewer episodes than processes?)"])
            epoch += 1  # the buffer carries over: the next pass starts while it still holds this one's tail

    def _rows(self, spec: StreamSpec) -> Iterator[dict[str, Any]]:
        import datasets

        columns = ["episode_index", "task_index", STATE_KEY, ACTION_KEY, *(IMAGE_PREFIX + n for n in spec.cameras)]
        ds = datasets.load_dataset("parquet", data_files=spec.data_files, split="train", streaming=True,
                                   columns=columns)
        for native in spec.cameras:
            ds = ds.cast_column(IMAGE_PREFIX + native, datasets.Image(decode=False))
        return iter(ds)

    def _chunks(self, dataset_id: int, spec: StreamSpec, shards: int, shard: int, epoch: int
                ) -> Iterator[dict[str, Any]]:
        """(frame t, actions t .. t+H-1) from a rolling window of rows; a chunk ends with its episode (padded)."""
        h = self.cfg.action.chunk_size
        window: deque[dict[str, Any]] = deque()
        seed_rng = np.random.default_rng([self.cfg.data.seed, dataset_id, shard, epoch])

        def emit() -> dict[str, Any]:
            first = window[0]
            actions = np.stack([np.asarray(r[ACTION_KEY], dtype=np.float32) for r in window])
            pad = np.arange(h) >= len(window)
            actions = actions[np.minimum(np.arange(h), len(window) - 1)]
            window.popleft()
            return self._sample(dataset_id, spec, first, actions, pad, int(seed_rng.integers(2**31 - 1)))

        episode = None
        for row in self._rows(spec):
            ep = int(row["episode_index"])
            if ep % shards != shard:
                continue
            if ep != episode:
                while window:  # the previous episode's last frames: padded chunks
                    yield emit()
                episode = ep
            window.append(row)
            if len(window) == h:
                yield emit()
        while window:
            yield emit()

    def _sample(self, dataset_id: int, spec: StreamSpec, row: dict[str, Any], actions: np.ndarray,
                pad: np.ndarray, seed: int) -> dict[str, Any]:
        images = {canon: _image(row[IMAGE_PREFIX + native], spec) for native, canon in spec.cameras.items()}
        proc = self._processor
        out = proc.frame(images, np.asarray(row[STATE_KEY], dtype=np.float32), spec.tasks[int(row["task_index"])],
                         spec.embodiment, train=self.train, seed=seed)
        out[ACTION] = proc.actions_to_model(torch.from_numpy(actions), spec.embodiment)
        out[ACTION_IS_PAD] = torch.from_numpy(pad)
        out[DATASET_ID] = torch.tensor(dataset_id, dtype=torch.long)
        return out


def _image(cell: Any, spec: StreamSpec) -> torch.Tensor:
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if data is None:
        raise MixtureError(spec.name, [f"an image cell holds no embedded bytes ({type(cell).__name__}); streaming "
                                       "needs images stored in the parquet files"])
    return decode_rgb(data)


# ---- resolving the datasets ------------------------------------------------------------------------------------


def resolve_streams(mixture: Mixture) -> list[StreamSpec]:
    """Metadata of every entry (info, tasks, statistics) and where its parquet files are; one MixtureError lists
    every problem (not found, v2.x format, video cameras, unknown embodiment, missing statistics)."""
    problems = list(mixture.format_problems)
    specs: list[StreamSpec] = []
    for i, entry in enumerate(mixture.entries):
        tag = f"[{i}] {entry.dataset}"
        loc = locate(entry.dataset, [REPO_ROOT, Path.cwd()])
        if loc.problem:
            problems.append(f"{tag}: {loc.problem}")
            continue
        meta_root = loc.root
        if meta_root is None:  # a hub id: fetch meta/ only, stream the data files
            meta_root, fetch_problems = fetch_hub_info(loc.repo_id)
            problems += [f"{tag}: {p}" for p in fetch_problems]
            if meta_root is None:
                continue
        info, info_problems = read_info(meta_root)
        problems += [f"{tag}: {p}" for p in info_problems]
        if info is None:
            continue
        spec, entry_problems = _spec(mixture, entry, loc, meta_root, info)
        problems += [f"{tag}: {p}" for p in entry_problems]
        if spec is not None:
            specs.append(spec)
    if not mixture.entries and not problems:
        problems.append("no datasets listed")
    if problems:
        raise MixtureError(mixture.source, problems)
    return specs


def _spec(mixture: Mixture, entry: Any, loc: Location, meta_root: Path, info: DatasetInfo
          ) -> tuple[StreamSpec | None, list[str]]:
    name, problems = mixture._embodiment(entry, info)
    if problems:
        return None, problems
    emb = mixture.registry.get(name)
    mapping = entry.cameras if entry.cameras is not None else emb.cameras
    used = {n: c for n, c in mapping.items() if c in mixture.data_cfg.cameras}
    problems += mixture._camera_problems(mapping, used, info, True)
    problems += mixture._feature_problems(info, emb)
    videos = [n for n in used if info.cameras.get(n) == "video"]
    if videos:
        problems.append(f"camera(s) {videos} are stored as video: streaming reads image datasets only (use the "
                        "in-memory mixture, or lerobot's StreamingLeRobotDataset)")
    stats_path = meta_root / STATS_FILE
    if not stats_path.is_file():
        problems.append(f"no {STATS_FILE}: streaming takes the normalization statistics from it")
    if problems:
        return None, problems
    if loc.root is not None:
        files = [str(p) for p in sorted((loc.root / "data").glob("*/*.parquet"))]
        if not files:
            return None, ["no parquet files under data/"]
    else:
        files = [f"hf://datasets/{loc.repo_id}/data/*/*.parquet"]
    raw = json.loads(stats_path.read_text())
    stats, stat_problems = _read_stats(raw, info.total_frames)
    if stat_problems:
        return None, stat_problems
    return StreamSpec(name=entry.dataset, data_files=files, info=info, embodiment=name, cameras=used,
                      tasks=_read_tasks(meta_root), stats=stats), []


def _read_stats(raw: dict[str, Any], frames: int) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, column in (("state", STATE_KEY), ("action", ACTION_KEY)):
        entry = raw.get(column, {})
        missing = [s for s in STAT_NAMES if s not in entry]
        if missing:
            problems.append(f"{STATS_FILE} has no {missing} for '{column}'")
            continue
        out[key] = {s: np.asarray(entry[s], dtype=np.float64).reshape(-1) for s in STAT_NAMES}
        out[key]["count"] = np.asarray(int(np.asarray(entry.get("count", frames)).reshape(-1)[0]))
    return out, problems


def _read_tasks(meta_root: Path) -> dict[int, str]:
    import pandas as pd

    frame = pd.read_parquet(meta_root / TASKS_FILE)
    return {int(row.task_index): str(task) for task, row in frame.iterrows()}


def merged_normalizer(specs: list[StreamSpec], mode: str) -> Normalizer:
    """Per-embodiment statistics of the streamed datasets: pooled mean/std, global min/max, frame-weighted
    quantiles (approximate when datasets of one embodiment differ; exact for one dataset)."""
    by_emb: dict[str, list[dict[str, dict[str, np.ndarray]]]] = {}
    names: dict[str, list[str]] = {}
    for spec in specs:
        by_emb.setdefault(spec.embodiment, []).append(spec.stats)
        names.setdefault(spec.embodiment, []).append(spec.name)
    stats: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for emb, parts in by_emb.items():
        stats[emb] = {}
        for key in KEYS:
            n = np.array([float(p[key]["count"]) for p in parts])
            w = n / n.sum()
            mean = sum(wi * p[key]["mean"] for wi, p in zip(w, parts, strict=True))
            var = sum(wi * (p[key]["std"] ** 2 + (p[key]["mean"] - mean) ** 2) for wi, p in zip(w, parts, strict=True))
            stats[emb][key] = {
                "mean": mean, "std": np.sqrt(var),
                "min": np.min([p[key]["min"] for p in parts], axis=0),
                "max": np.max([p[key]["max"] for p in parts], axis=0),
                "q01": sum(wi * p[key]["q01"] for wi, p in zip(w, parts, strict=True)),
                "q99": sum(wi * p[key]["q99"] for wi, p in zip(w, parts, strict=True)),
                "count": np.asarray(int(n.sum())),
            }
    return Normalizer(stats, mode=mode, sources=names)

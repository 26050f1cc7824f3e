"""A weighted mixture of LeRobot datasets from different robots, served as unified, normalized training batches.

A mixture file (`datasets/mixtures/*.yaml` or .json) lists the datasets:

    embodiments_file: ../embodiments.yaml   # optional: a registry file (next to this file, else the repo root)
    embodiments:                      # optional: new robots, same format as DataConfig.embodiments_file
      - {name: my_arm, action_dim: 6, state_dim: 6, action_type: abs_joint, fps: 15}
    datasets:
      - dataset: datasets/local/libero_object   # a local root (relative to the repo, then the cwd) or a hub id
        weight: 2.0                              # relative sampling weight (default 1)
        embodiment: libero_panda                 # registry name (default: DataConfig.embodiment)
        cameras: {agentview: base, wrist: wrist} # native -> canonical (default: the embodiment's mapping)

A bare list of entries is accepted too. `DataConfig.mixture` may also name a single dataset directly; its
embodiment is `DataConfig.embodiment` or, failing that, the dataset's `robot_type` when that is a registry name.

The path of a sample, in order: `MixtureSampler` picks (dataset, frame, seed) -> `MixtureDataset` reads the frame's
state, the next H actions (an array slice, padded past the episode end) and one image per used camera from the
`FrameSource` -> `Processor.frame` resizes/augments, normalizes and scatters into the unified vectors. Batches use
the keys of `vla.constants`:

    observation.images.<cam> (B, 3, S, S) float in [0, 1]     observation.image_mask (B, n_cam) bool
    observation.state (B, U_s) normalized unified              observation.state_mask (B, U_s) bool
    action (B, H, U_a) normalized unified                      action_mask (B, U_a) bool
    action_is_pad (B, H) bool                                  task list[str]
    embodiment_id (B,) long                                    dataset_id (B,) long

Typical use:

    registry = build_registry(cfg.data.embodiments_file)
    mixture = load_mixture(cfg.data, registry)
    mixture.validate()                       # every problem of every dataset in one MixtureError
    normalizer = mixture.compute_stats()     # or Normalizer.load(checkpoint) when resuming
    loader = make_dataloader(cfg, mixture, normalizer, rank=rank, world_size=world)
    ... loader.sampler.state_dict() goes into checkpoints; loader.sampler.load_state_dict(...) resumes.

The loader shards by rank itself: do not pass it through `accelerator.prepare`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vla.config import DataConfig, VLAConfig
from vla.constants import ACTION, ACTION_IS_PAD, DATASET_ID
from vla.data.embodiments import Embodiment, EmbodimentError, EmbodimentRegistry, build_registry, load_structured
from vla.data.lerobot_source import (
    ACTION_KEY,
    IMAGE_PREFIX,
    STATE_KEY,
    DatasetInfo,
    FrameSource,
    Location,
    check_files,
    fetch_hub_info,
    locate,
    read_info,
)
from vla.data.normalize import Normalizer
from vla.data.sampler import MixtureSampler, SampleKey
from vla.data.transforms import Processor, collate_frames

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Relative dataset roots in mixture files are looked up here first (then in the current directory)."""
ENTRY_KEYS = ("dataset", "weight", "embodiment", "cameras")


class MixtureError(ValueError):
    """A mixture cannot be used; the message lists every problem found, one per line."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"mixture {source} has {len(self.problems)} problem(s):\n{lines}")


@dataclass
class MixtureEntry:
    """One dataset of a mixture, as written in the file (`cameras` None = the embodiment's default mapping)."""

    dataset: str
    weight: float = 1.0
    embodiment: str = ""
    cameras: dict[str, str] | None = None


@dataclass
class Mixture:
    """Datasets + weights + embodiments, checked by `validate` and loaded by `open`.

    Attributes:
        entries: the datasets in file order (their index is `dataset_id`).
        data_cfg: the run's data settings (cameras, unified sizes, ...).
        registry: embodiment definitions (entries of the file's `embodiments:` are added to it).
        source: the file or dataset string it came from (for messages).
    """

    entries: list[MixtureEntry]
    data_cfg: DataConfig
    registry: EmbodimentRegistry
    source: str
    format_problems: list[str] = field(default_factory=list)
    _resolved: list[dict[str, Any]] | None = field(default=None, repr=False)
    _sources: list[FrameSource] | None = field(default=None, repr=False)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every entry against its files and embodiment; raise one MixtureError listing all problems.

        Reads only metadata (info.json, parquet footers); writes nothing. A hub dataset that is not cached locally
        has its small meta/ folder fetched when the hub is reachable.
        """
        if self._resolved is not None:
            return
        problems = list(self.format_problems)
        resolved = []
        for i, entry in enumerate(self.entries):
            if not entry.dataset:  # unusable entry, already reported by load_mixture
                resolved.append({})
                continue
            tag = f"[{i}] {entry.dataset}"
            found, entry_problems = self._check_entry(entry)
            problems += [f"{tag}: {p}" for p in entry_problems]
            resolved.append(found)
        if not self.entries and not problems:
            problems.append("no datasets listed")
        if problems:
            raise MixtureError(self.source, problems)
        self._resolved = resolved

    def _check_entry(self, entry: MixtureEntry) -> tuple[dict[str, Any], list[str]]:
        """(what `open` needs, problems) for one entry: location, embodiment, cameras, features, files."""
        problems: list[str] = []
        loc = locate(entry.dataset, [REPO_ROOT, Path.cwd()])
        if loc.problem:
            problems.append(loc.problem)
        elif loc.root is None:  # a hub id not cached here: fetch its metadata to check it
            root, fetch_problems = fetch_hub_info(loc.repo_id)
            problems += fetch_problems
            loc = Location(loc.spec, root, loc.repo_id)
        info = None
        if loc.root is not None:
            info, info_problems = read_info(loc.root)
            problems += info_problems
        name, emb_problems = self._embodiment(entry, info)
        problems += emb_problems
        emb = self.registry.get(name) if name in self.registry else None
        mapping = entry.cameras if entry.cameras is not None else (emb.cameras if emb else {})
        used = {native: canon for native, canon in mapping.items() if canon in self.data_cfg.cameras}
        problems += self._camera_problems(mapping, used, info, emb is not None)
        masked = [c for c in self.data_cfg.cameras if c not in used.values()]
        if used and masked:  # allowed (a robot without that camera), but say so: the policy never sees it here
            logger.warning("%s: no camera maps to data.cameras %s (mapping: %s): masked in every sample of this "
                           "dataset", entry.dataset, masked, dict(mapping))
        if info is not None:
            problems += self._feature_problems(info, emb)
            images = [IMAGE_PREFIX + n for n in used if info.cameras.get(n) == "image"]
            videos = [n for n in used if info.cameras.get(n) == "video"]
            problems += check_files(loc.root, info, [ACTION_KEY, STATE_KEY, *images], videos)
            if emb is not None and abs(info.fps - emb.fps) > 1e-6:
                logger.warning("%s: dataset fps %.4g differs from embodiment '%s' fps %.4g; action chunks follow "
                               "the dataset's rate", entry.dataset, info.fps, name, emb.fps)
        return {"location": loc, "embodiment": name, "cameras": used}, problems

    def _embodiment(self, entry: MixtureEntry, info: DatasetInfo | None) -> tuple[str, list[str]]:
        """The entry's embodiment name (entry, then data.embodiment, then a registered robot_type) and problems."""
        cfg = self.data_cfg
        name = entry.embodiment or cfg.embodiment
        if not name and info is not None and info.robot_type in self.registry:
            name = info.robot_type
        if not name:
            robot = f" (its robot_type '{info.robot_type}' is not registered)" if info and info.robot_type else ""
            return "", [(f"no embodiment given{robot}: add `embodiment:` to the entry or pass --data.embodiment; "
                         f"known: {', '.join(self.registry.names)}")]
        if name not in self.registry:
            return name, [self.registry.unknown_message(name)]
        emb, problems = self.registry.get(name), []
        for kind, extent, size in (("action", emb.action_extent, cfg.unified_action_dim),
                                   ("state", emb.state_extent, cfg.unified_state_dim)):
            if extent > size:
                problems.append(f"embodiment '{name}' uses {kind} slot {extent - 1} but data.unified_{kind}_dim is "
                                f"{size}")
        return name, problems

    def _camera_problems(self, mapping: Mapping[str, str], used: Mapping[str, str], info: DatasetInfo | None,
                         have_embodiment: bool) -> list[str]:
        problems = []
        canon = list(used.values())
        dup = sorted({c for c in canon if canon.count(c) > 1})
        if dup:
            problems.append(f"several cameras map to the same canonical camera(s) {dup}")
        if have_embodiment and not used:
            problems.append(f"no camera maps to data.cameras {list(self.data_cfg.cameras)} (mapping: "
                            f"{dict(mapping) or 'none'}); give `cameras: {{native: canonical}}`")
        missing = [n for n in used if info is not None and n not in info.cameras]
        if missing:
            problems.append(f"camera(s) {missing} not in the dataset (its cameras: {sorted(info.cameras)})")
        return problems

    @staticmethod
    def _feature_problems(info: DatasetInfo, emb: Embodiment | None) -> list[str]:
        problems = []
        if info.total_frames <= 0:
            problems.append("the dataset has no frames")
        for key, attr in ((ACTION_KEY, "action_dim"), (STATE_KEY, "state_dim")):
            have = info.feature_dim(key)
            if have is None:
                problems.append(f"no '{key}' feature (features: {sorted(info.features)})")
            elif emb is not None and have != getattr(emb, attr):
                problems.append(f"'{key}' has {have} dims but embodiment '{emb.name}' has {attr}={getattr(emb, attr)}")
        return problems

    # ---- loading ------------------------------------------------------------------------------------------------
    def open(self) -> list[FrameSource]:
        """Validate, then load every dataset (columns in memory, images memory-mapped). Cached."""
        if self._sources is None:
            self.validate()
            self._sources = [
                FrameSource.open(e.dataset, r["location"], r["embodiment"], r["cameras"])
                for e, r in zip(self.entries, self._resolved or [], strict=True)
            ]
            logger.info("%s", self.describe())
        return self._sources

    def compute_stats(self, mode: str | None = None) -> Normalizer:
        """Normalization statistics of every embodiment over all frames of its datasets, as a `Normalizer`.

        Taken in float64 from the state/action columns `open` holds in memory anyway (~0.2 s per 100k
        frames), so datasets that share an embodiment merge exactly, and nothing needs caching on disk.
        """
        arrays: dict[str, dict[str, list[np.ndarray]]] = {}
        names: dict[str, list[str]] = {}
        for src in self.open():
            per = arrays.setdefault(src.embodiment, {"state": [], "action": []})
            per["state"].append(src.state)
            per["action"].append(src.action)
            names.setdefault(src.embodiment, []).append(src.name)
        return Normalizer.from_arrays(arrays, mode=mode or self.data_cfg.normalization, sources=names)

    def describe(self) -> str:
        """One line per dataset: embodiment, size, rate, share of samples and cameras (after `open`)."""
        lines = [f"mixture {self.source}:"]
        total_w = sum(e.weight for e in self.entries)
        for i, (e, r, src) in enumerate(zip(self.entries, self._resolved or [], self._sources or [], strict=False)):
            cams = ", ".join(f"{n}->{c}" for n, c in r["cameras"].items())
            lines.append(f"  [{i}] {e.dataset}: {src.embodiment}, {len(src)} frames, {src.num_episodes} episodes, "
                         f"{src.fps:g} fps, share {e.weight / total_w:.3f}, cameras {cams}")
        return "\n".join(lines)


def load_mixture(data_cfg: DataConfig, registry: EmbodimentRegistry | None = None) -> Mixture:
    """Read `data_cfg.mixture` (a mixture file, or one dataset root / hub id). Entry format problems are collected
    for `Mixture.validate`; only an unreadable file raises here. `registry` defaults to the built-ins plus
    `data_cfg.embodiments_file`."""
    registry = registry if registry is not None else build_registry(data_cfg.embodiments_file)
    spec = data_cfg.mixture
    if not spec:
        raise MixtureError("(data.mixture is empty)", ["set --data.mixture to a mixture file or a dataset"])
    path = _find_file(spec)
    if path is None:
        return Mixture([MixtureEntry(dataset=spec, embodiment=data_cfg.embodiment)], data_cfg, registry, source=spec)
    try:
        raw = load_structured(path)
    except (OSError, ValueError) as e:
        raise MixtureError(str(path), [f"cannot parse the file ({type(e).__name__}: {e})"]) from None
    problems: list[str] = []
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"datasets", "embodiments", "embodiments_file"})
        if unknown:
            problems.append(f"unknown top-level key(s) {unknown}; expected 'datasets' and optionally "
                            "'embodiments_file' and 'embodiments'")
        if raw.get("embodiments_file"):
            problems += _merge_embodiments_file(registry, raw["embodiments_file"], path)
        if raw.get("embodiments"):
            try:
                registry.merge_entries(raw["embodiments"], source=f"{path} embodiments")
            except EmbodimentError as e:
                problems.append(str(e))
        items = raw.get("datasets")
    else:
        items = raw
    if not isinstance(items, list):
        problems.append(f"expected a list of dataset entries, got {type(items).__name__}")
        items = []
    entries = []
    for i, item in enumerate(items):
        entry, entry_problems = _parse_entry(item, data_cfg.embodiment)
        problems += [f"[{i}] {entry.dataset or '(no dataset)'}: {p}" for p in entry_problems]
        entries.append(entry)
    return Mixture(entries, data_cfg, registry, source=str(path), format_problems=problems)


def _merge_embodiments_file(registry: EmbodimentRegistry, ref: Any, mixture_path: Path) -> list[str]:
    """Merge the registry file a mixture names (so the mixture carries the robots it needs); its problems."""
    if not isinstance(ref, str) or not ref:
        return [f"'embodiments_file' must be a path, got {ref!r}"]
    candidates = [mixture_path.parent / ref, REPO_ROOT / ref]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return [f"embodiments_file {ref!r} not found (looked in {mixture_path.parent} and {REPO_ROOT})"]
    try:
        registry.merge_file(found)
    except EmbodimentError as e:
        return [str(e)]
    return []


def _find_file(spec: str) -> Path | None:
    if Path(spec).suffix.lower() not in (".yaml", ".yml", ".json"):
        return None
    for base in (REPO_ROOT, Path.cwd()):
        p = base / spec
        if p.is_file():
            return p
    raise MixtureError(spec, [f"mixture file not found (looked in {REPO_ROOT} and {Path.cwd()})"])


def _parse_entry(item: Any, default_embodiment: str) -> tuple[MixtureEntry, list[str]]:
    """An entry and its format problems; an entry whose `dataset` is unusable has dataset "" (skipped later)."""
    if isinstance(item, str):
        item = {"dataset": item}
    if not isinstance(item, Mapping):
        return MixtureEntry(""), [f"expected a mapping with keys {list(ENTRY_KEYS)}, got {item!r}"]
    problems = []
    unknown = sorted(set(item) - set(ENTRY_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; allowed: {list(ENTRY_KEYS)}")
    dataset = item.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        problems.append(f"'dataset' must be a local root or hub repo id, got {dataset!r}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        problems.append(f"'weight' must be a positive number, got {weight!r}")
    cameras = item.get("cameras")
    if cameras is not None and not (isinstance(cameras, Mapping) and
                                    all(isinstance(k, str) and isinstance(v, str) for k, v in cameras.items())):
        problems.append(f"'cameras' must map native camera names to canonical names, got {cameras!r}")
    embodiment = str(item.get("embodiment") or default_embodiment or "")
    dataset = dataset if isinstance(dataset, str) else ""
    if problems:  # keep what is usable so validate() can still check the dataset itself
        return MixtureEntry(dataset, 1.0, embodiment, None), problems
    return MixtureEntry(dataset, float(weight), embodiment, dict(cameras) if cameras else None), []


# ---- the torch side ----------------------------------------------------------------------------------------------


class MixtureDataset(Dataset):
    """Map-style dataset over sample keys `(dataset_id, frame, seed)`; a list of keys returns a collated batch.

    Args:
        sources: the mixture's opened datasets.
        processor: the shared observation path (images, normalization, unified vectors).
        chunk_size: H, future actions per sample (at the dataset's own rate).
        train: augment images.
    """

    def __init__(self, sources: Sequence[FrameSource], processor: Processor, chunk_size: int, train: bool) -> None:
        self.sources = list(sources)
        self.processor = processor
        self.chunk_size = int(chunk_size)
        self.train = train
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | SampleKey | list[SampleKey]) -> dict[str, Any]:
        if isinstance(key, list):
            return collate_frames([self.sample(*k) for k in key])
        if isinstance(key, int | np.integer):
            d = int(np.searchsorted(self.offsets, key, side="right") - 1)
            return self.sample(d, int(key - self.offsets[d]), None)
        return self.sample(*key)

    def sample(self, dataset_id: int, frame: int, seed: int | None) -> dict[str, Any]:
        """One training sample (unbatched)."""
        src = self.sources[dataset_id]
        images = {cam: src.image(frame, cam) for cam in src.cameras}
        out = self.processor.frame(images, src.state[frame], src.task(frame), src.embodiment,
                                   train=self.train, seed=seed)
        steps = frame + np.arange(self.chunk_size)
        end = src.episode_end[frame]
        out[ACTION] = self.processor.actions_to_model(torch.from_numpy(src.action[np.minimum(steps, end - 1)]),
                                                      src.embodiment)
        out[ACTION_IS_PAD] = torch.from_numpy(steps >= end)
        out[DATASET_ID] = torch.tensor(dataset_id, dtype=torch.long)
        return out


class MixtureLoader(DataLoader):
    """DataLoader that tells its `MixtureSampler` which batches reached the training loop (for resuming).

    Each `iter()` runs to the end of the current epoch and the next one continues with the following epoch, so
    `for batch in loader` is one (rest of an) epoch and `len(loader)` the batches left in it.
    """

    sampler: MixtureSampler

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            self.sampler.advance(1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def make_dataloader(
    cfg: VLAConfig,
    mixture: Mixture,
    normalizer: Normalizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
) -> MixtureLoader:
    """Batches of `cfg.data.batch_size` samples for this rank (see the module docstring for the keys)."""
    sources = mixture.open()
    problems = []
    for src in sources:
        emb = mixture.registry.get(src.embodiment)
        for key, dim in (("state", emb.state_dim), ("action", emb.action_dim)):
            if src.embodiment not in normalizer.stats:
                problems.append(f"{src.name}: the normalizer has no statistics for embodiment '{src.embodiment}'")
                break
            have = normalizer.stats[src.embodiment][key]["mean"].shape[0]
            if have != dim:
                problems.append(f"{src.name}: normalizer {key} statistics have {have} dims, embodiment has {dim}")
    if problems:
        raise MixtureError(mixture.source, sorted(set(problems)))
    if cfg.data.cache_images_gb > 0:
        cache_decoded_images(sources, cfg.data.cache_images_gb, progress=rank == 0)
    processor = Processor(cfg.data, mixture.registry, normalizer)
    dataset = MixtureDataset(sources, processor, cfg.action.chunk_size, train=train)
    sampler = MixtureSampler([len(s) for s in sources], [e.weight for e in mixture.entries], cfg.data.batch_size,
                             seed=cfg.data.seed, rank=rank, world_size=world_size)
    workers = cfg.data.num_workers
    return MixtureLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches and the dataset collates them
        collate_fn=_identity,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
    )


def cache_decoded_images(sources: Sequence[FrameSource], budget_gb: float, progress: bool = True) -> bool:
    """Decode the image cameras of every source into memory if all of them fit in `budget_gb` GiB (else nothing)."""
    need = sum(src.decoded_bytes() for src in sources)
    if need > budget_gb * 2**30:
        logger.warning("decoded images would take %.2f GiB > data.cache_images_gb=%.2f: decoding per sample",
                       need / 2**30, budget_gb)
        return False
    for src in sources:
        src.cache_images(progress=progress)
    logger.info("decoded %.2f GiB of images into memory", need / 2**30)
    return True


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _worker_init(_: int) -> None:
    # one thread per worker: the workers already run in parallel, and the trainer owns the cores
    torch.set_num_threads(1)

"""Weighted, seeded, sharded and resumable sampling over the datasets of a mixture.

The sampler yields whole batches of keys `(dataset_id, frame, sample_seed)`. One global stream per epoch is a pure
function of (seed, epoch): dataset ids drawn with the mixture weights, and inside each dataset frames taken from
fresh permutations (every frame once before any repeats). Rank r of W takes batches r, r + W, r + 2W, ... of that
stream, so ranks see disjoint shards without talking to each other. `sample_seed` drives the sample's
augmentation, so a batch is reproducible from its position alone, whatever the number of DataLoader workers.

Resuming: the position is the number of batches *handed to the training loop* (the loader calls `advance` as it
yields; workers prefetching ahead do not count), stored by `state_dict()` in checkpoints. `load_state_dict` maps a
position saved with another world size onto the same point of the global stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

SampleKey = tuple[int, int, int]
"""(dataset_id, frame, sample_seed)."""


class MixtureSampler(Sampler[list[SampleKey]]):
    """Batches of sample keys; one pass over `__iter__` is the rest of the current epoch.

    Args:
        sizes: frames per dataset.
        weights: sampling weight per dataset (normalized here).
        batch_size: samples per batch (per rank).
        seed: seed of the whole stream.
        rank, world_size: this process's shard.
        epoch_size: samples in one global epoch (default: all frames of all datasets).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_size: int | None = None,
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per dataset, got {len(sizes)} sizes and {len(weights)} weights")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"every dataset needs frames, got sizes {list(sizes)}")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be positive, got {list(weights)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.probs = w / w.sum()
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch_size = int(epoch_size or self.sizes.sum())
        # every rank gets the same whole number of batches per epoch; the stream's tail is dropped
        self.batches_per_epoch = max(1, self.epoch_size // (self.batch_size * self.world_size))
        self.consumed = 0  # batches handed out by this rank
        self._plan: tuple[int, np.ndarray] | None = None

    # ---- the stream ---------------------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> np.ndarray:
        """(n, 3) int64 keys of the whole global epoch (all ranks), n = batches_per_epoch * batch * world_size."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        n = self.batches_per_epoch * self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, epoch])
        ids = rng.choice(len(self.sizes), size=n, p=self.probs)
        frames = np.empty(n, dtype=np.int64)
        for d, size in enumerate(self.sizes.tolist()):
            where = np.flatnonzero(ids == d)
            if len(where):  # back-to-back permutations: every frame once before any frame twice
                reps = -(-len(where) // size)
                frames[where] = np.concatenate([rng.permutation(size) for _ in range(reps)])[: len(where)]
        seeds = rng.integers(0, 2**31 - 1, size=n)
        plan = np.stack([ids, frames, seeds], axis=1)
        self._plan = (epoch, plan)
        return plan

    @property
    def epoch(self) -> int:
        return self.consumed // self.batches_per_epoch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, start = divmod(self.consumed, self.batches_per_epoch)
        plan = self.epoch_plan(epoch)
        for b in range(start, self.batches_per_epoch):
            g = b * self.world_size + self.rank  # global batch index
            rows = plan[g * self.batch_size: (g + 1) * self.batch_size]
            yield [(int(d), int(f), int(s)) for d, f, s in rows]

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.batches_per_epoch - self.consumed % self.batches_per_epoch

    def advance(self, batches: int = 1) -> None:
        """Count batches as consumed (called by the loader when it hands them out)."""
        self.consumed += batches

    # ---- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "epoch": self.epoch, "batch_in_epoch": self.consumed % self.batches_per_epoch,
            "consumed_batches": self.consumed, "batch_size": self.batch_size, "world_size": self.world_size,
            "epoch_size": self.epoch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. With another world size or batch size, resume at the same number of
        samples into the global stream (rounded down to a whole batch)."""
        missing = [k for k in ("seed", "consumed_batches", "batch_size", "world_size") if k not in state]
        if missing:
            raise KeyError(f"sampler state lacks {missing}; got keys {sorted(state)}")
        self.seed = int(state["seed"])
        self._plan = None
        if state.get("epoch_size", self.epoch_size) != self.epoch_size:
            raise ValueError(f"sampler state was saved for epoch_size={state['epoch_size']} but this mixture has "
                             f"{self.epoch_size}: the datasets changed since the checkpoint")
        samples = int(state["consumed_batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self.consumed = samples // (self.batch_size * self.world_size)

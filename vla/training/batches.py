"""An endless, resumable stream of training batches over a DataLoader.

The loader keeps its own position: `vla.data.mixture.MixtureLoader` (like torchdata's StatefulDataLoader) counts
the batches it has handed to the training loop, not the indices its workers prefetched, and `state_dict()` /
`load_state_dict()` save and restore that count. One `iter(loader)` is the rest of the current epoch; the stream
starts the next one when it ends.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import DataLoader

from vla.constants import ACTION, DATASET_ID

DIGEST_KEYS = (DATASET_ID, "index", "episode_index", "frame_index", ACTION)
"""Batch entries folded into the running data digest (sample identity and targets, not pixels: cheap to hash)."""


class BatchStream:
    """`next(stream)` gives the next training batch forever.

    Attributes:
        batches: batches handed out since the run started (over all resumes).
        digest: running SHA-1 over the identities of every batch handed out. Two runs (or a run and its resumed
            continuation) that trained on the same samples in the same order have the same digest; different
            ranks of one run have different ones.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batches = 0
        self.digest = ""
        self._iter = None
        self._peeked: Any = None

    def _start_epoch(self) -> Any:
        """Begin the next epoch and return its first batch (StopIteration if it has none).

        Creating a DataLoader iterator draws a worker base seed from the global torch RNG; fork it so the model's
        random stream does not depend on where epochs (or a resume) begin. The first batch is taken inside the
        fork too: a loader whose `__iter__` is a generator (`MixtureLoader`) creates the DataLoader iterator only
        at its first `next()`, so `iter()` alone would leave that draw outside the fork.
        """
        with torch.random.fork_rng(devices=[]):
            self._iter = iter(self.loader)
            return next(self._iter)

    def _fetch(self) -> Any:
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                pass
        for _ in range(2):  # the rest of a finished epoch may be empty (resumed at its end); the next may not
            try:
                return self._start_epoch()
            except StopIteration:
                continue
        raise ValueError("the data loader yields no batches: the dataset (or this rank's shard) is smaller "
                         "than one batch; lower data.batch_size or add data")

    def peek(self) -> Any:
        """The batch the next `next()` returns, without handing it out."""
        if self._peeked is None:
            self._peeked = self._fetch()
        return self._peeked

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        batch = self._peeked if self._peeked is not None else self._fetch()
        self._peeked = None
        self.batches += 1
        self.digest = _fold(self.digest, batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._peeked is not None:
            raise RuntimeError("BatchStream.state_dict with a peeked batch pending: the position would be off by one")
        return {"loader": _loader_state(self.loader), "batches": self.batches, "digest": self.digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue right after the batch `state` was taken at; call before the first batch is read."""
        if self._iter is not None or self._peeked is not None:
            raise RuntimeError("BatchStream.load_state_dict must be called before any batch is read")
        if not hasattr(self.loader, "load_state_dict"):
            raise TypeError(f"{type(self.loader).__name__} cannot restore a position (no load_state_dict)")
        self.loader.load_state_dict(state["loader"])
        self.batches, self.digest = int(state["batches"]), str(state["digest"])


def _loader_state(loader: DataLoader) -> dict[str, Any]:
    if not hasattr(loader, "state_dict"):
        raise TypeError(
            f"{type(loader).__name__} has no state_dict(): a checkpoint could not record the data position. Use a "
            "resumable loader (vla.data.mixture.make_dataloader, torchdata's StatefulDataLoader)"
        )
    return loader.state_dict()


def _fold(digest: str, batch: Any) -> str:
    h = hashlib.sha1(digest.encode())
    if isinstance(batch, dict):
        for key in DIGEST_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

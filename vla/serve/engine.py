"""Inference off the event loop, with simultaneous requests batched into one policy call.

The websocket event loop never runs the model: each checked observation is queued, and one inference thread takes
what is waiting (up to `max_batch`, lingering at most `batch_wait_ms` for more when the queue holds fewer), groups
observations that can share a forward pass (same image shapes and dtypes), and answers every request's future.
One client never blocks another's connection handling, and N clients that ask at once cost about one batched
forward pass instead of N sequential ones (bench/bench_serve.py measures the gain).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla.constants import EMBODIMENT, OBS_STATE, TASK

logger = logging.getLogger(__name__)

PredictFn = Callable[[dict[str, Any]], np.ndarray]
"""Batched observation (images (B, ...), state (B, S), task list, embodiment str) -> (B, H, A) float actions."""


@dataclass(frozen=True)
class EngineConfig:
    """Batching of simultaneous requests.

    Args:
        max_batch: most observations in one forward pass (1 = no batching).
        batch_wait_ms: how long the inference thread waits for more requests once one is queued and fewer than
            `max_batch` are waiting; 0 batches only what is already queued.
    """

    max_batch: int = 8
    batch_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


@dataclass
class Result:
    """One request's answer: its (H, A) actions and how it was computed."""

    actions: np.ndarray
    infer_ms: float
    batch_size: int


@dataclass
class _Request:
    obs: dict[str, Any]
    future: Future


def _signature(obs: dict[str, Any]) -> tuple:
    """Observations with the same signature can be stacked into one batch."""
    return tuple(sorted((k, v.shape, v.dtype.str) for k, v in obs.items() if isinstance(v, np.ndarray)))


def collate(observations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Checked single observations of one signature -> one batched observation."""
    first = observations[0]
    out: dict[str, Any] = {EMBODIMENT: first[EMBODIMENT], TASK: [o[TASK] for o in observations]}
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            out[key] = np.stack([o[key] for o in observations])
    out[OBS_STATE] = out[OBS_STATE].astype(np.float32)
    return out


class InferenceEngine:
    """A queue and one inference thread in front of `predict`. `submit` is thread-safe; `close` drains and stops."""

    def __init__(self, predict: PredictFn, cfg: EngineConfig = EngineConfig()) -> None:
        self.predict, self.cfg = predict, cfg
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vla-inference", daemon=True)
        self.batches = 0
        self.requests = 0
        self._thread.start()

    def submit(self, obs: dict[str, Any]) -> Future:
        future: Future = Future()
        if not self._thread.is_alive():
            future.set_exception(RuntimeError("the inference engine is stopped"))
            return future
        self._queue.put(_Request(obs, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self) -> tuple[list[_Request], bool]:
        """Block for one request, then gather more (bounded by max_batch and batch_wait_ms)."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.perf_counter() + self.cfg.batch_wait_ms / 1000.0
        while len(batch) < self.cfg.max_batch:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if left <= 0 else self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                self._run_batch(batch)
                return [], True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            batch, stop = self._take()
            if batch:
                self._run_batch(batch)
            if stop:
                break
        while True:  # requests queued after close: refuse them instead of leaving their clients waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(RuntimeError("the server is shutting down"))

    def _run_batch(self, batch: list[_Request]) -> None:
        groups: dict[tuple, list[_Request]] = {}
        for req in batch:
            if req.future.set_running_or_notify_cancel():
                groups.setdefault(_signature(req.obs), []).append(req)
        for reqs in groups.values():
            t0 = time.perf_counter()
            try:
                actions = np.asarray(self.predict(collate([r.obs for r in reqs])), dtype=np.float32)
                if actions.ndim != 3 or actions.shape[0] != len(reqs):
                    raise RuntimeError(f"the policy returned actions of shape {actions.shape} for a batch of "
                                       f"{len(reqs)}; expected (B, H, action_dim)")
                if not np.all(np.isfinite(actions)):
                    raise RuntimeError("the policy returned non-finite actions")
            except Exception as e:  # noqa: BLE001 - the error goes to every client of the batch
                for r in reqs:
                    r.future.set_exception(e)
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            self.batches += 1
            self.requests += len(reqs)
            for i, r in enumerate(reqs):
                r.future.set_result(Result(actions[i], ms, len(reqs)))

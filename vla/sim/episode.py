"""One evaluation episode's bookkeeping, shared by the LIBERO, robosuite and CALVIN runners.

Every runner turns a job into a record the same way: it builds the record (the job's identity and an empty
outcome), runs the rollout inside `failures_recorded`, so that an exception fails that episode instead of the run,
and then writes the outcome into the record. A job whose worker process died never returns from its runner; the
parent makes its record with `lost_record`. What differs between benchmarks (the record's identity fields, the
rollout, the outcome of a CALVIN chain) stays in each benchmark's module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vla.sim.policies import PolicyError
from vla.sim.runner import Job, Record

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Episode:
    """What one rollout produced (the record adds the job's identity and the output paths)."""

    success: bool = False
    steps: int = 0
    policy_queries: int = 0
    time_reset: float = 0.0
    time_sim: float = 0.0
    time_render: float = 0.0
    time_policy: float = 0.0
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)

    def finish(self, record: Record, started: float) -> Record:
        """Write this rollout's outcome into `record` (begun at `time.perf_counter()` == `started`).

        An episode that raised is a failure even if the task happened to be solved before the exception."""
        record.update(
            success=self.success and record["error"] is None, steps=self.steps, policy_queries=self.policy_queries,
            time_s={"reset": round(self.time_reset, 3), "sim": round(self.time_sim, 3),
                    "render": round(self.time_render, 3), "policy": round(self.time_policy, 3)},
            **finished(started),
        )
        return record


def finished(started: float) -> dict[str, float]:
    """The record's wall time since `started` (a `time.perf_counter()` reading) and its finishing timestamp."""
    return {"wall_time_s": round(time.perf_counter() - started, 3), "finished_at": round(time.time(), 3)}


@contextlib.contextmanager
def failures_recorded(record: Record, name: str, *, on_simulator_error: Callable[[], None]) -> Iterator[None]:
    """Run the enclosed rollout; an exception becomes the record's `error` and `error_source`.

    A `PolicyError` (the policy raised, `vla.sim.policies.blame_policy`) leaves the simulator usable. Any other
    exception comes from the simulator, which may now be in any state: `on_simulator_error` runs (the runners close
    their env, so the next episode builds a fresh one). `name` says which episode in the warning."""
    try:
        yield
    except PolicyError as e:  # the env is fine: keep it
        logger.warning("%s: the policy raised %s", name, e)
        record.update(error=str(e), error_source="policy")
    except Exception as e:  # noqa: BLE001 - one broken episode is a failed episode, never a stopped run
        logger.warning("%s: the simulator raised %s: %s", name, type(e).__name__, e)
        record.update(error=f"{type(e).__name__}: {e}", error_source="simulator")
        on_simulator_error()


def close_quietly(resource: Any, name: str) -> None:
    """Close a simulator that may be broken: a failure to close must not hide the episode's own error."""
    if resource is None:
        return
    try:
        resource.close()
    except Exception as e:  # noqa: BLE001 - see above
        logger.debug("closing the %s failed: %s", name, e)


def lost_record(new_record: Callable[[Job, Any], Record], cfg: Any) -> Callable[[Job, str], Record]:
    """`run_jobs`' `on_lost`: the failure record of a job whose worker process died, built by `new_record(job, cfg)`."""

    def make(job: Job, message: str) -> Record:
        record = new_record(job, cfg)
        record.update(error=message, error_source="worker", pid=None)
        return record

    return make

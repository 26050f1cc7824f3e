"""The policy interface the simulator evaluations drive, how a policy is obtained, and reference policies.

An evaluated policy is duck-typed:

    policy.reset()                          called at the start of every episode (LIBERO) or subtask (CALVIN)
    policy.select_action(observation) -> (action_dim,) np.ndarray or torch.Tensor (a leading batch dim of 1 is ok)
    policy.needs_observation() -> bool      optional: False while the policy still has queued actions; the
                                            evaluation then skips rendering the cameras and passes an observation
                                            without images (state, task and embodiment only)
    policy.predict_action_chunk(obs)        optional, only with `replan_steps > 0`: (H, action_dim) or
                                            (1, H, action_dim); the evaluation executes the first replan_steps

Observations use the vla batch keys (`vla.constants`): `observation.images.<camera>` uint8 (H, W, 3),
`observation.state` float32 (state_dim,), `task` (str), `embodiment` (str).

A *policy source* is what an evaluation is given: a checkpoint directory (loaded with
`vla.policy.VLAPolicy.from_pretrained` in every worker), a `CheckpointPolicy` (the same with inference settings
changed), a policy object (pickled into each worker when there are several), a picklable zero-argument factory
returning a policy, or the string "random".
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

RANDOM_POLICY = "random"
"""Policy source naming `RandomPolicy`: checks the simulator pipeline end to end (it scores about zero)."""


@runtime_checkable
class Policy(Protocol):
    def reset(self) -> None: ...

    def select_action(self, observation: dict[str, Any]) -> Any: ...


PolicySource = str | Path | Policy | Callable[[], Policy]


class RandomPolicy:
    """Uniform random actions in [-1, 1]^action_dim with a binary gripper (last dim).

    It draws from numpy's global generator, which the evaluations seed per episode, so its actions do not depend
    on which worker runs the episode. With `chunk > 1` it behaves like a chunking policy: it asks for an
    observation only every `chunk` steps.
    """

    def __init__(self, action_dim: int = 7, *, chunk: int = 1):
        if action_dim < 1 or chunk < 1:
            raise ValueError(f"RandomPolicy needs action_dim >= 1 and chunk >= 1, got {action_dim}, {chunk}")
        self.action_dim = action_dim
        self.chunk = chunk
        self._left = 0

    def reset(self) -> None:
        self._left = 0

    def needs_observation(self) -> bool:
        return self._left == 0

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        self._left = (self._left - 1) % self.chunk
        action = np.random.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)
        action[-1] = 1.0 if action[-1] > 0 else -1.0
        return action


@dataclass(frozen=True)
class CheckpointPolicy:
    """A checkpoint evaluated with some inference settings changed, loaded in every worker: e.g. Mixture-of-Horizons
    dynamic execution, its agreement threshold or the number of denoising steps, on the same weights.

    overrides: (dotted config field, value string) pairs for `VLAPolicy.from_pretrained(overrides=...)`.
    """

    path: str
    overrides: tuple[tuple[str, str], ...] = ()

    def __call__(self) -> Policy:
        from vla.policy import VLAPolicy

        return VLAPolicy.from_pretrained(self.path, overrides=dict(self.overrides))

    def identity(self) -> dict[str, Any]:
        """What the results record: the checkpoint (hashed like a plain directory) and the changed settings."""
        from vla.sim.results import policy_identity

        return {**policy_identity(self.path), "overrides": dict(self.overrides)}


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """["action.moh.dynamic=true", ...] -> (("action.moh.dynamic", "true"), ...); ValueError names a bad item."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--policy-set expects KEY=VALUE (e.g. action.moh.dynamic=true), got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def add_policy_set_argument(parser: argparse.ArgumentParser) -> None:
    """The `--policy-set KEY=VALUE` option of the evaluation scripts."""
    parser.add_argument("--policy-set", action="append", default=[], metavar="KEY=VALUE",
                        help="change an inference setting of the checkpoint's config (repeatable), e.g. "
                             "action.moh.dynamic=true, action.moh.agreement_threshold=0.2, "
                             "objective.num_inference_steps=10; recorded with the results")


def checkpoint_with_settings(policy: str, items: Sequence[str]) -> CheckpointPolicy:
    """`--policy-set` items checked against the checkpoint's config in the parent, before any simulator starts, so a
    misspelt key or a bad value is one clear error (ConfigError / ValueError) and not one per worker."""
    from vla.config import VLAConfig, apply_overrides
    from vla.training.layout import CONFIG_NAME, resolve_pretrained

    if policy == RANDOM_POLICY:
        raise ValueError("--policy-set changes a checkpoint's settings; --policy random has none")
    source = CheckpointPolicy(str(policy), parse_overrides(items))
    apply_overrides(VLAConfig.from_json(resolve_pretrained(policy) / CONFIG_NAME), dict(source.overrides))
    return source


def policy_with_settings(policy: str, items: Sequence[str], error: Callable[[str], Any]) -> PolicySource:
    """What an evaluation script loads for `--policy` and its `--policy-set` items; `error` (the script's
    `parser.error`) reports a bad setting or a checkpoint that does not load, and does not return.

    The policy is loaded once here, in the parent and before any result file is written: a corrupt checkpoint or a
    `--policy-set` that changes a weight shape is one line, not a "0/0" result that blocks the next run.
    """
    from vla.policy import CheckpointError

    try:
        source = checkpoint_with_settings(policy, items) if items else policy
        check_policy_loads(source)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:  # ConfigError is a ValueError
        error(one_line(str(e)))
        raise
    return source


def check_remote_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The options `--remote ws://...` goes with (shared by eval/libero.py and eval/calvin.py): one parser error."""
    if args.policy:
        parser.error("give either --policy or --remote, not both")
    if not args.remote.startswith(("ws://", "wss://")):
        parser.error(f"--remote expects a websocket URI like ws://127.0.0.1:8000, got {args.remote!r}")
    if args.out is None:
        parser.error("--out is required with --remote (there is no checkpoint directory to write into)")
    if args.policy_set:
        parser.error("--policy-set changes a local checkpoint; set inference options on the server instead")


def connect_remote(uri: str, parser: argparse.ArgumentParser) -> PolicySource:
    """A served policy, checked to answer (and to accept our key) before anything is written."""
    from vla.serve.client import RemotePolicyError, RemoteSource

    source = RemoteSource(uri)
    try:
        source.identity()
    except RemotePolicyError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return source


def check_policy_loads(source: PolicySource) -> None:
    """Load a checkpoint source (then drop it) and check it can act; raises what loading raises."""
    if isinstance(source, str) and source == RANDOM_POLICY:
        return
    if not isinstance(source, (str, Path, CheckpointPolicy)):
        return  # a policy object or a factory of the caller's: it is checked where it runs
    loaded = load_policy(source)
    if getattr(loaded, "normalizer", True) is None:
        raise RuntimeError(f"{getattr(source, 'path', source)} has no normalization statistics: it cannot turn "
                           "observations into model inputs (was it saved by training?)")
    del loaded


def one_line(message: str, max_items: int = 3) -> str:
    """A multi-line error (a list of mismatched tensors) as one line: the first line and the first items."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    more = f" ... ({len(lines) - 1 - max_items} more)" if len(lines) - 1 > max_items else ""
    return f"{lines[0]} {'; '.join(lines[1:1 + max_items])}{more}"


def load_policy(source: PolicySource, *, action_dim: int = 7) -> Policy:
    """Turn a policy source into a policy object (inside the process that will run it)."""
    if isinstance(source, str) and source == RANDOM_POLICY:
        return RandomPolicy(action_dim)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"policy checkpoint {path} does not exist")
        from vla.policy import VLAPolicy

        return VLAPolicy.from_pretrained(str(path))
    if hasattr(source, "select_action"):
        return source  # type: ignore[return-value]
    if callable(source):
        policy = source()
        if not hasattr(policy, "select_action") or not hasattr(policy, "reset"):
            raise TypeError(f"policy factory {source!r} returned {type(policy).__name__}, which has no reset/select_action")
        return policy
    raise TypeError(
        f"cannot evaluate {type(source).__name__}: give a checkpoint directory, a policy with reset()/select_action(), "
        f"a factory returning one, or {RANDOM_POLICY!r}"
    )


class PolicyError(RuntimeError):
    """The policy raised (not the simulator), so the simulator is still usable; the message names the original
    exception, which is chained as `__cause__`."""


@contextlib.contextmanager
def blame_policy():
    """Re-raise any exception of the enclosed policy call as PolicyError."""
    try:
        yield
    except Exception as e:
        raise PolicyError(f"{type(e).__name__}: {e}") from e


def needs_observation(policy: Policy) -> bool:
    """Whether the policy will read this step's observation (always, unless it says otherwise)."""
    ask = getattr(policy, "needs_observation", None)
    if not callable(ask):
        return True
    with blame_policy():
        return bool(ask())


def inference_context():
    """`torch.inference_mode()` when torch is loaded (no autograd bookkeeping in rollouts), else a no-op."""
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed the global generators a policy or simulator may draw from (python, numpy, torch if loaded)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def episode_seed(base_seed: int, *indices: int) -> int:
    """A 31-bit seed derived from the run seed and an episode's indices: independent of which worker runs it."""
    return int(np.random.SeedSequence([base_seed, *indices]).generate_state(1)[0] & 0x7FFFFFFF)


def as_action(value: Any, action_dim: int) -> np.ndarray:
    """A policy output -> float64 (action_dim,) numpy action; a clear ValueError if it has the wrong shape or NaNs."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    action = np.asarray(value, dtype=np.float64)
    if action.ndim == 2 and action.shape[0] == 1:
        action = action[0]
    if action.shape != (action_dim,):
        raise ValueError(f"policy returned an action of shape {tuple(action.shape)}; this simulator expects ({action_dim},)")
    if not np.all(np.isfinite(action)):
        raise ValueError(f"policy returned a non-finite action {action.tolist()}")
    return action


def as_chunk(value: Any, action_dim: int) -> np.ndarray:
    """A predicted chunk -> float64 (H, action_dim); accepts a leading batch dim of 1."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    chunk = np.asarray(value, dtype=np.float64)
    if chunk.ndim == 3 and chunk.shape[0] == 1:
        chunk = chunk[0]
    if chunk.ndim != 2 or chunk.shape[1] != action_dim:
        raise ValueError(f"policy returned an action chunk of shape {tuple(chunk.shape)}; expected (H, {action_dim})")
    if not np.all(np.isfinite(chunk)):
        raise ValueError("policy returned a non-finite action chunk")
    return chunk

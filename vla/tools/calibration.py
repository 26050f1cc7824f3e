"""Record what every router of a policy does on real observations, through the inference path.

Calibration runs `head.sample` with the expert cache off, so every routed layer calls its router at every
denoising step (a cached forward skips the router). Forward hooks read each router's input and output; a pre-hook
on the action transformer counts the denoising steps. Nothing in the policy is changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vla.action.moe import ROUTED_KINDS, Routing
from vla.constants import ACTION_MASK, EMBODIMENT_ID, OBS_STATE, STATE_MASK, TASK

logger = logging.getLogger(__name__)


@dataclass
class LayerRouting:
    """Everything one routed layer's router did during calibration (rows: tokens for `hb`, samples for `as`/`nm`).

    Attributes:
        layer, kind, num_experts, top_k: the layer.
        inputs: (N, in_dim) router inputs (capped at `max_rows` rows, the first ones).
        logits: (N, E) float32 router logits of those rows.
        index: (N, k) the experts selected for those rows.
        sample: (N,) long, the calibration sample each row belongs to.
        step: (N,) long, the denoising step of each row.
        counts: (E,) float64 selections of each expert over ALL rows (not capped).
    """

    layer: int
    kind: str
    num_experts: int
    top_k: int
    inputs: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    index: list[Tensor] = field(default_factory=list)
    sample: list[Tensor] = field(default_factory=list)
    step: list[Tensor] = field(default_factory=list)
    counts: Tensor | None = None
    rows: int = 0

    def cat(self) -> LayerRouting:
        """The same record with every list concatenated into one tensor (in a one-element list)."""
        return dataclasses.replace(self, **{name: [torch.cat(getattr(self, name))] for name in
                                            ("inputs", "logits", "index", "sample", "step")})

    @property
    def frequency(self) -> Tensor:
        """(E,) fraction of selections each expert received."""
        return self.counts / self.counts.sum().clamp_min(1.0)


@dataclass
class Calibration:
    """The routers' behaviour on a set of observations.

    Attributes:
        layers: routed layer index -> its `LayerRouting` (lists concatenated).
        embodiment: per calibration sample, the embodiment name.
        task: per sample, the instruction.
        descriptor: (S, A) float action-space descriptor of each sample.
        noise: (steps,) noise fraction of each denoising step (0 = clean, 1 = pure noise).
    """

    layers: dict[int, LayerRouting]
    embodiment: list[str]
    task: list[str]
    descriptor: Tensor
    noise: Tensor

    @property
    def num_samples(self) -> int:
        return len(self.task)


def routed_layers(policy: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the routed FFN module (`as`, `hb`, `nm`) of a VLAPolicy's action transformer."""
    return {i: block.ffn for i, block in enumerate(policy.head.transformer.blocks) if block.kind in ROUTED_KINDS}


@torch.no_grad()
def collect_routing(policy: torch.nn.Module, batches: Iterable[Mapping[str, Any]], max_samples: int,
                    max_rows: int = 16384, seed: int = 0) -> Calibration:
    """Run the inference path (no expert cache) on up to `max_samples` samples of `batches` and record every router.

    Args:
        policy: a VLAPolicy (eval mode is set here).
        batches: model-ready batches (`vla.data.mixture` keys: normalized, unified).
        max_samples: stop after this many samples.
        max_rows: keep router inputs/logits of at most this many rows per layer (selection counts use every row).
        seed: seed of the initial noise of each chunk.
    """
    policy.eval()
    layers = routed_layers(policy)
    if not layers:
        raise ValueError("the policy has no routed layer (as, hb, nm): there is nothing to calibrate")
    records = {i: LayerRouting(i, m.kind, m.router.num_experts, m.router.top_k,
                               counts=torch.zeros(m.router.num_experts, dtype=torch.float64))
               for i, m in layers.items()}
    state = {"step": -1, "offset": 0, "batch": 0, "levels": []}
    objective = policy.head.objective

    def on_step(module, args):
        state["step"] += 1
        level = args[1]
        if state["offset"] == 0 and len(state["levels"]) <= state["step"]:
            state["levels"].append(float(objective.noise_fraction(level.reshape(-1)[:1].float())[0]))

    def on_router(layer: int):
        def hook(module, args, output: Routing):
            rec = records[layer]
            rows = output.index.shape[0]
            per_sample = rows // state["batch"]
            rec.counts += torch.bincount(output.index.reshape(-1).cpu(), minlength=rec.num_experts).double()
            keep = min(rows, max_rows - rec.rows)
            if keep <= 0:
                return
            rec.inputs.append(args[0][:keep].detach().float().cpu())
            rec.logits.append(output.logits[:keep].detach().float().cpu())
            rec.index.append(output.index[:keep].detach().cpu())
            rec.sample.append(state["offset"] + torch.arange(keep) // per_sample)
            rec.step.append(torch.full((keep,), state["step"], dtype=torch.long))
            rec.rows += keep
        return hook

    handles = [policy.head.transformer.register_forward_pre_hook(on_step)]
    handles += [m.router.register_forward_hook(on_router(i)) for i, m in layers.items()]
    embodiments, tasks, descriptors = [], [], []
    names = policy.registry.names
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for batch in _take(batches, max_samples):
            b = batch[OBS_STATE].shape[0]
            state["step"], state["batch"] = -1, b
            device = policy.device
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            prefix = policy.encode(batch)
            policy.head.sample(prefix, batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK],
                               use_expert_cache=False)
            embodiments += [names[int(i)] for i in batch[EMBODIMENT_ID].reshape(-1).tolist()]
            tasks += list(batch[TASK])
            descriptors.append(batch[ACTION_MASK].float().cpu())
            state["offset"] += b
    finally:
        for h in handles:
            h.remove()
        torch.random.set_rng_state(generator_state)
    if not tasks:
        raise ValueError("the calibration data yielded no samples")
    logger.info("calibrated %d routed layers on %d samples x %d denoising steps", len(records), len(tasks),
                len(state["levels"]))
    return Calibration(layers={i: r.cat() for i, r in records.items()}, embodiment=embodiments, task=tasks,
                       descriptor=torch.cat(descriptors), noise=torch.tensor(state["levels"]))


def _take(batches: Iterable[Mapping[str, Any]], max_samples: int) -> Iterator[Mapping[str, Any]]:
    """Batches until `max_samples` samples are reached (the last one cut to fit)."""
    seen = 0
    for batch in batches:
        b = batch[OBS_STATE].shape[0]
        if b > max_samples - seen:
            b = max_samples - seen
            batch = {k: v[:b] for k, v in batch.items()}
        yield batch
        seen += b
        if seen >= max_samples:
            return


def mixture_batches(policy: torch.nn.Module, spec: str, batch_size: int) -> Iterator[dict[str, Any]]:
    """Evaluation batches (no augmentation) of a mixture file or a single LeRobot dataset, prepared with the
    policy's own normalization statistics and embodiment registry (so a mixture of unknown robots fails here)."""
    from vla.data.mixture import load_mixture, make_dataloader

    if policy.normalizer is None:
        raise ValueError("the policy has no normalization statistics: calibration needs a trained checkpoint")
    cfg = dataclasses.replace(policy.config, data=dataclasses.replace(
        policy.config.data, mixture=str(spec), batch_size=batch_size, num_workers=0, cache_images_gb=0.0,
        augment=False))
    mixture = load_mixture(cfg.data, policy.registry)
    mixture.validate()
    loader = make_dataloader(cfg, mixture, policy.normalizer, train=False)
    while True:  # the loader ends at each epoch; the caller stops after enough samples
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def resolve_data(spec: str | None, policy: torch.nn.Module) -> str:
    """The calibration data: `spec`, or else the mixture the policy was trained on (its config)."""
    spec = spec or policy.config.data.mixture
    if not spec:
        raise ValueError("no calibration data: pass a mixture file or a LeRobot dataset (the checkpoint's config "
                         "names none)")
    if Path(spec).suffix.lower() not in (".yaml", ".yml", ".json") and not Path(spec).exists() and \
            spec.count("/") != 1:
        raise ValueError(f"calibration data '{spec}' is neither a mixture file nor a dataset directory")
    return spec

"""What the loop logs: loss terms averaged over a log interval, a non-finite guard, routing statistics.

Everything accumulates on the device and is read once per `log_every` (reading a GPU value stalls the pipeline),
reduced over processes in one collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; training stopped without saving."""


class LossMeter:
    """Running sums of every loss term over the current log interval, plus the first non-finite step.

    `add` never synchronises with the device; `reduce` does (one collective over all processes).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.grad_count = 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, losses: Mapping[str, torch.Tensor], step: int, grad_norm: torch.Tensor | None = None) -> None:
        """Accumulate one micro-batch's terms; `step` is the optimiser step it belongs to (1-based)."""
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for name, value in losses.items():
            v = value.detach().float()
            if v.dim():
                v = v.mean()
            self.sums[name] = self.sums[name] + v if name in self.sums else v.clone()
            finite = finite & torch.isfinite(v)
        if grad_norm is not None:
            g = grad_norm.detach().float().to(self.device)
            self.sums["grad_norm"] = self.sums["grad_norm"] + g if "grad_norm" in self.sums else g.clone()
            self.grad_count += 1
            finite = finite & torch.isfinite(g)
        self.first_bad = torch.where(~finite & (self.first_bad < 0), step, self.first_bad)
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], int]:
        """Interval means over all processes and the first non-finite step (-1 if none); then reset.

        Every process must call this at the same step with the same loss terms.
        """
        names = sorted(self.sums)
        packed = torch.stack([self.sums[n] for n in names]) if names else torch.zeros(0, device=self.device)
        packed = accelerator.reduce(packed.float(), reduction="mean")
        bad = accelerator.gather(self.first_bad.reshape(1)).tolist()
        values = packed.tolist()
        means = {}
        for n, v in zip(names, values, strict=True):
            means[n] = v / max(self.grad_count if n == "grad_norm" else self.count, 1)
        self.sums, self.count, self.grad_count = {}, 0, 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_steps = [b for b in bad if b >= 0]
        return means, (min(bad_steps) if bad_steps else -1)


def routing_scalars(
    stats: Mapping[str, Any], accelerator: Accelerator, names: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Expert usage of every routed layer (summed over processes) as loggable fractions.

    `stats` is `policy.routing_stats(reset=True)`: {"layers": [{"layer", "kind", "by_embodiment": {descriptor:
    counts (E,)}, ...}], "horizons": {"horizons", "samples", "mean_weight" (k, H)}}. Per layer it gives each
    expert's share of the decisions (`routing/layer2_hb/expert_0`), the load imbalance `max_over_mean` (1 = balanced,
    E = one expert takes everything) and, when several embodiments were seen, each one's shares (`.../<name>/...`,
    `names` maps action-space descriptors to embodiment names). Every process must call this together (the
    statistics are gathered, so processes may have seen different embodiments); only the main process gets values.
    """
    everyone = gather_object([dict(stats)])
    if not accelerator.is_main_process:
        return {}
    names = names or {}
    out: dict[str, float] = {}
    for layers in zip(*(s.get("layers", []) for s in everyone), strict=True):
        tag = f"routing/layer{layers[0]['layer']}_{layers[0]['kind']}"
        per_key: dict[str, torch.Tensor] = {}
        for layer in layers:
            for key, counts in layer.get("by_embodiment", {}).items():
                per_key[key] = per_key.get(key, 0) + torch.as_tensor(counts, dtype=torch.float64)
        if not per_key:
            continue
        out.update(_shares(tag, sum(per_key.values())))
        if len(per_key) > 1:
            for key, counts in per_key.items():
                out.update(_shares(f"{tag}/{names.get(key, key)}", counts, imbalance=False))
    horizons = [s["horizons"] for s in everyone if s.get("horizons", {}).get("samples")]
    if horizons:
        total = sum(h["samples"] for h in horizons)
        mean = sum(torch.as_tensor(h["mean_weight"], dtype=torch.float64) * h["samples"] for h in horizons) / total
        for i, h in enumerate(horizons[0]["horizons"]):
            out[f"routing/horizon_{h}/mean_weight"] = float(mean[i, :h].mean())
    return out


def _shares(tag: str, counts: torch.Tensor, imbalance: bool = True) -> dict[str, float]:
    total = float(counts.sum())
    if total <= 0:
        return {}
    share = counts / total
    out = {f"{tag}/expert_{e}": float(v) for e, v in enumerate(share)}
    if imbalance:
        out[f"{tag}/max_over_mean"] = float(share.max() * len(share))
    return out

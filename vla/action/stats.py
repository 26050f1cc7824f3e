"""Routing statistics: expert-usage histograms of every routed layer and the Mixture-of-Horizons gate weights.

Histograms are kept by embodiment (action-space descriptor), by noise level (training: 10 bins of the noise
fraction, 0 = clean, 1 = pure noise) and by denoising step (sampling). Units: `hb` counts token assignments,
`as`/`nm` count one decision per sample (their routing is token-independent).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from vla.action.moe import DescriptorGroups, RouterRecord

NOISE_BINS = 10


class RoutingStats:
    """Accumulates what the routers and the horizon gate did, on the CPU, until `summary(reset=True)`."""

    def __init__(self, kinds: list[str], num_experts: list[int], horizons: tuple[int, ...], chunk_size: int) -> None:
        self.kinds, self.num_experts = kinds, num_experts
        self.horizons, self.chunk_size = horizons, chunk_size
        self.reset()

    def reset(self) -> None:
        self.by_embodiment: list[dict[str, Tensor]] = [defaultdict(self._zeros(i)) for i in range(len(self.kinds))]
        self.by_noise = [torch.zeros(NOISE_BINS, e, dtype=torch.long) for e in self.num_experts]
        self.by_step: list[dict[int, Tensor]] = [defaultdict(self._zeros(i)) for i in range(len(self.kinds))]
        self.horizon_weight_sum = torch.zeros(len(self.horizons), self.chunk_size, dtype=torch.float64)
        self.horizon_samples = 0

    def _zeros(self, layer: int):
        e = self.num_experts[layer]
        return lambda: torch.zeros(e, dtype=torch.long)

    def record(self, records: list[RouterRecord], groups: DescriptorGroups, noise_fraction: Tensor | None,
               step: int | None) -> None:
        """Add one forward's decisions. noise_fraction: (B,) in [0, 1] (training); step: denoising step index."""
        if not records:
            return
        counts = torch.cat([rec.counts for rec in records], dim=1).detach().cpu()  # one host copy: (B, sum E)
        per_group = torch.zeros(len(groups.keys), counts.shape[1], dtype=torch.long)
        per_group.index_add_(0, groups.inverse.cpu(), counts)
        per_bin = None
        if noise_fraction is not None:
            bins = (noise_fraction.detach().float().cpu() * NOISE_BINS).long().clamp(0, NOISE_BINS - 1)
            per_bin = torch.zeros(NOISE_BINS, counts.shape[1], dtype=torch.long).index_add_(0, bins, counts)
        total = counts.sum(dim=0)
        start = 0
        for rec in records:
            cols = slice(start, start + rec.counts.shape[1])
            start = cols.stop
            for key, row in zip(groups.keys, per_group[:, cols], strict=True):
                self.by_embodiment[rec.layer][key] += row
            if per_bin is not None:
                self.by_noise[rec.layer] += per_bin[:, cols]
            if step is not None:
                self.by_step[rec.layer][step] += total[cols]

    def record_horizons(self, weights: Tensor) -> None:
        """weights: (B, k, H) gate weights of one forward."""
        self.horizon_weight_sum += weights.detach().double().sum(dim=0).cpu()
        self.horizon_samples += weights.shape[0]

    def summary(self) -> dict:
        layers = []
        for i, (kind, e) in enumerate(zip(self.kinds, self.num_experts, strict=True)):
            if kind == "d":
                continue
            layers.append({
                "layer": i,
                "kind": kind,
                "num_experts": e,
                "unit": "tokens" if kind == "hb" else "samples",
                "by_embodiment": {k: v.tolist() for k, v in self.by_embodiment[i].items()},
                "by_noise": {f"{b / NOISE_BINS:.1f}-{(b + 1) / NOISE_BINS:.1f}": row.tolist()
                             for b, row in enumerate(self.by_noise[i]) if row.sum() > 0},
                "by_step": {s: v.tolist() for s, v in sorted(self.by_step[i].items())},
            })
        n = max(self.horizon_samples, 1)
        return {
            "layers": layers,
            "horizons": {
                "horizons": list(self.horizons),
                "samples": self.horizon_samples,
                "mean_weight": (self.horizon_weight_sum / n).tolist(),
            },
        }

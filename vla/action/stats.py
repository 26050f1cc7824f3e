"""Routing statistics: expert-usage histograms of every routed layer and the Mixture-of-Horizons gate weights.

Histograms are kept by embodiment (action-space descriptor), by noise level (training: 10 bins of the noise
fraction, 0 = clean, 1 = pure noise) and by denoising step (sampling). Units: `hb` counts token assignments,
`as`/`nm` count one decision per sample (their routing is token-independent).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import accumulate

import torch
from torch import Tensor

from vla.action.moe import DescriptorGroups, RouterRecord

NOISE_BINS = 10


class RoutingStats:
    """Accumulates what the routers and the horizon gate did, on the CPU, until `summary(reset=True)`.

    Every routed layer owns a slice of one flat row of sum(E) counters, so recording a forward is a handful of
    tensor additions whatever the depth: it runs at every denoising step of every chunk at inference.
    """

    def __init__(self, kinds: list[str], num_experts: list[int], horizons: tuple[int, ...], chunk_size: int) -> None:
        self.kinds, self.num_experts = kinds, num_experts
        self.horizons, self.chunk_size = horizons, chunk_size
        offsets = [0, *accumulate(num_experts)]
        self.columns = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        self.width = offsets[-1]
        self.routed = tuple(i for i, e in enumerate(num_experts) if e > 0)
        self.reset()

    def reset(self) -> None:
        self.by_embodiment: dict[str, Tensor] = defaultdict(self._zeros)
        self.by_noise = torch.zeros(NOISE_BINS, self.width, dtype=torch.long)
        self.by_step: dict[int, Tensor] = defaultdict(self._zeros)
        self.horizon_weight_sum = torch.zeros(len(self.horizons), self.chunk_size, dtype=torch.float64)
        self.horizon_samples = 0

    def _zeros(self) -> Tensor:
        return torch.zeros(self.width, dtype=torch.long)

    def record(self, records: list[RouterRecord], groups: DescriptorGroups, noise_fraction: Tensor | None,
               step: int | None) -> None:
        """Add one forward's decisions. noise_fraction: (B,) in [0, 1] (training); step: denoising step index."""
        if not records:
            return
        if tuple(rec.layer for rec in records) != self.routed:
            raise ValueError(f"RoutingStats: expected one record per routed layer {self.routed}, got layers "
                             f"{[rec.layer for rec in records]}")
        counts = torch.cat([rec.counts for rec in records], dim=1).detach().cpu()  # one host copy: (B, sum E)
        per_group = torch.zeros(len(groups.keys), self.width, dtype=torch.long)
        per_group.index_add_(0, groups.inverse.cpu(), counts)
        for key, row in zip(groups.keys, per_group, strict=True):
            self.by_embodiment[key] += row
        if noise_fraction is not None:
            bins = (noise_fraction.detach().float().cpu() * NOISE_BINS).long().clamp(0, NOISE_BINS - 1)
            self.by_noise.index_add_(0, bins, counts)
        if step is not None:
            self.by_step[step] += counts.sum(dim=0)

    def record_horizons(self, weights: Tensor) -> None:
        """weights: (B, k, H) gate weights of one forward."""
        self.horizon_weight_sum += weights.detach().double().sum(dim=0).cpu()
        self.horizon_samples += weights.shape[0]

    def summary(self) -> dict:
        layers = []
        for i in self.routed:
            cols = self.columns[i]
            layers.append({
                "layer": i,
                "kind": self.kinds[i],
                "num_experts": self.num_experts[i],
                "unit": "tokens" if self.kinds[i] == "hb" else "samples",
                "by_embodiment": _nonzero_rows(self.by_embodiment.items(), cols),
                "by_noise": _nonzero_rows(((f"{b / NOISE_BINS:.1f}-{(b + 1) / NOISE_BINS:.1f}", row)
                                           for b, row in enumerate(self.by_noise)), cols),
                "by_step": _nonzero_rows(sorted(self.by_step.items()), cols),
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


def _nonzero_rows(rows, cols: slice) -> dict:
    """{key: counts[cols] as a list} for the rows in which this layer recorded anything."""
    return {key: row[cols].tolist() for key, row in rows if row[cols].sum() > 0}

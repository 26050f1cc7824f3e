"""Mixture of Horizons: one action chunk read at several horizons in one pass, fused by a per-token gate.

The transformer's own token sequence is packed as

    [state, noise | a_0 .. a_{h1-1} | a_0 .. a_{h2-1} | ... | a_0 .. a_{hk-1}]

and a block mask keeps the horizons apart: every action token attends to the prefix, the state and noise tokens
and the action tokens of its own horizon; state and noise tokens attend only to the prefix and to each other, so
they are shared by all horizons (pi0's block-causal layout). Each horizon therefore sees exactly what a head
trained on a chunk of that length would see, all k of them in ONE forward of sum(h) + 2 tokens.

A linear gate scores every action token (horizon i, step j); a softmax over the horizons that cover step j
(h_i > j) gives the weights that fuse the horizons' predictions. Training adds the per-horizon losses and a balance
term that keeps the gate from collapsing onto one horizon. At inference the horizons' disagreement decides how many
actions can be executed (`consensus_execute`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor, nn

from vla.config import HorizonConfig

NUM_CONTEXT_TOKENS = 2
"""State and noise tokens in front of the action tokens (1, the state token alone, when the flow time is fused into
each action token: `ActionConfig.time_fusion="action_mlp"`)."""

GATE_NOISE_FLOOR = 1e-2
"""Smallest standard deviation of the training-time gate noise (softplus(W h) + this), as in the reference."""


@dataclass(frozen=True)
class HorizonLayout:
    """Where every horizon's action tokens sit in the packed sequence (N = sum of horizons).

    Attributes:
        horizons: (h1, ..., hk) increasing.
        chunk_size: H.
        position: (N,) long, chunk step of each packed action token.
        block: (N,) long, horizon index of each packed action token.
        self_mask: (T, T) bool with T = N + context: which of the transformer's own tokens each token may attend to.
        coverage: (k, H) bool, horizon i predicts step j.
        context: shared tokens in front of the action tokens (state, and noise unless time is fused).
    """

    horizons: tuple[int, ...]
    chunk_size: int
    position: Tensor
    block: Tensor
    self_mask: Tensor
    coverage: Tensor
    context: int = NUM_CONTEXT_TOKENS

    @classmethod
    def build(cls, horizons: tuple[int, ...], chunk_size: int, device: torch.device | str | None = None,
              context: int = NUM_CONTEXT_TOKENS) -> HorizonLayout:
        if not horizons or list(horizons) != sorted(set(horizons)) or horizons[0] < 1 or horizons[-1] > chunk_size:
            raise ValueError(f"horizons must be strictly increasing in [1, {chunk_size}], got {horizons}")
        position = torch.cat([torch.arange(h) for h in horizons])
        block = torch.cat([torch.full((h,), i) for i, h in enumerate(horizons)])
        c = context
        group = torch.cat([torch.full((c,), -1), block])  # -1: context tokens
        is_action = group >= 0
        # action tokens: context + own block; context tokens: context only
        self_mask = (group[:, None] == group[None, :]) | ~is_action[None, :]
        coverage = torch.arange(chunk_size)[None, :] < torch.tensor(horizons)[:, None]
        return cls(tuple(horizons), chunk_size, position.to(device), block.to(device), self_mask.to(device),
                   coverage.to(device), context)

    @property
    def num_horizons(self) -> int:
        return len(self.horizons)

    @property
    def num_tokens(self) -> int:
        """Own tokens of the transformer: the context tokens and every horizon's action tokens."""
        return self.context + int(self.position.numel())

    def to_grid(self, packed: Tensor) -> Tensor:
        """(B, N, ...) packed per-token values -> (B, k, H, ...) with zeros where a horizon does not reach."""
        b, k, h = packed.shape[0], self.num_horizons, self.chunk_size
        flat = self.block * h + self.position
        grid = packed.new_zeros(b, k * h, *packed.shape[2:]).index_copy(1, flat, packed)
        return grid.view(b, k, h, *packed.shape[2:])


@dataclass
class HorizonFusion:
    """The fused chunk and what it was made of.

    Attributes:
        actions: (B, H, A) fused prediction (the head's output for this step).
        per_horizon: (B, k, H, A) each horizon's prediction, zero beyond its horizon.
        weights: (B, k, H) gate weights, a distribution over the horizons covering each step (zero elsewhere).
    """

    actions: Tensor
    per_horizon: Tensor
    weights: Tensor


class MixtureOfHorizons(nn.Module):
    """Packed-horizon layout (buffers), the fusion gate and the MoH losses.

    With a single horizon (the chunk) there is no gate and `fuse` is the identity, so the head is exactly the
    plain head: same parameters, same outputs.
    """

    def __init__(self, cfg: HorizonConfig, chunk_size: int, width: int, context: int = NUM_CONTEXT_TOKENS) -> None:
        super().__init__()
        self.cfg = cfg
        self.horizons = tuple(cfg.horizons) or (chunk_size,)
        layout = HorizonLayout.build(self.horizons, chunk_size, context=context)
        self.chunk_size, self.context = chunk_size, context
        for name in ("position", "block", "self_mask", "coverage"):
            self.register_buffer(name, getattr(layout, name), persistent=False)
        self.gate = nn.Linear(width, 1) if len(self.horizons) > 1 else None
        self.gate_noise = nn.Linear(width, 1) if self.gate is not None and cfg.gate_noise else None

    @property
    def num_horizons(self) -> int:
        return len(self.horizons)

    @property
    def layout(self) -> HorizonLayout:
        return HorizonLayout(self.horizons, self.chunk_size, self.position, self.block, self.self_mask,
                             self.coverage, self.context)

    def fuse(self, hidden: Tensor, pred: Tensor) -> HorizonFusion:
        """hidden: (B, N, D) final action-token states, pred: (B, N, A) per-token predictions -> HorizonFusion."""
        layout = self.layout
        per_horizon = layout.to_grid(pred)
        if self.gate is None:
            ones = torch.ones(pred.shape[0], 1, self.chunk_size, dtype=pred.dtype, device=pred.device)
            return HorizonFusion(actions=pred, per_horizon=per_horizon, weights=ones)
        logits = self.gate(hidden).squeeze(-1).float()  # (B, N)
        if self.gate_noise is not None and self.training:  # learnable exploration noise, training only
            std = F.softplus(self.gate_noise(hidden).squeeze(-1).float()) + GATE_NOISE_FLOOR
            logits = logits + torch.randn_like(logits) * std
        logits = layout.to_grid(logits).masked_fill(~self.coverage, float("-inf"))  # (B, k, H)
        weights = logits.softmax(dim=1).to(pred.dtype)
        actions = einsum(weights, per_horizon, "b k h, b k h a -> b h a")
        return HorizonFusion(actions=actions, per_horizon=per_horizon, weights=weights)

    def horizon_loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Sum over horizons of each horizon's masked MSE on its own first h steps.

        pred: (B, N, A) packed predictions; target: (B, H, A); mask: (B, H, A) bool.
        """
        t = target.index_select(1, self.position)
        m = mask.index_select(1, self.position).to(pred.dtype)
        err = ((pred - t) ** 2 * m).sum(dim=(0, 2))  # (N,)
        cnt = m.sum(dim=(0, 2))
        k = self.num_horizons
        err_h = err.new_zeros(k).index_add(0, self.block, err)
        cnt_h = cnt.new_zeros(k).index_add(0, self.block, cnt)
        return (err_h / cnt_h.clamp_min(1.0)).sum()

    def balance_loss(self, weights: Tensor) -> Tensor:
        """Keeps the gate from collapsing; weights: (B, k, H).

        "coverage": for each step j, c_j * sum_i mean_b(w_ij)^2 averaged over steps, with c_j the number of
        horizons covering step j: 1 when the batch-mean weights are uniform over the covering horizons and c_j when
        one horizon takes everything. "segment_cv" (reference): for each segment [h_{i-1}, h_i) of steps (h_0 = 0)
        with more than one active horizon, the squared coefficient of variation var/mean^2 (unbiased variance) of
        the active horizons' mean gate weight over the batch and the segment's steps; averaged over segments.
        """
        if self.cfg.balance_form == "coverage":
            mean_w = weights.float().mean(dim=0)  # (k, H)
            cover = self.coverage.sum(dim=0).to(mean_w.dtype)  # (H,)
            return (cover * (mean_w**2).sum(dim=0)).mean()
        terms = []
        for start, end in zip((0, *self.horizons[:-1]), self.horizons, strict=True):
            active = [i for i, h in enumerate(self.horizons) if h > start]
            if len(active) > 1:
                mean_w = weights[:, active, start:end].float().mean(dim=(0, 2))  # (n_active,)
                terms.append(mean_w.var() / (mean_w.mean() ** 2 + 1e-10))
        return torch.stack(terms).mean()

    def disagreement(self, per_horizon: Tensor, fused: Tensor, action_mask: Tensor) -> Tensor:
        """Mean absolute difference between each covering horizon and the fused chunk, per step.

        per_horizon: (B, k, H, A), fused: (B, H, A), action_mask: (B, A) bool -> (B, H); steps covered by fewer
        than two horizons get +inf (no evidence of agreement).
        """
        m = action_mask.to(fused.dtype)[:, None, None, :]
        diff = ((per_horizon - fused[:, None]).abs() * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (B, k, H)
        cover = self.coverage.to(fused.dtype)
        count = cover.sum(dim=0)  # (H,)
        d = (diff * cover).sum(dim=1) / count.clamp_min(1.0)
        return d.masked_fill(count < 2, float("inf"))


    def step_disagreement(self, per_horizon: Tensor, fused: Tensor, weights: Tensor, step_fraction: float,
                          action_mask: Tensor) -> Tensor:
        """The reference's per-denoising-step disagreement: gate-weighted L1 distance between each horizon's and
        the fused one-Euler-step update, per chunk step.

        A first-order step from noise level s to s' moves x towards the denoised estimate D by the fraction
        (1 - s'/s) for flow matching and EDM alike, so two updates differ by (1 - s'/s) (D_h - D_fused).

        per_horizon: (B, k, H, A) denoised estimates; fused: (B, H, A); weights: (B, k, H) gate weights (zero where
        a horizon does not reach); step_fraction: 1 - s'/s; action_mask: (B, A) bool -> (B, H).
        """
        m = action_mask.to(fused.dtype)[:, None, None, :]
        l1 = ((per_horizon - fused[:, None]).abs() * m).sum(-1) * abs(step_fraction)  # (B, k, H)
        return (l1 * weights.to(l1.dtype)).sum(dim=1)


def relative_execute(disagreement: Tensor, cfg: HorizonConfig, coverage: Tensor) -> Tensor:
    """The reference's dynamic-inference rule, per sample: threshold = scale_ratio * mean disagreement of the first
    min_replan_steps steps; execute those steps plus each following step whose disagreement is below the
    threshold, stopping at the first step above it or covered by at most min_active_horizons horizons; capped by
    max_execute (0 = no cap).

    disagreement: (B, H) summed over the denoising steps (`step_disagreement`); coverage: (k, H) bool -> (B,) long.
    """
    b, h = disagreement.shape
    m = cfg.min_replan_steps
    threshold = disagreement[:, :m].mean(dim=1, keepdim=True) * cfg.scale_ratio  # (B, 1)
    ok = (disagreement < threshold) & (coverage.sum(dim=0) > cfg.min_active_horizons)[None, :]
    run = ok[:, m:].long().cumprod(dim=1).sum(dim=1)
    upper = cfg.max_execute or h
    return (run + m).clamp(max=upper)


def consensus_execute(disagreement: Tensor, cfg: HorizonConfig, chunk_size: int) -> Tensor:
    """How many actions of each fused chunk to execute: the length of the leading run of steps whose cross-horizon
    disagreement is at most `cfg.agreement_threshold`, clamped to [min_execute, max_execute or chunk_size].

    disagreement: (B, H) -> (B,) long.
    """
    agree = (disagreement <= cfg.agreement_threshold).long()
    run = agree.cumprod(dim=1).sum(dim=1)
    upper = cfg.max_execute or chunk_size
    return run.clamp(min=cfg.min_execute, max=upper)


"""ActionHead: the action transformer with its objective, Mixture of Horizons, expert cache and routing statistics.

This is the only class the policy talks to:

    head = ActionHead(action_cfg, objective_cfg, prefix_width=..., prefix_layers=None, action_dim=A, state_dim=S)
    losses = head.compute_loss(prefix, state, state_mask, actions, action_mask, action_is_pad)
    losses["loss"].backward()
    out = head.sample(prefix, state, state_mask, action_mask)      # out.actions (B, H, A), out.num_execute (B,)
    head.routing_stats(reset=True)

All action tensors are in the normalized unified space; masked action dims are ignored by the loss and zero in
the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vla.action.horizons import MixtureOfHorizons, consensus_execute, relative_execute
from vla.action.moe import (
    ExpertCache,
    RouterRecord,
    Routing,
    action_space_contrastive_loss,
    action_space_token_loss,
    load_balance_loss,
    router_z_loss,
    selected_balance_loss,
)
from vla.action.objectives import make_objective, masked_mse
from vla.action.stats import RoutingStats
from vla.action.transformer import ActionTransformer
from vla.config import ActionConfig, ObjectiveConfig
from vla.prefix import Prefix


@dataclass
class ActionSample:
    """What `ActionHead.sample` returns.

    Attributes:
        actions: (B, H, A) normalized action chunk (masked dims are zero). With Mixture of Horizons it is the
            gate-fused chunk.
        num_execute: (B,) long, how many actions of the chunk to execute before the next model call: decided by
            cross-horizon consensus when `moh.dynamic` is on and there are several horizons, else n_action_steps.
        horizon_actions: (B, k, H, A) each horizon's denoised estimate at the last denoising step, zero beyond its
            horizon (None with a single horizon).
        horizon_weights: (B, k, H) gate weights at the last denoising step (None with a single horizon).
        disagreement: (B, H) cross-horizon disagreement per step (None with a single horizon). With the
            "absolute" rule: averaged over the denoising steps, +inf where fewer than two horizons predict the
            step; with the "relative" rule: the reference's gate-weighted one-step L1, summed over the steps.
    """

    actions: Tensor
    num_execute: Tensor
    horizon_actions: Tensor | None = None
    horizon_weights: Tensor | None = None
    disagreement: Tensor | None = None


class ActionHead(nn.Module):
    """Action transformer + objective. See the module docstring for the call pattern.

    Args:
        action_cfg: transformer, layer pattern, experts, Mixture of Horizons.
        objective_cfg: flow matching or EDM, sampler and steps.
        prefix_width: width of the prefix tokens (and of every per-layer prefix state).
        prefix_layers: number of per-layer prefix states when the backbone is layerwise, else None.
        action_dim, state_dim: unified action / state sizes.
    """

    def __init__(self, action_cfg: ActionConfig, objective_cfg: ObjectiveConfig, *, prefix_width: int,
                 prefix_layers: int | None, action_dim: int, state_dim: int) -> None:
        super().__init__()
        action_cfg.validate()
        objective_cfg.validate()
        for name, value in (("prefix_width", prefix_width), ("action_dim", action_dim), ("state_dim", state_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ActionHead: {name} must be a positive int, got {value!r}")
        if prefix_layers is not None and (not isinstance(prefix_layers, int) or prefix_layers <= 0):
            raise ValueError(f"ActionHead: prefix_layers must be None or a positive int, got {prefix_layers!r}")
        self.cfg, self.objective_cfg = action_cfg, objective_cfg
        self.action_dim, self.state_dim, self.prefix_width = action_dim, state_dim, prefix_width
        self.transformer = ActionTransformer(action_cfg, prefix_width=prefix_width, prefix_layers=prefix_layers,
                                             action_dim=action_dim, state_dim=state_dim)
        self.horizons = MixtureOfHorizons(action_cfg.moh, action_cfg.chunk_size, action_cfg.width,
                                          context=self.transformer.context)
        self.objective = make_objective(objective_cfg)
        self.expert_cache = ExpertCache()
        kinds = action_cfg.layer_kinds
        self.stats = RoutingStats(kinds, [self._num_experts(k) for k in kinds], self.horizons.horizons,
                                  action_cfg.chunk_size)
        self.register_load_state_dict_post_hook(lambda module, keys: module.expert_cache.clear())

    def _num_experts(self, kind: str) -> int:
        return 0 if kind == "d" else getattr(self.cfg, f"{kind}_num_experts")

    def train(self, mode: bool = True) -> ActionHead:
        self.expert_cache.clear()
        return super().train(mode)

    @property
    def has_cacheable_layers(self) -> bool:
        return any(k in ("as", "nm") for k in self.cfg.layer_kinds)

    # ---- training ----
    def compute_loss(self, prefix: Prefix, state: Tensor, state_mask: Tensor, actions: Tensor, action_mask: Tensor,
                     action_is_pad: Tensor, *, noise: Tensor | None = None, time: Tensor | None = None
                     ) -> dict[str, Tensor]:
        """Training losses for one batch.

        Args:
            prefix: backbone output (tokens (B, P, prefix_width), mask (B, P)).
            state, state_mask: (B, S) normalized state and its valid slots.
            actions: (B, H, A) normalized target chunk; action_mask: (B, A) bool valid dims (also the
                action-space descriptor); action_is_pad: (B, H) bool steps past the episode end.
            noise: optional (B, H, A) noise; time: optional (B,) flow time t or EDM sigma (for reproducible tests).
        Returns:
            "loss" (the weighted total to backpropagate), "action_loss" (masked MSE of the head's output chunk,
            which is the fused chunk under Mixture of Horizons) and every auxiliary term unweighted: "hb_balance",
            "nm_balance", "as_reg", "router_z" (if router_z_weight > 0), "moh_mix" (= action_loss), "moh_horizons",
            "moh_balance" -- those that apply to the configured layers.
        """
        self._check_inputs(prefix, state, state_mask, action_mask, actions=actions, action_is_pad=action_is_pad,
                           noise=noise, time=time)
        b = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise
        time = self.objective.sample_time(b, actions.device) if time is None else time
        noisy = self.objective.noisy_actions(actions, noise, time)
        cond = self.transformer.condition(prefix, state, state_mask, action_mask)
        out = self.transformer(noisy.model_input, noisy.level, cond, self.horizons.layout)
        fusion = self.horizons.fuse(out.hidden, out.pred)
        mask = action_mask.bool()[:, None, :] & ~action_is_pad.bool()[:, :, None]

        losses: dict[str, Tensor] = {"action_loss": masked_mse(fusion.actions, noisy.target, mask)}
        total = losses["action_loss"]
        if self.horizons.num_horizons > 1:
            losses["moh_mix"] = losses["action_loss"]
            losses["moh_horizons"] = self.horizons.horizon_loss(out.pred, noisy.target, mask)
            losses["moh_balance"] = self.horizons.balance_loss(fusion.weights)
            total = total + losses["moh_horizons"] + self.cfg.moh.balance_weight * losses["moh_balance"]
        for name, (value, weight) in self._router_losses(out.records, cond.descriptor, b).items():
            losses[name] = value
            total = total + weight * value
        losses["loss"] = total
        if self.cfg.track_routing:
            self.stats.record(out.records, cond.groups, self.objective.noise_fraction(noisy.level), step=None)
            if self.horizons.num_horizons > 1:
                self.stats.record_horizons(fusion.weights)
        return losses

    def _router_losses(self, records: list[RouterRecord], descriptor: Tensor, batch: int
                       ) -> dict[str, tuple[Tensor, float]]:
        """Auxiliary router losses combined over the layers of each kind, with their config weights.

        `loss_layer_reduction="mean"` averages every kind over its layers. "reference" follows the papers' code:
        HiMoE adds each HB / AS layer's weighted loss to the total (a sum over layers), MoDE averages its load
        balance over the layers (and the z-loss, which MoDE also averages).
        """
        cfg = self.cfg
        terms: dict[str, list[Tensor]] = {"hb_balance": [], "nm_balance": [], "as_reg": [], "router_z": []}
        for rec in records:
            r = rec.routing
            if rec.kind == "hb":
                terms["hb_balance"].append(load_balance_loss(r.probs.view(batch, -1, r.probs.shape[-1]),
                                                             r.index.view(batch, -1, r.index.shape[-1])))
            elif rec.kind == "nm":
                terms["nm_balance"].append(self._nm_balance(r, batch))
            elif cfg.as_reg_form == "token":
                terms["as_reg"].append(action_space_token_loss(r.probs, descriptor, cfg.as_reg_temperature,
                                                               rec.tokens))
            else:
                terms["as_reg"].append(action_space_contrastive_loss(r.probs, descriptor, cfg.as_reg_temperature))
            if cfg.router_z_weight > 0:
                terms["router_z"].append(router_z_loss(r.logits))
        weights = {"hb_balance": cfg.hb_balance_weight, "nm_balance": cfg.nm_balance_weight,
                   "as_reg": cfg.as_reg_weight, "router_z": cfg.router_z_weight}
        summed = {"hb_balance", "as_reg"} if cfg.loss_layer_reduction == "reference" else set()
        return {name: (torch.stack(vals).sum() if name in summed else torch.stack(vals).mean(), weights[name])
                for name, vals in terms.items() if vals}

    def _nm_balance(self, r: Routing, batch: int) -> Tensor:
        """One `nm` layer's load balance over the batch. Rows are samples, or tokens when each token drew its own
        experts (multinomial selection in training): then every token counts, with its sample's probabilities."""
        rows = r.index.shape[0]
        if self.cfg.nm_balance_form == "mode":
            return selected_balance_loss(r.weights, r.index, r.probs.shape[-1])
        probs = r.probs.repeat_interleave(rows // batch, dim=0) if rows != batch else r.probs
        return load_balance_loss(probs[None], r.index[None])

    # ---- inference ----
    @torch.no_grad()
    def sample(self, prefix: Prefix, state: Tensor, state_mask: Tensor, action_mask: Tensor, *,
               noise: Tensor | None = None, use_expert_cache: bool | None = None) -> ActionSample:
        """Denoise one action chunk per sample with the configured diffusers scheduler.

        The prefix is projected to keys/values once and reused at every step. In eval mode with
        `expert_cache` on (or `use_expert_cache=True`), `as`/`nm` layers run as cached fused dense MLPs;
        `use_expert_cache=False` forces the general routed path (the same numbers to 1e-5).

        Args:
            prefix, state, state_mask, action_mask: as in `compute_loss`.
            noise: optional (B, H, A) initial noise (unit variance; EDM scales it by the scheduler's sigma).
        """
        self._check_inputs(prefix, state, state_mask, action_mask, noise=noise)
        b, h, a = state.shape[0], self.cfg.chunk_size, self.action_dim
        if noise is None:
            noise = torch.randn(b, h, a, device=state.device, dtype=torch.float32)
        use_cache = self.cfg.expert_cache if use_expert_cache is None else use_expert_cache
        cache = None
        if use_cache and not self.training and self.has_cacheable_layers:
            self.expert_cache.validate(self)
            cache = self.expert_cache

        cond = self.transformer.condition(prefix, state, state_mask, action_mask)
        layout, moh = self.horizons.layout, self.horizons.num_horizons > 1
        sched = self.objective.scheduler(self.objective_cfg.num_inference_steps, device=state.device)
        x = self.objective.initial_sample(noise.float(), sched)
        disagreement = torch.zeros(b, h, device=state.device)
        relative = self.cfg.moh.dynamic_rule == "relative"
        fusion = estimates = None
        for i, t in enumerate(sched.timesteps):
            x_in, level = self.objective.model_input(sched, x, t, i)
            level = level.reshape(()).expand(b)
            plan = None if cache is None else self.transformer.plan_step(level, (self.objective.kind, float(level[0])),
                                                                         cond, cache)
            out = self.transformer(x_in, level, cond, layout, plan=plan)
            fusion = self.horizons.fuse(out.hidden, out.pred)
            if moh:
                estimates = self.objective.denoised(sched, x[:, None], fusion.per_horizon, i)
                fused = self.objective.denoised(sched, x, fusion.actions, i)
                if relative:
                    sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
                    disagreement += self.horizons.step_disagreement(estimates, fused, fusion.weights,
                                                                    1.0 - sigma_next / sigma, action_mask.bool())
                else:
                    disagreement += self.horizons.disagreement(estimates, fused, action_mask.bool())
            if self.cfg.track_routing:
                self.stats.record(out.records, cond.groups, None, step=i)
                if moh:
                    self.stats.record_horizons(fusion.weights)
            x = sched.step(fusion.actions, t, x).prev_sample

        keep = action_mask.to(x.dtype)[:, None, :]
        result = ActionSample(actions=x * keep,
                              num_execute=torch.full((b,), self.cfg.n_action_steps, dtype=torch.long,
                                                     device=x.device))
        if moh:
            result.disagreement = disagreement if relative else disagreement / len(sched.timesteps)
            result.horizon_weights = fusion.weights
            result.horizon_actions = estimates * keep[:, None] * self.horizons.coverage[None, :, :, None]
            if self.cfg.moh.dynamic:
                result.num_execute = (relative_execute(result.disagreement, self.cfg.moh, self.horizons.coverage)
                                      if relative else consensus_execute(result.disagreement, self.cfg.moh, h))
        return result

    # ---- statistics ----
    def routing_stats(self, reset: bool = False) -> dict:
        """Per routed layer: expert-usage histograms by embodiment descriptor ("by_embodiment"), by training
        noise level ("by_noise", 10 bins of the noise fraction) and by denoising step ("by_step"); plus the mean
        Mixture-of-Horizons gate weight per (horizon, step) ("horizons"). `reset` clears them after reading."""
        summary = self.stats.summary()
        if reset:
            self.stats.reset()
        return summary

    # ---- validation ----
    def _check_inputs(self, prefix: Prefix, state: Tensor, state_mask: Tensor, action_mask: Tensor, *,
                      actions: Tensor | None = None, action_is_pad: Tensor | None = None,
                      noise: Tensor | None = None, time: Tensor | None = None) -> None:
        b = state.shape[0] if state.dim() == 2 else None
        h, a, s = self.cfg.chunk_size, self.action_dim, self.state_dim
        p = prefix.tokens.shape[1] if prefix.tokens.dim() == 3 else None
        expected = {
            "state": (state, (b, s)),
            "state_mask": (state_mask, (b, s)),
            "action_mask": (action_mask, (b, a)),
            "prefix.tokens": (prefix.tokens, (b, p, self.prefix_width)),
            "prefix.mask": (prefix.mask, (b, p)),
            "actions": (actions, (b, h, a)),
            "action_is_pad": (action_is_pad, (b, h)),
            "noise": (noise, (b, h, a)),
            "time": (time, (b,)),
        }
        for j, layer in enumerate(prefix.layers or []):
            expected[f"prefix.layers[{j}]"] = (layer, (b, p, self.prefix_width))
        for name, (tensor, shape) in expected.items():
            if tensor is not None and (b is None or tuple(tensor.shape) != shape):
                raise ValueError(f"ActionHead: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                                 f"(B, P, H={h}, A={a}, S={s}, prefix_width={self.prefix_width})")

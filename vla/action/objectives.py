"""Training targets and samplers: flow matching and EDM diffusion, both sampled with diffusers schedulers.

Both objectives present the same small interface to the head, so the head's training and sampling code has one
path:

    training:  noisy = objective.noisy_actions(actions, noise, time)       # net(noisy.model_input, noisy.level)
               loss  = masked_mse(net_output, noisy.target, mask)
    sampling:  sched = objective.scheduler()
               x = objective.initial_sample(noise, sched)
               for i, t in enumerate(sched.timesteps):
                   x_in, level = objective.model_input(sched, x, t, i)
                   x = sched.step(net(x_in, level), t, x).prev_sample

Flow matching (pi0 convention): t = 1 is noise, t = 0 data, x_t = t * noise + (1 - t) * x, the net predicts
u = noise - x, t ~ Beta(a, b) rescaled to [time_min, 1]. The level fed to the net is t (the scheduler's sigma).

EDM (Karras et al.): x_sigma = x + sigma * noise with log sigma ~ N(p_mean, p_std^2) (or MoDE's truncated
log-logistic density). The net sees c_in * x_sigma
and c_noise = log(sigma) / 4 and outputs a raw F; the denoised estimate is c_skip * x_sigma + c_out * F. Training
uses the scheduler's own `precondition_inputs` / `precondition_noise` / `precondition_outputs`, so training and
sampling cannot drift apart; regressing F onto (x - c_skip x_sigma) / c_out is EDM's loss weight
lambda(sigma) = 1 / c_out^2 applied to the denoised error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from vla.config import ObjectiveConfig


@dataclass
class NoisyActions:
    """One training draw.

    Attributes:
        model_input: (B, H, A) what the net sees in place of the actions.
        level: (B,) the noise-level conditioning (flow: t; EDM: c_noise).
        target: (B, H, A) what the net output is regressed onto.
    """

    model_input: Tensor
    level: Tensor
    target: Tensor


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the True entries of `mask` (same shape as pred); 0 when nothing is valid."""
    m = mask.to(pred.dtype)
    return (F.mse_loss(pred, target, reduction="none") * m).sum() / m.sum().clamp_min(1.0)


class FlowMatching:
    """pi0-style flow matching; samplers: FlowMatchEulerDiscreteScheduler (uniform Euler steps t = 1, 1 - 1/N, ...,
    1/N -> 0) or DPM-Solver++ with flow sigmas."""

    kind = "flow"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg
        self._beta = torch.distributions.Beta(torch.tensor(cfg.time_beta_a), torch.tensor(cfg.time_beta_b))
        if cfg.sampler == "euler":
            self._template: SchedulerMixin = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        else:
            self._template = DPMSolverMultistepScheduler(
                num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                solver_order=2, algorithm_type="dpmsolver++",
            )

    # ---- training ----
    def sample_time(self, batch: int, device: torch.device) -> Tensor:
        """(B,) t ~ Beta(a, b) rescaled to [time_min, 1]."""
        t = self._beta.sample((batch,)).to(device)
        return t * (1.0 - self.cfg.time_min) + self.cfg.time_min

    def noisy_actions(self, actions: Tensor, noise: Tensor, time: Tensor) -> NoisyActions:
        t = time.to(actions.dtype)[:, None, None]
        return NoisyActions(model_input=t * noise + (1.0 - t) * actions, level=time.to(actions.dtype),
                            target=noise - actions)

    def noise_fraction(self, level: Tensor) -> Tensor:
        """Map the net's level to [0, 1] (0 = clean, 1 = pure noise), for routing statistics."""
        return level.clamp(0.0, 1.0)

    # ---- sampling ----
    def scheduler(self, num_steps: int, device: torch.device | None = None) -> SchedulerMixin:
        """A fresh scheduler with its timesteps set (schedulers are stateful: one per rollout)."""
        sched = copy.deepcopy(self._template)
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps).tolist(), device=device)
        else:
            sched.set_timesteps(num_steps, device=device)
        return sched

    def initial_sample(self, noise: Tensor, sched: SchedulerMixin) -> Tensor:
        return noise

    def model_input(self, sched: SchedulerMixin, x: Tensor, t: Tensor, i: int) -> tuple[Tensor, Tensor]:
        return x, sched.sigmas[i].to(device=x.device, dtype=x.dtype)

    def denoised(self, sched: SchedulerMixin, x: Tensor, out: Tensor, i: int) -> Tensor:
        """x0 estimate from the net output at step i: x - sigma * (noise - x0)."""
        return x - sched.sigmas[i].to(device=x.device, dtype=x.dtype) * out


class EDMDiffusion:
    """EDM diffusion with Karras preconditioning; samplers: EDMEulerScheduler, second-order
    EDMDPMSolverMultistepScheduler, or its first order (DDIM: x' = (s'/s) x + (1 - s'/s) D(x)); sigmas on the
    Karras or the exponential schedule."""

    kind = "edm"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg
        kwargs = {"sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "sigma_data": cfg.sigma_data,
                  "sigma_schedule": cfg.sigma_schedule, "rho": cfg.rho, "prediction_type": "epsilon"}
        if cfg.sampler == "euler":
            self._template: SchedulerMixin = EDMEulerScheduler(**kwargs)
        else:
            self._template = EDMDPMSolverMultistepScheduler(**kwargs, solver_order=1 if cfg.sampler == "ddim" else 2,
                                                            algorithm_type="dpmsolver++")

    # ---- training ----
    def sample_time(self, batch: int, device: torch.device) -> Tensor:
        """(B,) training sigmas: log sigma ~ N(p_mean, p_std^2), or the truncated log-logistic density (inverse
        CDF of a uniform draw between the CDF values of sigma_min and sigma_max, in float64)."""
        cfg = self.cfg
        if cfg.sigma_density == "lognormal":
            return (torch.randn(batch) * cfg.p_std + cfg.p_mean).exp().to(device)
        loc, scale = math.log(cfg.sigma_data), cfg.loglogistic_scale
        lo = torch.tensor((math.log(cfg.sigma_min) - loc) / scale, dtype=torch.float64).sigmoid()
        hi = torch.tensor((math.log(cfg.sigma_max) - loc) / scale, dtype=torch.float64).sigmoid()
        u = torch.rand(batch, dtype=torch.float64) * (hi - lo) + lo
        return (u.logit() * scale + loc).exp().float().to(device)

    def noisy_actions(self, actions: Tensor, noise: Tensor, time: Tensor) -> NoisyActions:
        sched = self._template
        sigma = time.to(actions.dtype)[:, None, None]
        x_sigma = actions + sigma * noise
        skip = sched.precondition_outputs(x_sigma, torch.zeros_like(x_sigma), sigma)  # c_skip * x_sigma
        c_out = sched.precondition_outputs(torch.zeros_like(sigma), torch.ones_like(sigma), sigma)
        return NoisyActions(
            model_input=sched.precondition_inputs(x_sigma, sigma),
            level=sched.precondition_noise(time.to(actions.dtype)),
            target=(actions - skip) / c_out,
        )

    def noise_fraction(self, level: Tensor) -> Tensor:
        """c_noise = log(sigma) / 4 mapped to [0, 1] over [log sigma_min, log sigma_max]."""
        lo, hi = math.log(self.cfg.sigma_min), math.log(self.cfg.sigma_max)
        return ((4.0 * level - lo) / (hi - lo)).clamp(0.0, 1.0)

    # ---- sampling ----
    def scheduler(self, num_steps: int, device: torch.device | None = None) -> SchedulerMixin:
        sched = copy.deepcopy(self._template)
        sched.set_timesteps(num_steps, device=device)
        return sched

    def initial_sample(self, noise: Tensor, sched: SchedulerMixin) -> Tensor:
        return noise * sched.init_noise_sigma

    def model_input(self, sched: SchedulerMixin, x: Tensor, t: Tensor, i: int) -> tuple[Tensor, Tensor]:
        return sched.scale_model_input(x, t), t.to(device=x.device, dtype=x.dtype)

    def denoised(self, sched: SchedulerMixin, x: Tensor, out: Tensor, i: int) -> Tensor:
        return sched.precondition_outputs(x, out, sched.sigmas[i].to(device=x.device, dtype=x.dtype))


Objective = FlowMatching | EDMDiffusion


def make_objective(cfg: ObjectiveConfig) -> Objective:
    cfg.validate()
    return FlowMatching(cfg) if cfg.kind == "flow" else EDMDiffusion(cfg)

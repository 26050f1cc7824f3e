"""The action transformer: [state, noise, action tokens] attending to the backbone's prefix.

Token layout (see horizons.py for the packing of several horizons):

    prefix (P tokens, keys/values only)  |  state  noise  |  a_0 ... a_{H-1}

- The prefix never attends to anything here; every own token attends to the unmasked prefix tokens. The prefix is
  projected to each layer's keys/values once per observation (`condition`) and reused at every denoising step.
  With a layerwise prefix, layer i reads prefix layer i * prefix_layers // depth (pi0 style).
- state and noise tokens attend to each other; action tokens additionally attend to the action tokens of their
  own horizon.
- The noise level reaches the net three ways: the noise token (or, with `time_fusion="action_mlp"`, pi0's fusion of
  the time into every action token, and no noise token), the `nm` routers (which see only its embedding) and, with
  `noise_conditioned_attention`, the attention input of every layer: x + Attn(norm(x) + W_l phi(sigma)), or
  x + Attn(norm(x) + phi(sigma)) with one shared shift (MoDE).
- Each layer's FFN is chosen by `ActionConfig.layers`: `d` dense, `as`/`hb`/`nm` routed (moe.py).
- At inference every sample of a denoising step shares its noise level, so whatever depends on the level alone
  (the noise embedding, each layer's attention shift, the fused experts of `as`/`nm` layers) is computed once per
  step and set of weights and kept in the `ExpertCache`; `plan_step` hands it to the forward as a `StepPlan`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vla.action.horizons import NUM_CONTEXT_TOKENS, HorizonLayout
from vla.action.moe import (
    ACTIVATIONS,
    MLP,
    DescriptorGroups,
    ExpertBank,
    ExpertCache,
    FactoredExpertBank,
    FusedLayer,
    RouteContext,
    RouterRecord,
    SampleRoutedMoE,
    TokenRoutedMoE,
)
from vla.config import ActionConfig
from vla.prefix import Prefix


def sinusoidal_embedding(level: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """(B,) scalar noise levels -> (B, dim) sin/cos features with periods from min_period to max_period (pi0)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=level.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = level.float()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention of the own tokens over [prefix keys/values ; own keys/values].

    `bias` puts biases on the query/key/value projections (own and prefix tokens alike); `qk_norm` applies RMSNorm
    over each head's dimensions to every query and key (MoDE's reference does both)."""

    def __init__(self, width: int, num_heads: int, prefix_width: int, dropout: float, *, bias: bool = False,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.prefix_norm = nn.LayerNorm(prefix_width)
        self.prefix_kv = nn.Linear(prefix_width, 2 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=False)
        # None rather than nn.Identity when off: forward runs layers x denoising steps times per chunk
        self.q_norm = nn.RMSNorm(width // num_heads, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(width // num_heads, eps=1e-6) if qk_norm else None

    def project_prefix(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, P, prefix_width) -> keys, values (B, heads, P, head_dim)."""
        kv = self.prefix_kv(self.prefix_norm(tokens.to(self.prefix_kv.weight.dtype)))
        k, v = rearrange(kv, "b p (two h d) -> two b h p d", two=2, h=self.num_heads)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(self, x: Tensor, prefix_kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """x: (B, T, D); mask: (B, 1, T, P + T) bool (True = may attend) -> (B, T, D)."""
        # "b t (three h d) -> three b h t d" as a view: this runs layers x denoising steps times per chunk, where
        # einops' per-call overhead is a measurable share of a batch-1 step on CPU.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
        v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).flatten(2))


def make_norm(cfg: ActionConfig, width: int) -> nn.Module:
    """The block / output norm: LayerNorm, or RMSNorm with eps 1e-6 (HiMoE, MoDE)."""
    return nn.RMSNorm(width, eps=1e-6) if cfg.norm == "rmsnorm" else nn.LayerNorm(width)


class Block(nn.Module):
    """Pre-norm transformer block whose FFN kind is one of d, as, hb, nm (with `ffn_residual="normed"`, MoDE's
    block: the stream continues from the FFN's normalised input)."""

    def __init__(self, cfg: ActionConfig, kind: str, layer: int, prefix_width: int, action_dim: int) -> None:
        super().__init__()
        d = cfg.width
        self.kind = kind
        self.norm1 = make_norm(cfg, d)
        self.attn = Attention(d, cfg.num_heads, prefix_width, cfg.dropout, bias=cfg.attention_bias,
                              qk_norm=cfg.qk_norm)
        self.normed_residual = cfg.ffn_residual == "normed"
        per_layer = cfg.noise_conditioned_attention and cfg.noise_shift == "per_layer"
        self.noise_proj = nn.Linear(d, d, bias=False) if per_layer else None
        self.norm2 = make_norm(cfg, d)
        act = cfg.expert_activation
        hidden, (rank, sparse) = cfg.expert_hidden(kind), cfg.expert_factoring(kind)
        if cfg.dense_activation not in ACTIVATIONS or act not in ACTIVATIONS:
            raise ValueError(f"activations must be among {ACTIVATIONS}, got dense_activation="
                             f"{cfg.dense_activation!r}, expert_activation={act!r}")
        if kind == "d":
            self.ffn: nn.Module = MLP(d, cfg.ffn_dim, cfg.dense_activation)
        elif kind == "hb":
            self.ffn = TokenRoutedMoE(layer, d, hidden, cfg.hb_num_experts, cfg.hb_top_k, cfg.hb_num_shared,
                                      cfg.router_jitter, act, rank=rank, sparse_fraction=sparse)
        elif kind == "as":
            self.ffn = SampleRoutedMoE("as", layer, d, hidden, cfg.as_num_experts, cfg.as_top_k,
                                       route_dim=action_dim, jitter=cfg.router_jitter, activation=act, rank=rank,
                                       sparse_fraction=sparse)
        elif kind == "nm":
            self.ffn = SampleRoutedMoE("nm", layer, d, hidden, cfg.nm_num_experts, cfg.nm_top_k,
                                       route_dim=d, jitter=cfg.router_jitter, activation=act, router=cfg.nm_router,
                                       selection=cfg.nm_selection, rank=rank, sparse_fraction=sparse)
        else:
            raise ValueError(f"unknown layer kind '{kind}'; known kinds are d, as, hb, nm")
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, prefix_kv: tuple[Tensor, Tensor], mask: Tensor, ctx: RouteContext,
                shift: Tensor | None, fused: FusedLayer | None = None) -> tuple[Tensor, RouterRecord | None]:
        """shift: (B, 1, D) this layer's noise-level attention shift W_l phi(sigma), or None; fused: the planned
        routing of an `as`/`nm` FFN (inference), or None to route here."""
        h = self.norm1(x)
        if shift is not None:
            h = h + shift
        x = x + self._drop(self.attn(h, prefix_kv, mask))
        h = self.norm2(x)
        if self.normed_residual:
            x = h
        if self.kind == "d":
            y, record = self.ffn(h), None
        elif fused is not None:
            y, record = self.ffn(h, ctx, fused)
        else:
            y, record = self.ffn(h, ctx)
        return x + self._drop(y), record

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x


@dataclass
class Conditioning:
    """What one batch of observations contributes, computed once and reused at every denoising step.

    Attributes:
        prefix_kv: per layer, (keys, values) of the prefix, each (B, heads, P, head_dim).
        prefix_mask: (B, P) bool, prefix tokens that may be attended to.
        state_token: (B, 1, D) embedded state + state mask + action-space descriptor.
        descriptor: (B, A) float action-space descriptor (the action mask).
    """

    prefix_kv: list[tuple[Tensor, Tensor]]
    prefix_mask: Tensor
    state_token: Tensor
    descriptor: Tensor
    _groups: DescriptorGroups | None = None
    _mask: tuple[HorizonLayout, Tensor] | None = None

    @property
    def groups(self) -> DescriptorGroups:
        """The batch's distinct descriptors (cached `as` layers, statistics), computed on first use."""
        if self._groups is None:
            self._groups = DescriptorGroups.of(self.descriptor)
        return self._groups

    def attention_mask(self, layout: HorizonLayout) -> Tensor:
        """(B, 1, T, P + T) bool: [prefix mask | the layout's own-token mask] for every own token; built once per
        observation and layout, reused at every denoising step."""
        if self._mask is None or self._mask[0] is not layout:
            b, t = self.prefix_mask.shape[0], layout.num_tokens
            mask = torch.cat([self.prefix_mask[:, None, None, :].expand(b, 1, t, -1),
                              layout.self_mask[None, None].expand(b, 1, t, t)], dim=-1)
            self._mask = (layout, mask)
        return self._mask[1]


@dataclass
class NoiseConditioning:
    """What the noise level alone contributes to a forward: the same for every observation at one denoising step,
    so sampling with the expert cache computes it once per step and weights.

    Attributes:
        embedding: (B, D) noise-level embedding (the noise token, the `nm` router input), or None when nothing
            reads it (time fused into the action tokens, no `nm` layer, no noise-conditioned attention).
        shifts: per layer, the (B, 1, D) attention-input shift (W_l phi(sigma), or phi(sigma) when shared), or None
            without noise-conditioned attention.
        time_features: (B, D) sinusoidal features of the level for pi0-style action-time fusion, else None.
    """

    embedding: Tensor | None
    shifts: list[Tensor | None]
    time_features: Tensor | None = None

    def expand(self, batch: int) -> NoiseConditioning:
        """Broadcast a batch-1 conditioning to `batch` samples (views, no copies)."""
        return NoiseConditioning(None if self.embedding is None else self.embedding.expand(batch, -1),
                                 [None if s is None else s.expand(batch, -1, -1) for s in self.shifts],
                                 None if self.time_features is None else self.time_features.expand(batch, -1))


@dataclass
class StepPlan:
    """One denoising step decided ahead (inference, every sample at the same noise level): the step's noise
    conditioning (batch 1) and, per layer, the fused experts of `as`/`nm` layers (None for `d`/`hb`, which
    route per token). Built from the `ExpertCache` by `ActionTransformer.plan_step`; a forward given a plan does
    no cache lookups and no token-independent routing, so the same code serves every step."""

    noise: NoiseConditioning
    layers: list[FusedLayer | None]


@dataclass
class TransformerOutput:
    """hidden: (B, N, D) final normed action-token states; pred: (B, N, A) per-token outputs (float32);
    records: routing decisions of every routed layer, in layer order."""

    hidden: Tensor
    pred: Tensor
    records: list[RouterRecord] = field(default_factory=list)


class ActionTransformer(nn.Module):
    """Embeddings, the configured stack of blocks and the output projection."""

    def __init__(self, cfg: ActionConfig, *, prefix_width: int, prefix_layers: int | None, action_dim: int,
                 state_dim: int) -> None:
        super().__init__()
        d, kinds = cfg.width, cfg.layer_kinds
        self.cfg, self.depth, self.kinds = cfg, len(kinds), kinds
        self.action_dim, self.state_dim, self.prefix_layers = action_dim, state_dim, prefix_layers
        self.state_in = nn.Linear(2 * state_dim + action_dim, d)
        self.action_in = nn.Linear(action_dim, d)
        self.action_pos = nn.Parameter(torch.zeros(cfg.chunk_size, d))
        self.fused_time = cfg.time_fusion == "action_mlp"
        self.context = 1 if self.fused_time else NUM_CONTEXT_TOKENS
        # the noise embedding exists only where something reads it: the noise token, nm routers, attention shifts
        self.has_noise_embedding = not self.fused_time or "nm" in kinds or cfg.noise_conditioned_attention
        if not self.has_noise_embedding:
            self.noise_mlp = None
        elif cfg.noise_embedding == "linear":  # MoDE: linear on the scalar level, then a bias-free linear map
            self.noise_mlp = nn.Sequential(nn.Linear(1, d), nn.Linear(d, d, bias=False))
        else:
            self.noise_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.shared_shift = cfg.noise_conditioned_attention and cfg.noise_shift == "shared"
        self.noise_token = None if self.fused_time else nn.Parameter(torch.zeros(d))
        if self.fused_time:  # pi0: W_out swish(W_in [action; phi(t)])
            self.action_time_in = nn.Linear(2 * d, d)
            self.action_time_out = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(cfg, kind, i, prefix_width, action_dim) for i, kind in enumerate(kinds))
        self.norm_out = make_norm(cfg, d)
        self.action_out = nn.Linear(d, action_dim)
        self.prefix_index = [i * prefix_layers // self.depth for i in range(self.depth)] if prefix_layers else None
        self._init_weights()

    def _init_weights(self) -> None:
        """nanoGPT init: N(0, 0.02) everywhere, N(0, 0.02 / sqrt(2 * depth)) on projections into the residual."""
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.depth)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ExpertBank):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=resid_std)
            elif isinstance(module, FactoredExpertBank):
                module.w_in_factors.reset_parameters(std)
                module.w_out_factors.reset_parameters(resid_std)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "w_out.weight")):
                nn.init.normal_(p, std=resid_std)
        nn.init.normal_(self.action_pos, std=std)
        if self.noise_token is not None:
            nn.init.normal_(self.noise_token, std=std)

    # ---- per observation ----
    def condition(self, prefix: Prefix, state: Tensor, state_mask: Tensor, action_mask: Tensor) -> Conditioning:
        """Project the prefix to every layer's keys/values and embed the state token (once per observation)."""
        if self.prefix_index is not None:
            if prefix.layers is None or len(prefix.layers) != self.prefix_layers:
                got = None if prefix.layers is None else len(prefix.layers)
                raise ValueError(f"the action head was built for {self.prefix_layers} per-layer prefix states "
                                 f"(layerwise), but the prefix has {got}")
            sources = [prefix.layers[j] for j in self.prefix_index]
        else:
            sources = [prefix.tokens] * self.depth
        kv = [block.attn.project_prefix(src) for block, src in zip(self.blocks, sources, strict=True)]
        dtype = self.state_in.weight.dtype
        state, descriptor, state_mask_f = state.to(dtype), action_mask.to(dtype), state_mask.to(dtype)
        state_token = self.state_in(torch.cat([state * state_mask_f, state_mask_f, descriptor], dim=-1))
        return Conditioning(prefix_kv=kv, prefix_mask=prefix.mask.bool(), state_token=state_token[:, None, :],
                            descriptor=descriptor)

    # ---- per denoising step ----
    def noise_conditioning(self, level: Tensor) -> NoiseConditioning:
        """(B,) noise levels -> the noise-level embedding, every layer's attention shift and the time features."""
        dtype = self.action_in.weight.dtype
        features = sinusoidal_embedding(level, self.cfg.width).to(dtype)
        emb = None
        if self.noise_mlp is not None:
            linear = self.cfg.noise_embedding == "linear"
            emb = self.noise_mlp(level.to(dtype)[:, None] if linear else features)
        if self.shared_shift:
            shifts = [emb[:, None, :]] * self.depth
        else:
            shifts = [None if blk.noise_proj is None else blk.noise_proj(emb)[:, None, :] for blk in self.blocks]
        return NoiseConditioning(emb, shifts, features if self.fused_time else None)

    def plan_step(self, level: Tensor, step_key: Hashable, cond: Conditioning, cache: ExpertCache) -> StepPlan:
        """Decide a denoising step ahead from the cache (entries are built on first use).

        level: (B,) the step's noise level (the same for every sample); step_key: a hashable key of that level.
        """
        noise = cache.get(("noise", step_key), lambda: self.noise_conditioning(level[:1]))
        layers = [block.ffn.plan(cache, step_key, noise.embedding, cond.groups) if block.kind in ("as", "nm")
                  else None for block in self.blocks]
        return StepPlan(noise, layers)

    def forward(self, noisy: Tensor, level: Tensor, cond: Conditioning, layout: HorizonLayout, *,
                plan: StepPlan | None = None) -> TransformerOutput:
        """One pass over every horizon of `layout`.

        Args:
            noisy: (B, L, A) noisy action chunk (L >= the longest horizon); masked action dims are zeroed here.
            level: (B,) noise-level conditioning (flow t or EDM c_noise).
            cond: from `condition`.
            layout: the packed horizons.
            plan: the step decided ahead (`plan_step`, inference): its noise conditioning and fused experts.
        Returns:
            TransformerOutput over the N = sum(horizons) packed action tokens.
        """
        b, dtype = noisy.shape[0], self.action_in.weight.dtype
        noisy = noisy.to(dtype)
        noise = self.noise_conditioning(level) if plan is None else plan.noise.expand(b)
        fused = [None] * self.depth if plan is None else plan.layers
        actions = (noisy * cond.descriptor[:, None, :]).index_select(1, layout.position)
        action_tokens = self.action_in(actions) + self.action_pos.index_select(0, layout.position)
        if self.fused_time:
            time = noise.time_features[:, None, :].expand_as(action_tokens)
            action_tokens = self.action_time_out(F.silu(self.action_time_in(torch.cat([action_tokens, time], -1))))
            x = torch.cat([cond.state_token, action_tokens], dim=1)
        else:
            noise_tok = (noise.embedding + self.noise_token)[:, None, :]
            x = torch.cat([cond.state_token, noise_tok, action_tokens], dim=1)
        mask = cond.attention_mask(layout)
        ctx = RouteContext(cond=noise.embedding, descriptor=cond.descriptor)
        records = []
        for block, kv, shift, layer in zip(self.blocks, cond.prefix_kv, noise.shifts, fused, strict=True):
            x, record = block(x, kv, mask, ctx, shift, layer)
            if record is not None:
                records.append(record)
        hidden = self.norm_out(x[:, layout.context:])
        pred = self.action_out(hidden).float()
        return TransformerOutput(hidden=hidden, pred=pred, records=records)

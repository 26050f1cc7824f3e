"""Feed-forward layers of the action transformer: dense MLPs, routed experts, their routers, fusion and losses.

Three routed kinds share one expert bank and one dispatch:

- `hb` (HiMoE heterogeneity balancing) routes every token: the router sees the token, picks top-k of E experts, and
  always-on shared experts are added. Balanced per sequence with the Switch loss.
- `as` (HiMoE action space) routes every sample by its action-space descriptor only: one decision per sample.
- `nm` (MoDE noise) routes every sample by its noise-level embedding only: one decision per sample, balanced
  across the batch (a per-sequence balance would be meaningless: every token of a sample takes the same path).

`as` and `nm` are token-independent, so at inference their routing is fixed by (embodiment, denoising step). The
decision is then frozen into a `FusedMLP` (the selected experts with their router weights) kept in an
`ExpertCache`: a cached forward is a dense forward of the active width, with no router, no sort and no gather.

A kind's experts can also be stored compressed (`FactoredExpertBank`: low rank plus column-sparse residual per
matrix, as `vla.tools.merge_experts --rank` writes them), behind the same bank interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vla.weight_version import WeightVersion

ROUTED_KINDS = ("as", "hb", "nm")
T = TypeVar("T")


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = ("gelu", "geglu", "swiglu")
"""FFN activations: a plain GELU MLP, or a gated linear unit whose input projection yields [gate; up] and whose
hidden state is act(gate) * up (GeGLU: tanh-GELU gate, as Gemma's dense layers; SwiGLU: SiLU gate, as HiMoE's and
MoDE's experts)."""


def input_width(hidden: int, activation: str) -> int:
    """Rows of an FFN's input projection: the hidden width, doubled for a gated unit ([gate; up])."""
    return hidden * (1 if activation == "gelu" else 2)


def activate(h: Tensor, activation: str) -> Tensor:
    """The FFN nonlinearity on the input projection's output (`input_width` wide) -> (..., hidden)."""
    if activation == "gelu":
        return gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return (gelu(gate) if activation == "geglu" else F.silu(gate)) * up


class MLP(nn.Module):
    """Dense two-layer MLP without biases (a `d` layer, and the shared experts of `hb`); GELU or a gated unit."""

    def __init__(self, width: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(width, input_width(hidden, activation), bias=False)
        self.w_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


# ---- routing ---------------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """One router decision for N rows (tokens for `hb`, samples for `as`/`nm`).

    Attributes:
        logits: (N, E) float32 router logits (for the z-loss).
        probs: (N, E) float32 softmax over all experts (for balance and AS-Reg losses).
        index: (N, k) long, the selected experts.
        weights: (N, k) mixing weights of the selected experts, in the input dtype.
    """

    logits: Tensor
    probs: Tensor
    index: Tensor
    weights: Tensor


class Router(nn.Module):
    """Router: softmax in float32, top-k (or, in training, a multinomial draw), renormalised when k > 1.

    `kind="linear"`: one bias-free linear map (HiMoE, Switch). `kind="mlp"`: Linear(in, 2 in) -> GELU ->
    Linear(2 in, E), both with biases (MoDE's router). `selection="multinomial"` draws k distinct experts from the
    router probabilities while training (MoDE) and takes the top k at inference, so cached inference stays exact.

    With k = 1 the raw top probability is kept as the mixing weight (Switch style): renormalising would make it
    exactly 1 and leave the router without a gradient from the task loss.
    """

    def __init__(self, in_dim: int, num_experts: int, top_k: int, jitter: float = 0.0, kind: str = "linear",
                 selection: str = "topk") -> None:
        super().__init__()
        if kind not in ("linear", "mlp") or selection not in ("topk", "multinomial"):
            raise ValueError(f"Router: kind must be 'linear' or 'mlp' and selection 'topk' or 'multinomial', got "
                             f"kind={kind!r}, selection={selection!r}")
        if kind == "linear":
            self.proj = nn.Linear(in_dim, num_experts, bias=False)
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.GELU(), nn.Linear(2 * in_dim, num_experts))
        self.kind, self.selection = kind, selection
        self.num_experts, self.top_k, self.jitter = num_experts, top_k, jitter

    def forward(self, inputs: Tensor, draws: int = 1) -> Routing:
        """inputs: (N, in_dim) -> Routing over N rows.

        draws: with multinomial selection in training, each row's experts are drawn `draws` times independently
        (one draw per token of a sample, as when the router input is repeated over the tokens); `index` and
        `weights` then have N * draws rows (row-major: row n's draws are rows n * draws ... n * draws + draws - 1)
        while `logits` and `probs` keep N rows.
        """
        if self.training and self.jitter > 0:  # multiplicative noise, never in place: the caller keeps its tensor
            inputs = inputs * torch.empty_like(inputs).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = (self.proj(inputs) if self.kind == "linear" else self.mlp(inputs)).float()
        probs = logits.softmax(dim=-1)
        if self.training and self.selection == "multinomial":
            rows = probs.repeat_interleave(draws, dim=0) if draws > 1 else probs
            index = torch.multinomial(rows.detach(), self.top_k, replacement=False)
            top_p = rows.gather(1, index)
        else:
            top_p, index = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, index=index, weights=top_p.to(inputs.dtype))


# ---- experts ---------------------------------------------------------------------------------------------------


def _grouped_mm_ok(x: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (`torch._grouped_mm` rejects expanded grads,
    e.g. the gradient of a plain `.sum()`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Per-group linear maps of rows already sorted by group.

    Args:
        x: (M, in) rows, sorted so that group e owns the next counts[e] rows.
        weight: (E, out, in) one weight matrix per group.
        counts: (E,) long rows per group (sums to M).
    Returns:
        (M, out), row m multiplied by the weight of its group.
    """
    if _grouped_mm_ok(x):
        if x.dtype != weight.dtype:  # autocast does not cover torch._grouped_mm: cast as it would for a matmul
            kind = x.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
            x, weight = x.to(dtype), weight.to(dtype)
        offsets = counts.cumsum(0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets))
    # Fallback for dtypes/devices without a grouped kernel: one matmul per expert (never per token).
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ weight[e].T for e, chunk in enumerate(chunks)])


@dataclass
class FusedMLP:
    """The experts one routing decision selects, frozen into a dense MLP of the active width:
    y = sum_i w_i * W_out[e_i] gelu(W_in[e_i] x).

    The weights are views of the expert bank, not a concatenated copy: a copy per distinct expert set would cost
    up to C(E, k) * k expert copies per layer (4 GiB at the MoDE shape once routing varies over the denoising
    steps), while k dense matmuls on views stream exactly the same bytes as one matmul on their concatenation.

    Attributes:
        w_in: k views (F, D); w_out: k views (D, F); for a `FactoredExpertBank` a `FactoredLinear` of views each.
        weights: (k,) router weights; experts: (k,) expert ids;
        hits: (1, E) long, the decision as one sample's expert counts (for `RouterRecord.counts`).
    """

    w_in: tuple[Tensor | FactoredLinear, ...]
    w_out: tuple[Tensor | FactoredLinear, ...]
    weights: Tensor
    experts: Tensor
    hits: Tensor
    activation: str = "gelu"

    def __call__(self, x: Tensor) -> Tensor:
        y = None
        for w_in, w_out, w in zip(self.w_in, self.w_out, self.weights.to(x.dtype).unbind(), strict=True):
            part = _linear(activate(_linear(x, w_in), self.activation), w_out) * w
            y = part if y is None else y + part
        return y


def _linear(x: Tensor, weight: Tensor | FactoredLinear) -> Tensor:
    return F.linear(x, weight) if isinstance(weight, Tensor) else weight(x)


def _hits(experts: Tensor, num_experts: int) -> Tensor:
    """experts: (k,) ids -> (1, E) long, one sample's expert counts."""
    hits = torch.zeros(1, num_experts, dtype=torch.long, device=experts.device)
    hits[0, experts] = 1
    return hits


def dispatch(x: Tensor, index: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """The sorted grouped dispatch of `ExpertBank.forward` on dense (E, I, D) / (E, D, F) weights."""
    n, k = index.shape
    flat = index.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w_in.shape[0])
    xs = x.index_select(0, order // k)
    hidden = activate(grouped_linear(xs, w_in, counts), activation)
    ys = grouped_linear(hidden, w_out, counts) * weights.reshape(-1, 1).index_select(0, order)
    out = ys.new_zeros(n * k, w_out.shape[1]).index_copy(0, order, ys)
    return rearrange(out, "(n k) d -> n k d", k=k).sum(dim=1)


class ExpertBank(nn.Module):
    """E two-layer MLPs (GELU or a gated unit) stored as 3-D weights; a forward computes only the experts each row
    is routed to.

    Dispatch without Python loops over rows: the (row, slot) pairs are sorted by expert (stable), the rows gathered
    in that order, every expert applied to its contiguous slice by one grouped matmul, then the outputs are weighted,
    put back in (row, slot) order with `index_copy` and summed over the k slots. No `index_add_`, so the result is
    deterministic.
    """

    def __init__(self, num_experts: int, width: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_experts, self.width, self.hidden, self.activation = num_experts, width, hidden, activation
        self.w_in = nn.Parameter(torch.empty(num_experts, input_width(hidden, activation), width))
        self.w_out = nn.Parameter(torch.empty(num_experts, width, hidden))

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x: (N, D), index: (N, k) long, weights: (N, k) -> (N, D) = sum_k weights * expert_index(x)."""
        return dispatch(x, index, weights, self.w_in, self.w_out, self.activation)

    def fuse(self, experts: Tensor, weights: Tensor) -> FusedMLP:
        """Freeze experts (k,) with router weights (k,) into a `FusedMLP` over views of this bank."""
        ids = experts.tolist()
        return FusedMLP(w_in=tuple(self.w_in[e].detach() for e in ids),
                        w_out=tuple(self.w_out[e].detach() for e in ids), weights=weights.detach(), experts=experts,
                        hits=_hits(experts, self.num_experts), activation=self.activation)


@dataclass
class FactoredLinear:
    """One factored matrix W = U V + S as a linear map, x -> x W^T, computed without forming W:
    (x V^T) U^T plus the kept input columns x[..., columns] times their values^T.

    Attributes:
        u: (m, r); v: (r, n); columns: (keep,) long, the columns of S that are not zero; values: (m, keep) them.
    """

    u: Tensor
    v: Tensor
    columns: Tensor
    values: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(x, self.v), self.u)
        if self.columns.numel():
            y = y + F.linear(x.index_select(-1, self.columns), self.values)
        return y


def low_rank_sparse(u: Tensor, v: Tensor, columns: Tensor, values: Tensor) -> Tensor:
    """U V plus a column-sparse part: `values` (..., m, keep) added at `columns` (..., keep) of the last axis. One
    matrix (u (m, r), v (r, n)) or a bank of them (a leading expert axis)."""
    w = u @ v
    if columns.shape[-1]:
        w = w.scatter_add(-1, columns.unsqueeze(-2).expand_as(values), values)
    return w


class LowRankSparse(nn.Module):
    """E matrices (m, n), each stored as W_e = U_e V_e + S_e: U_e (m, r), V_e (r, n), and S_e zero except in `keep`
    columns, of which it stores the indices (a long buffer, chosen per matrix) and the values.

    `keep` is the same for every matrix of the bank (ceil(sparse_fraction * n) in merging), so nothing is padded.
    """

    def __init__(self, count: int, rows: int, cols: int, rank: int, keep: int) -> None:
        super().__init__()
        if not 1 <= rank < min(rows, cols) or not 0 <= keep <= cols:
            raise ValueError(f"LowRankSparse: rank must be in [1, {min(rows, cols) - 1}] and keep in [0, {cols}] for "
                             f"{rows} x {cols} matrices, got rank={rank}, keep={keep}")
        self.u = nn.Parameter(torch.empty(count, rows, rank))
        self.v = nn.Parameter(torch.empty(count, rank, cols))
        self.values = nn.Parameter(torch.zeros(count, rows, keep))
        self.register_buffer("columns", torch.arange(keep).repeat(count, 1))

    def reset_parameters(self, std: float) -> None:
        """U and V entries with variance std / sqrt(r), so that the entries of U V have standard deviation `std`;
        an all-zero sparse part on the first `keep` columns."""
        factor_std = (std / math.sqrt(self.u.shape[-1])) ** 0.5
        nn.init.normal_(self.u, std=factor_std)
        nn.init.normal_(self.v, std=factor_std)
        nn.init.zeros_(self.values)
        self.columns.copy_(torch.arange(self.columns.shape[1], device=self.columns.device))

    def dense(self) -> Tensor:
        """(E, m, n): U V with each matrix's kept columns' values added (a scatter of the sparse part)."""
        return low_rank_sparse(self.u, self.v, self.columns, self.values)

    def linear(self, e: int) -> FactoredLinear:
        """Matrix e as a `FactoredLinear` over detached views (an expert cache entry holds no dense copy)."""
        return FactoredLinear(self.u[e].detach(), self.v[e].detach(), self.columns[e], self.values[e].detach())


class FactoredExpertBank(nn.Module):
    """An `ExpertBank` whose matrices are stored as low rank plus column-sparse residual (`LowRankSparse`), as
    `merge_experts --rank r --sparse f` writes them: the resident and saved size is the factored size.

    The interface is ExpertBank's. `w_in` (E, I, D) and `w_out` (E, D, F) are dense reconstructions made on every
    access, so code that reads them (merging, routing tools) works unchanged. The routed forward reconstructs the
    dense weights and runs ExpertBank's dispatch: the dense copy lives only during that call (the point is memory,
    not compute). `fuse` keeps the factors: a cached expert computes (x V^T) U^T + x[:, kept] S^T and the cache
    holds views of the factors only.

    Args:
        rank: r of every matrix; sparse_fraction: each matrix (m, n) keeps ceil(sparse_fraction * n) columns.
    """

    def __init__(self, num_experts: int, width: int, hidden: int, activation: str = "gelu", *, rank: int,
                 sparse_fraction: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.width, self.hidden, self.activation = num_experts, width, hidden, activation
        self.rank, self.sparse_fraction = rank, sparse_fraction
        rows = input_width(hidden, activation)
        self.w_in_factors = LowRankSparse(num_experts, rows, width, rank, math.ceil(sparse_fraction * width))
        self.w_out_factors = LowRankSparse(num_experts, width, hidden, rank, math.ceil(sparse_fraction * hidden))

    @property
    def w_in(self) -> Tensor:
        return self.w_in_factors.dense()

    @property
    def w_out(self) -> Tensor:
        return self.w_out_factors.dense()

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """x: (N, D), index: (N, k) long, weights: (N, k) -> (N, D) = sum_k weights * expert_index(x)."""
        return dispatch(x, index, weights, self.w_in, self.w_out, self.activation)

    def fuse(self, experts: Tensor, weights: Tensor) -> FusedMLP:
        """Freeze experts (k,) with router weights (k,) into a `FusedMLP` over views of this bank's factors."""
        ids = experts.tolist()
        return FusedMLP(w_in=tuple(self.w_in_factors.linear(e) for e in ids),
                        w_out=tuple(self.w_out_factors.linear(e) for e in ids), weights=weights.detach(),
                        experts=experts, hits=_hits(experts, self.num_experts), activation=self.activation)


def make_expert_bank(num_experts: int, width: int, hidden: int, activation: str = "gelu", rank: int = 0,
                     sparse_fraction: float = 0.0) -> ExpertBank | FactoredExpertBank:
    """An `ExpertBank`, or with rank > 0 a `FactoredExpertBank` of that rank and sparse fraction."""
    if rank == 0:
        return ExpertBank(num_experts, width, hidden, activation)
    return FactoredExpertBank(num_experts, width, hidden, activation, rank=rank, sparse_fraction=sparse_fraction)


# ---- routed layers ---------------------------------------------------------------------------------------------


@dataclass
class RouteContext:
    """What a routed FFN may route on, built once per transformer forward.

    Attributes:
        cond: (B, D) noise-level embedding (the `nm` router input).
        descriptor: (B, A) float action-space descriptor (the `as` router input).
    """

    cond: Tensor
    descriptor: Tensor


@dataclass
class FusedLayer:
    """A token-independent layer's routing for a whole batch, known ahead: one `FusedMLP` per distinct decision.

    Attributes:
        per_group: the fused experts of each group of samples (one group: every sample routes the same way).
        inverse: (B,) long, the group of each sample; None when there is one group.
    """

    per_group: list[FusedMLP]
    inverse: Tensor | None = None

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> the layer output (B, T, D) and the decision as expert counts (B, E)."""
        if self.inverse is None:
            fused = self.per_group[0]
            return fused(x), fused.hits.expand(x.shape[0], -1)
        y = torch.empty_like(x)
        for u, fused in enumerate(self.per_group):  # a loop over the batch's distinct embodiments, never tokens
            rows = (self.inverse == u).nonzero().squeeze(1)
            y = y.index_copy(0, rows, fused(x.index_select(0, rows)))
        return y, torch.cat([f.hits for f in self.per_group]).index_select(0, self.inverse)


@dataclass
class DescriptorGroups:
    """The distinct action-space descriptors of a batch.

    Attributes:
        unique: (U, A) float distinct descriptors.
        inverse: (B,) long, which distinct descriptor each sample has.
        keys: U hashable keys ('0'/'1' strings of the descriptor), used by the cache and by routing statistics.
    """

    unique: Tensor
    inverse: Tensor
    keys: list[str]

    @classmethod
    def of(cls, descriptor: Tensor) -> DescriptorGroups:
        unique, inverse = torch.unique(descriptor > 0.5, dim=0, return_inverse=True)
        keys = ["".join("1" if v else "0" for v in row) for row in unique.cpu().tolist()]
        return cls(unique=unique.to(descriptor.dtype), inverse=inverse, keys=keys)


@dataclass
class RouterRecord:
    """What one routed layer decided in one forward, for the auxiliary losses and the statistics.

    Attributes:
        layer: index of the layer in the transformer.
        kind: "as", "hb" or "nm".
        routing: the router output (None when the layer was served from the expert cache).
        counts: (B, E) long expert hits per sample: tokens for `hb`, one decision per sample for `as`/`nm` (tokens
            for `nm` with multinomial selection in training, where each token draws its own experts).
        tokens: tokens per sample the layer routed (the token-level AS-Reg counts each of them as an anchor).
    """

    layer: int
    kind: str
    routing: Routing | None
    counts: Tensor
    tokens: int = 1


class TokenRoutedMoE(nn.Module):
    """`hb`: per-token top-k routing over E experts plus always-on shared experts (HiMoE HB-MoE).

    rank, sparse_fraction: with rank > 0 the experts are a `FactoredExpertBank` (the shared experts stay dense)."""

    kind = "hb"

    def __init__(self, layer: int, width: int, hidden: int, num_experts: int, top_k: int, num_shared: int,
                 jitter: float, activation: str = "gelu", rank: int = 0, sparse_fraction: float = 0.0) -> None:
        super().__init__()
        self.layer = layer
        self.router = Router(width, num_experts, top_k, jitter)
        self.experts = make_expert_bank(num_experts, width, hidden, activation, rank, sparse_fraction)
        self.shared = MLP(width, num_shared * hidden, activation) if num_shared else None

    def forward(self, x: Tensor, ctx: RouteContext) -> tuple[Tensor, RouterRecord]:
        """x: (B, T, D) -> (B, T, D)."""
        b = x.shape[0]
        flat = rearrange(x, "b t d -> (b t) d")
        routing = self.router(flat)
        y = self.experts(flat, routing.index, routing.weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        hits = rearrange(routing.index, "(b t) k -> b (t k)", b=b)
        counts = torch.zeros(b, self.experts.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, hits, torch.ones_like(hits))
        return rearrange(y, "(b t) d -> b t d", b=b), RouterRecord(self.layer, self.kind, routing, counts)


class SampleRoutedMoE(nn.Module):
    """`as` / `nm`: one routing decision per sample from a token-independent input (descriptor or noise embedding).

    The general forward expands the sample's decision to its tokens and runs the shared sorted dispatch, computing
    only the selected experts. At inference `plan` decides the routing of a denoising step ahead from the
    `ExpertCache` (a `FusedMLP` per (layer, step) for `nm`, per (layer, descriptor) for `as`) and the forward
    runs the fused experts it is handed. With rank > 0 the experts are a `FactoredExpertBank`.
    """

    def __init__(self, kind: str, layer: int, width: int, hidden: int, num_experts: int, top_k: int,
                 route_dim: int, jitter: float, activation: str = "gelu", router: str = "linear",
                 selection: str = "topk", rank: int = 0, sparse_fraction: float = 0.0) -> None:
        super().__init__()
        if kind not in ("as", "nm"):
            raise ValueError(f"SampleRoutedMoE routes 'as' or 'nm' layers, got kind '{kind}'")
        self.kind, self.layer = kind, layer
        self.router = Router(route_dim, num_experts, top_k, jitter, kind=router, selection=selection)
        self.experts = make_expert_bank(num_experts, width, hidden, activation, rank, sparse_fraction)

    def route_input(self, ctx: RouteContext) -> Tensor:
        return ctx.descriptor if self.kind == "as" else ctx.cond

    def forward(self, x: Tensor, ctx: RouteContext, fused: FusedLayer | None = None
                ) -> tuple[Tensor, RouterRecord]:
        """x: (B, T, D) -> (B, T, D); with `fused` (from `plan`) the routing is already decided."""
        if fused is not None:
            y, hits = fused(x)
            return y, RouterRecord(self.layer, self.kind, None, hits)
        b, t, _ = x.shape
        per_token = self.training and self.router.selection == "multinomial"
        routing = self.router(self.route_input(ctx), draws=t if per_token else 1)
        if per_token:  # every token drew its own experts from its sample's probabilities
            index, weights = routing.index, routing.weights
        else:
            index = repeat(routing.index, "b k -> (b t) k", t=t)
            weights = repeat(routing.weights, "b k -> (b t) k", t=t)
        y = self.experts(rearrange(x, "b t d -> (b t) d"), index, weights)
        counts = self._counts(rearrange(routing.index, "(b t) k -> b (t k)", b=b) if per_token else routing.index)
        return rearrange(y, "(b t) d -> b t d", b=b), RouterRecord(self.layer, self.kind, routing, counts, tokens=t)

    def _counts(self, index: Tensor) -> Tensor:
        """index: (B, n) expert ids -> (B, E) hits per sample."""
        counts = torch.zeros(index.shape[0], self.experts.num_experts, dtype=torch.long, device=index.device)
        return counts.scatter_add_(1, index, torch.ones_like(index))

    def fused(self, route_row: Tensor) -> FusedMLP:
        """The FusedMLP for one router input row (1, route_dim)."""
        routing = self.router(route_row)
        return self.experts.fuse(routing.index[0], routing.weights[0])

    def plan(self, cache: ExpertCache, step_key: Hashable, noise_embedding: Tensor, groups: DescriptorGroups
             ) -> FusedLayer:
        """This layer's routing for a denoising step whose samples share the noise level, from the cache (built on
        first use): keyed by (layer, step) for `nm`, by (layer, descriptor) for `as`.

        noise_embedding: (1, D) the step's noise-level embedding; groups: the batch's distinct descriptors.
        """
        if self.kind == "nm":
            return FusedLayer([cache.get((self.layer, step_key), lambda: self.fused(noise_embedding[:1]))])
        per_group = [cache.get((self.layer, key), lambda u=u: self.fused(groups.unique[u: u + 1]))
                     for u, key in enumerate(groups.keys)]
        return FusedLayer(per_group, None if len(per_group) == 1 else groups.inverse)


# ---- expert cache ----------------------------------------------------------------------------------------------


class ExpertCache:
    """Frozen routing decisions of token-independent layers, valid for exactly one state of the weights.

    Entries are keyed by (layer, routing key): the noise-level value of a denoising step for `nm`, the descriptor
    string for `as`. They hold views of the expert weights, so the cache costs no weight memory. The transformer
    also keeps here what else depends on the denoising step alone (its noise-level embedding and per-layer
    attention shifts, keyed by ("noise", step key)): the same validity rule applies to both.

    `validate(module)` compares a `WeightVersion` key of the module's parameters (identity, storage pointer and
    in-place version counter of each) with the one the entries were built for and drops them on any difference:
    optimiser steps, `load_state_dict`, `.to()`, a new Parameter object and any in-place edit all change it. Writes
    through `param.data` bypass version counters, so the head also clears the cache on `train()`/`eval()` and on
    `load_state_dict`.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, Any] = {}
        self._signature: Hashable | None = None
        self._version = WeightVersion()

    def validate(self, module: nn.Module) -> None:
        sig = self._version.key(module)
        if sig != self._signature:
            self.clear()
            self._signature = sig

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = build()
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._signature = None

    def __len__(self) -> int:
        return len(self._entries)


# ---- auxiliary losses ------------------------------------------------------------------------------------------


def load_balance_loss(probs: Tensor, index: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load balance E * sum_e f_e * P_e per group, averaged over groups.

    f_e is the fraction of the group's (row, slot) assignments that went to expert e and P_e the mean router
    probability of e. It is 1 for perfectly uniform routing and E when every row goes to one expert.

    Args:
        probs: (G, N, E) router probabilities (groups: sequences for `hb`, one group = the batch for `nm`).
        index: (G, N, k) selected experts.
        mask: optional (G, N) bool, rows that count (padding excluded).
    """
    num_experts, k = probs.shape[-1], index.shape[-1]
    hits = F.one_hot(index, num_experts).to(probs.dtype).sum(dim=-2)  # (G, N, E)
    w = torch.ones_like(probs[..., 0]) if mask is None else mask.to(probs.dtype)
    rows = w.sum(dim=1).clamp_min(1.0)[:, None]  # (G, 1)
    f = (hits * w[..., None]).sum(dim=1) / (rows * k)
    p = (probs * w[..., None]).sum(dim=1) / rows
    return (num_experts * (f * p).sum(dim=-1)).mean()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE). logits: (N, E)."""
    return logits.logsumexp(dim=-1).pow(2).mean()


def action_space_contrastive_loss(probs: Tensor, descriptor: Tensor, temperature: float) -> Tensor:
    """HiMoE AS-Reg: supervised contrastive loss on per-sample routing distributions.

    Samples with the same action-space descriptor are positives, all others negatives; cosine similarity of the
    routing probability vectors over `temperature`. Only anchors with at least one positive and one negative count
    (otherwise the loss is a constant without gradient); with none it returns a zero that keeps the graph.

    Args:
        probs: (B, E) routing probabilities of one `as` layer.
        descriptor: (B, A) action-space descriptors.
    """
    b = probs.shape[0]
    z = F.normalize(probs, dim=-1)
    sim = z @ z.T / temperature
    same = ((descriptor[:, None, :] > 0.5) == (descriptor[None, :, :] > 0.5)).all(dim=-1)
    eye = torch.eye(b, dtype=torch.bool, device=probs.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not bool(valid.any()):
        return probs.sum() * 0.0
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / pos.sum(dim=1).clamp_min(1)
    return per_anchor[valid].mean()


def selected_balance_loss(weights: Tensor, index: Tensor, num_experts: int) -> Tensor:
    """MoDE's load-balance term of one layer: E * sum_e P_e * f_e over all N routed rows (tokens), where P_e is
    the mean renormalised mixing weight of expert e (zero where e was not selected) and f_e the fraction of rows
    that selected e (so sum_e f_e = k). It is k for perfectly uniform routing.

    Args:
        weights: (N, k) mixing weights of the selected experts; index: (N, k) their ids.
    """
    n = index.shape[0]
    hits = F.one_hot(index, num_experts).to(weights.dtype)  # (N, k, E)
    p = (hits * weights.float()[..., None]).sum(dim=1).mean(dim=0)  # (E,)
    f = hits.sum(dim=1).sum(dim=0) / max(n, 1)
    return num_experts * (p * f).sum()


def action_space_token_loss(probs: Tensor, descriptor: Tensor, temperature: float, tokens: int,
                            eps: float = 1e-8) -> Tensor:
    """HiMoE's AS-Reg as its reference computes it: an InfoNCE loss over every routed TOKEN of the batch.

    Each of the B * T tokens is an anchor; its positives are all other tokens whose sample has the same action-space
    descriptor (the other tokens of its own sample included), the denominator runs over all tokens, itself included:

        loss = mean_tokens -log( sum_pos exp(s) / (sum_all exp(s) + eps) + eps ),   s = cos(p_a, p_b) / temperature

    The router input of an `as` layer is the descriptor alone, so every token of a sample has its sample's routing
    distribution and the sums collapse to sample sums weighted by T (exactly; no B*T x B*T matrix is built).

    Args:
        probs: (B, E) routing probabilities of one `as` layer; descriptor: (B, A); tokens: T, tokens per sample.
    """
    z = F.normalize(probs.float(), dim=-1)
    e = (z @ z.T / temperature).exp()  # (B, B) similarity of any token of sample i with any token of sample j
    same = ((descriptor[:, None, :] > 0.5) == (descriptor[None, :, :] > 0.5)).all(dim=-1)
    eye = torch.eye(probs.shape[0], dtype=torch.bool, device=probs.device)
    denominator = tokens * e.sum(dim=1)
    numerator = tokens * (e * (same & ~eye)).sum(dim=1) + (tokens - 1) * e.diagonal()
    return -(numerator / (denominator + eps) + eps).log().mean()

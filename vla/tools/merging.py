"""Merge the experts of routed layers into fewer groups, then optionally compress them (MC-SMoE).

For one routed layer with E experts and K groups:

1. Group: the K experts selected most often on the calibration set are the group centres; every other expert joins
   the centre whose router-logit column (its logit over every calibration row) is most similar (cosine).
2. Align: each member's hidden neurons are permuted to match its centre's (weight matching: the assignment that
   maximises the summed inner products of the neurons' input rows and output columns; a gated unit's gate and up
   rows move together).
3. Merge: the aligned weights are averaged, weighted by each member's selection frequency.
4. Remap the router to K outputs: the logit of group g is fitted to log sum_{e in g} exp(logit_e) on the
   calibration inputs (so softmax gives each group the summed probability of its members), starting from the
   centre's row and adding the least-norm correction; a group of one keeps its expert's row exactly.
5. Compress (optional): each merged matrix becomes its rank-r SVD plus the columns of the residual with the largest
   norms (a column-structured sparse part). The checkpoint stores the factors (U, V, the kept columns' indices and
   values) and its config makes the layer a `FactoredExpertBank`, so the saved file and the loaded model shrink.

`method="uniform"` is the naive baseline: the same groups, no alignment, equal weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vla.action.moe import low_rank_sparse

METHODS = ("mcsmoe", "uniform")
RCOND = 1e-3
"""Router fit: directions of the calibration inputs with singular values below RCOND x the largest are left alone
(fitting them would blow the router weights up, and routing on them would turn on rounding noise)."""


# ---- grouping --------------------------------------------------------------------------------------------------


def group_experts(frequency: Tensor, logits: Tensor, k: int) -> list[list[int]]:
    """Groups of expert ids, centre first, ordered by centre id.

    Args:
        frequency: (E,) selection frequency of each expert (ties: the lower id is the centre).
        logits: (N, E) router logits on the calibration rows.
        k: number of groups, 1 <= k <= E.
    """
    e = frequency.shape[0]
    if not 1 <= k <= e:
        raise ValueError(f"cannot make {k} groups of {e} experts")
    order = sorted(range(e), key=lambda i: (-float(frequency[i]), i))
    centres = sorted(order[:k])
    columns = torch.nn.functional.normalize(logits.double().T - logits.double().mean(dim=1), dim=1)  # (E, N)
    groups = {c: [c] for c in centres}
    for member in sorted(order[k:]):
        sims = torch.stack([columns[member] @ columns[c] for c in centres])
        groups[centres[int(sims.argmax())]].append(member)
    return [groups[c] for c in centres]


# ---- alignment -------------------------------------------------------------------------------------------------


def neuron_features(w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """(F, ...) one row per hidden neuron: its input row(s) (gate and up for a gated unit) and its output column.

    w_in: (F, D) or (2F, D) for a gated unit ([gate; up]); w_out: (D, F).
    """
    hidden = w_out.shape[1]
    rows = [w_in[:hidden]] if activation == "gelu" else [w_in[:hidden], w_in[hidden:]]
    return torch.cat([*rows, w_out.T], dim=1).double()


def permute_neurons(w_in: Tensor, w_out: Tensor, perm: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """The expert with its hidden neurons reordered: new neuron i is old neuron perm[i] (the function is unchanged)."""
    hidden = w_out.shape[1]
    rows = perm if activation == "gelu" else torch.cat([perm, perm + hidden])
    return w_in[rows], w_out[:, perm]


def match_neurons(centre_in: Tensor, centre_out: Tensor, member_in: Tensor, member_out: Tensor,
                  activation: str) -> Tensor:
    """The permutation of the member's neurons that best matches the centre's (weight matching, Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    a = neuron_features(centre_in, centre_out, activation)
    b = neuron_features(member_in, member_out, activation)
    _, cols = linear_sum_assignment((a @ b.T).cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def merge_group(w_in: Tensor, w_out: Tensor, group: list[int], frequency: Tensor, activation: str,
                method: str = "mcsmoe") -> tuple[Tensor, Tensor]:
    """One merged expert from the experts of `group` (centre first). w_in: (E, I, D), w_out: (E, D, F)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method '{method}'; methods: {', '.join(METHODS)}")
    centre = group[0]
    if len(group) == 1:
        return w_in[centre].clone(), w_out[centre].clone()
    ins, outs = [], []
    for e in group:
        if method == "mcsmoe" and e != centre:
            perm = match_neurons(w_in[centre], w_out[centre], w_in[e], w_out[e], activation)
            a, b = permute_neurons(w_in[e], w_out[e], perm, activation)
        else:
            a, b = w_in[e], w_out[e]
        ins.append(a.double())
        outs.append(b.double())
    if method == "uniform":
        weights = torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
    else:
        weights = frequency[group].double()
        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1.0 / len(group))
    merged_in = sum(w * a for w, a in zip(weights, ins, strict=True))
    merged_out = sum(w * b for w, b in zip(weights, outs, strict=True))
    return merged_in.to(w_in.dtype), merged_out.to(w_out.dtype)


# ---- router ----------------------------------------------------------------------------------------------------


def remap_router_rows(weight: Tensor, features: Tensor, groups: list[list[int]], bias: Tensor | None = None
                      ) -> tuple[Tensor, Tensor | None]:
    """The router's last linear map with one output per group.

    Args:
        weight: (E, in) the last linear map of the router; bias: (E,) or None.
        features: (N, in) what that map sees on the calibration rows.
        groups: expert ids per group, centre first.
    Returns:
        (K, in) weight and (K,) bias (None when there was none), fitted so that each group's logit is the
        log-sum-exp of its members' logits on the calibration rows (least-norm change from the centre's row).
    """
    x = features.double()
    if bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        full = torch.cat([weight.double(), bias.double()[:, None]], dim=1)
    else:
        full = weight.double()
    logits = x @ full.T
    rows = []
    for group in groups:
        row = full[group[0]]
        if len(group) > 1:
            target = logits[:, group].logsumexp(dim=1)
            delta = torch.linalg.lstsq(x, (target - x @ row)[:, None], rcond=RCOND, driver="gelsd").solution[:, 0]
            row = row + delta
        rows.append(row)
    new = torch.stack(rows)
    if bias is None:
        return new.to(weight.dtype), None
    return new[:, :-1].to(weight.dtype).contiguous(), new[:, -1].to(bias.dtype).contiguous()


# ---- compression -----------------------------------------------------------------------------------------------


@dataclass
class Compressed:
    """A matrix W (m, n) as low rank + column-sparse residual: W ~ U V + S, S zero outside `columns`.

    Attributes:
        u: (m, r) left factor (the singular values folded in); v: (r, n).
        columns: (keep,) long, the residual columns kept; values: (m, keep) their values.
        relative_error: ||W - dense|| / ||W|| (Frobenius).
    """

    u: Tensor
    v: Tensor
    columns: Tensor
    values: Tensor
    relative_error: float

    @property
    def dense(self) -> Tensor:
        """The reconstruction U V + S, as the factored expert bank computes it."""
        return low_rank_sparse(self.u, self.v, self.columns, self.values)

    @property
    def params(self) -> int:
        """Numbers the factored store holds: r (m + n) + m * keep values + keep indices."""
        return self.u.numel() + self.v.numel() + self.values.numel() + self.columns.numel()


def compress_matrix(w: Tensor, rank: int, sparse_fraction: float) -> Compressed:
    """Rank-`rank` SVD of w (m, n) plus the ceil(sparse_fraction * n) residual columns of largest norm (the same
    count for every matrix of that shape, so a bank of them needs no padding)."""
    m, n = w.shape
    if not 1 <= rank < min(m, n):
        raise ValueError(f"rank {rank} must be in [1, {min(m, n) - 1}] for a {m} x {n} expert matrix")
    if not 0 <= sparse_fraction < 1:
        raise ValueError(f"sparse_fraction must be in [0, 1), got {sparse_fraction}")
    x = w.double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    low_u, low_v = u[:, :rank] * s[:rank], vh[:rank]
    residual = x - low_u @ low_v
    keep = math.ceil(sparse_fraction * n)
    cols = residual.norm(dim=0).topk(keep).indices.sort().values
    out = Compressed(u=low_u.to(w.dtype), v=low_v.to(w.dtype), columns=cols, values=residual[:, cols].to(w.dtype),
                     relative_error=0.0)
    out.relative_error = float((x - out.dense.double()).norm() / x.norm().clamp_min(1e-30))
    return out


# ---- one layer -------------------------------------------------------------------------------------------------


@dataclass
class LayerMerge:
    """What merging did to one routed layer (for the report).

    Attributes:
        layer, kind: the layer; groups: expert ids per merged expert (centre first).
        frequency: selection frequency of the original experts on the calibration set.
        expert_params: parameters of the expert bank before and after merging.
        compressed_params: numbers the factored bank of the merged experts stores, its column indices included
            (None without compression).
        compression_error: mean relative reconstruction error of the compressed matrices.
        router_fit_error: max |P_new(group) - sum of its members' P_old| over the calibration rows.
    """

    layer: int
    kind: str
    groups: list[list[int]]
    frequency: list[float]
    expert_params: tuple[int, int]
    compressed_params: int | None = None
    compression_error: float | None = None
    router_fit_error: float = 0.0

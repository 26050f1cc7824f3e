"""Merge (and optionally compress) the experts of a trained policy's routed layers into an ordinary checkpoint.

    python -m vla.tools.merge_experts --policy checkpoints/<run>/last --out checkpoints/<run>-k2 --groups 2 \
        [--rank 16 --sparse 0.05] [--calib datasets/mixtures/<mixture>.yaml] [--method mcsmoe|uniform]

`--groups K` merges every routed kind to K experts; `--groups as=2,nm=2` merges only the kinds named (a kind left
out keeps its experts). Calibration runs the policy's inference path on `--samples` observations of `--calib`
(default: the mixture the checkpoint was trained on) to measure how often each expert is selected and what the
routers see. The output loads with `VLAPolicy.from_pretrained`; its config has the new expert counts (top-k capped
at K), so every evaluator and the expert cache work unchanged. With `--rank` the merged experts are saved as
factors (low rank + column-sparse residual) and the config lists their kinds in `action.factored_kinds`, so the
loaded model builds factored expert banks. `merge_report.json` beside it records the groups, frequencies and sizes.
See `vla/tools/merging.py` for the method.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from vla.tools.calibration import Calibration, collect_routing, mixture_batches, resolve_data, routed_layers
from vla.tools.merging import METHODS, LayerMerge, compress_matrix, group_experts, merge_group, remap_router_rows

logger = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"


def parse_groups(spec: str, experts: dict[str, int]) -> dict[str, int]:
    """`"2"` -> every routed kind to 2 experts; `"as=2,nm=3"` -> those kinds only. `experts`: kind -> E.

    Raises ValueError naming the kind and the limit when a count is out of range or a kind is not in the policy."""
    spec = str(spec).strip()
    if not experts:
        raise ValueError("the policy has no routed layer (as, hb, nm): there are no experts to merge")
    try:
        if "=" not in spec:
            wanted = {kind: int(spec) for kind in experts}
        else:
            wanted = {}
            for part in spec.split(","):
                kind, _, value = part.partition("=")
                wanted[kind.strip()] = int(value)
    except ValueError:
        raise ValueError(f"--groups must be a count (2) or kind=count pairs (as=2,nm=2), got '{spec}'") from None
    problems = [f"kind '{k}' has no layer in this policy (routed kinds: {sorted(experts)})"
                for k in wanted if k not in experts]
    problems += [f"{k}: {n} groups is outside [1, {experts[k]}] (the layer has {experts[k]} experts)"
                 for k, n in wanted.items() if k in experts and not 1 <= n <= experts[k]]
    if problems:
        raise ValueError("--groups: " + "; ".join(problems))
    return wanted


def expert_bank_params(bank: torch.nn.Module) -> int:
    """Numbers an expert bank holds: its parameters and buffers (a factored bank's column indices)."""
    return sum(t.numel() for t in (*bank.parameters(), *bank.buffers()))


def check_rank(policy: torch.nn.Module, groups: dict[str, int], rank: int | None,
               sparse_fraction: float = 0.0) -> None:
    """Fail before any work when the rank cannot compress the merged experts' matrices, or when kinds left unmerged
    are already factored with another rank or fraction (one config holds one rank and fraction)."""
    if rank is None:
        return
    action = policy.config.action
    kept = [k for k in action.factored_kinds if k not in groups]
    if kept and (action.expert_rank, action.expert_sparse_fraction) != (rank, sparse_fraction):
        raise ValueError(f"kinds {kept} stay factored at rank {action.expert_rank} and sparse fraction "
                         f"{action.expert_sparse_fraction}; merge them too, or use --rank {action.expert_rank} "
                         f"--sparse {action.expert_sparse_fraction}")
    for i, ffn in routed_layers(policy).items():
        if ffn.kind in groups:
            dims = (*ffn.experts.w_in.shape[1:], ffn.experts.w_out.shape[2])
            if not 1 <= rank < min(dims):
                raise ValueError(f"--rank {rank} must be in [1, {min(dims) - 1}]: layer {i} ({ffn.kind}) has expert "
                                 f"matrices of {ffn.experts.w_in.shape[1]} x {dims[1]} and {dims[1]} x {dims[2]}")


@torch.no_grad()
def merge_policy(policy: torch.nn.Module, calibration: Calibration, groups: dict[str, int], *,
                 method: str = "mcsmoe", rank: int | None = None, sparse_fraction: float = 0.0,
                 checkpoint_dir: str | Path | None = None) -> tuple[torch.nn.Module, list[LayerMerge]]:
    """A new VLAPolicy with the routed layers of the kinds in `groups` merged to that many experts.

    Args:
        policy: the trained policy; calibration: `collect_routing` on it.
        groups: kind -> number of merged experts (kinds not named are copied unchanged).
        method: "mcsmoe" (align + frequency-weighted) or "uniform" (plain average of the same groups).
        rank, sparse_fraction: compress every merged expert matrix to rank `rank` plus that fraction of its
            residual's columns (None: no compression). The factors replace the dense weights in the merged
            policy (a `FactoredExpertBank` per compressed layer), so it and its checkpoint hold the factored size.
        checkpoint_dir: the checkpoint the policy came from (backbones that rebuild from its files need it).
    """
    from vla.policy import VLAPolicy

    if method not in METHODS:
        raise ValueError(f"unknown merge method '{method}'; methods: {', '.join(METHODS)}")
    check_rank(policy, groups, rank, sparse_fraction)
    names = {id(m): n for n, m in policy.named_modules()}
    state = dict(policy.state_dict())
    reports = []
    for i, ffn in routed_layers(policy).items():
        if ffn.kind not in groups:
            continue
        rec = calibration.layers[i]
        bank, router, k = ffn.experts, ffn.router, groups[ffn.kind]
        plan = group_experts(rec.frequency, rec.logits[0], k)
        merged = [merge_group(bank.w_in.detach().cpu(), bank.w_out.detach().cpu(), g, rec.frequency,
                              bank.activation, method) for g in plan]
        w_in, w_out = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        report = LayerMerge(layer=i, kind=ffn.kind, groups=plan, frequency=rec.frequency.tolist(),
                            expert_params=(expert_bank_params(bank), w_in.numel() + w_out.numel()))
        prefix = names[id(ffn)]
        for key in [key for key in state if key.startswith(f"{prefix}.experts.")]:  # dense or factored before
            del state[key]
        if rank is None:
            state[f"{prefix}.experts.w_in"], state[f"{prefix}.experts.w_out"] = w_in, w_out
        else:
            parts = {"w_in": [compress_matrix(w, rank, sparse_fraction) for w in w_in],
                     "w_out": [compress_matrix(w, rank, sparse_fraction) for w in w_out]}
            for name, matrices in parts.items():  # the keys of FactoredExpertBank's LowRankSparse modules
                for field in ("u", "v", "columns", "values"):
                    state[f"{prefix}.experts.{name}_factors.{field}"] = torch.stack([getattr(c, field)
                                                                                     for c in matrices])
            every = parts["w_in"] + parts["w_out"]
            report.compressed_params = sum(c.params for c in every)
            report.compression_error = sum(c.relative_error for c in every) / len(every)
        inputs = rec.inputs[0].to(policy.device, dtype=next(router.parameters()).dtype)
        if router.kind == "linear":
            last, features = router.proj, inputs
            state[f"{prefix}.router.proj.weight"], _ = remap_router_rows(last.weight.cpu(), features.cpu(), plan)
        else:
            last, features = router.mlp[-1], router.mlp[:-1](inputs)
            weight, bias = remap_router_rows(last.weight.cpu(), features.cpu(), plan, last.bias.cpu())
            state[f"{prefix}.router.mlp.2.weight"], state[f"{prefix}.router.mlp.2.bias"] = weight, bias
        report.router_fit_error = _router_fit_error(last, features, state, prefix, router.kind, plan)
        reports.append(report)
    config = copy.deepcopy(policy.config)
    for kind, k in groups.items():
        setattr(config.action, f"{kind}_num_experts", k)
        setattr(config.action, f"{kind}_top_k", min(getattr(config.action, f"{kind}_top_k"), k))
    factored = [kind for kind in config.action.factored_kinds if kind not in groups]  # left unmerged: unchanged
    factored += [] if rank is None else list(groups)
    config.action.factored_kinds = tuple(k for k in ("as", "hb", "nm") if k in factored)
    if rank is not None:
        config.action.expert_rank, config.action.expert_sparse_fraction = rank, sparse_fraction
    elif not factored:
        config.action.expert_rank, config.action.expert_sparse_fraction = 0, 0.0
    config.action.validate()
    merged_policy = VLAPolicy(config, registry=policy.registry, normalizer=policy.normalizer,
                              checkpoint_dir=checkpoint_dir)
    merged_policy.load_state_dict(state, strict=True)
    return merged_policy.to(policy.device).eval(), reports


def _router_fit_error(last: torch.nn.Linear, features: torch.Tensor, state: dict, prefix: str, kind: str,
                      plan: list[list[int]]) -> float:
    """Max |P_new(group) - sum of its members' P_old| over the calibration rows."""
    old = last(features).float().softmax(dim=-1).cpu()
    key = "router.proj" if kind == "linear" else "router.mlp.2"
    weight = state[f"{prefix}.{key}.weight"].to(features)
    bias = state.get(f"{prefix}.{key}.bias")
    new = torch.nn.functional.linear(features, weight, None if bias is None else bias.to(features))
    new = new.float().softmax(dim=-1).cpu()
    target = torch.stack([old[:, g].sum(dim=1) for g in plan], dim=1)
    return float((new - target).abs().max()) if len(target) else 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla.tools.merge_experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="checkpoint directory (or a run's `last`)")
    p.add_argument("--out", required=True, help="directory of the merged checkpoint")
    p.add_argument("--groups", required=True, help="K (every routed kind) or kind=K pairs, e.g. as=2,nm=2")
    p.add_argument("--rank", type=int, default=None, help="compress merged experts to this rank (+ sparse part)")
    p.add_argument("--sparse", type=float, default=0.05,
                   help="with --rank: fraction of residual columns kept as the structured-sparse part")
    p.add_argument("--calib", default=None, help="mixture file or LeRobot dataset (default: the training mixture)")
    p.add_argument("--method", default="mcsmoe", choices=METHODS)
    p.add_argument("--samples", type=int, default=256, help="calibration observations")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    from vla.policy import CheckpointError, VLAPolicy, resolve_checkpoint

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.samples < 1 or args.batch_size < 1:
            raise ValueError(f"--samples and --batch-size must be >= 1, got {args.samples} and {args.batch_size}")
        if args.rank is not None and not 0 <= args.sparse < 1:
            raise ValueError(f"--sparse must be in [0, 1), got {args.sparse}")
        source = resolve_checkpoint(args.policy)
        out = Path(args.out)
        if out.resolve() == source.resolve():
            raise ValueError(f"--out {out} is the source checkpoint; choose another directory")
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        policy = VLAPolicy.from_pretrained(source)
        experts = {ffn.kind: ffn.router.num_experts for ffn in routed_layers(policy).values()}
        groups = parse_groups(args.groups, experts)
        check_rank(policy, groups, args.rank, args.sparse)
        data = resolve_data(args.calib, policy)
        calibration = collect_routing(policy, mixture_batches(policy, data, args.batch_size), args.samples,
                                      seed=args.seed)
        merged, reports = merge_policy(policy, calibration, groups, method=args.method, rank=args.rank,
                                       sparse_fraction=args.sparse, checkpoint_dir=source)
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"merge_experts: {e}") from None
    merged.save_pretrained(out)
    summary = {
        "source": str(source), "method": args.method, "groups": groups, "rank": args.rank,
        "sparse": args.sparse if args.rank is not None else None, "calibration": {"data": data,
                                                                                  "samples": calibration.num_samples},
        "parameters": {"before": sum(p.numel() for p in policy.parameters()),
                       "after": sum(p.numel() for p in merged.parameters())},
        "layers": [asdict(r) for r in reports],
    }
    (out / REPORT_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    for r in reports:
        extra = "" if r.compressed_params is None else (f", compressed store {r.compressed_params} "
                                                        f"(rel. error {r.compression_error:.3f})")
        logger.info("layer %d (%s): groups %s, expert params %d -> %d%s, router fit error %.2e", r.layer, r.kind,
                    r.groups, *r.expert_params, extra, r.router_fit_error)
    logger.info("wrote %s (parameters %d -> %d)", out, summary["parameters"]["before"], summary["parameters"]["after"])
    return out


if __name__ == "__main__":
    main()

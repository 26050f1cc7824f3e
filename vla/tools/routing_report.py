"""What the routers learned: expert usage, a specialisation score and readable rules (SMOSE-style distillation).

    python -m vla.tools.routing_report --policy checkpoints/<run>/last --data datasets/mixtures/<mixture>.yaml \
        --out reports/<run>-routing [--samples 256] [--depth 3]

For every routed layer, on `--samples` observations of `--data` run through the inference path:
- `layer<i>_<kind>_usage.png`: heatmaps of expert usage (row-normalised) per embodiment, per action space (one
  descriptor, named by the embodiments sharing it), per task and per denoising step;
- a specialisation score per condition: the mutual information I(expert; condition) in bits, normalised by
  min(H(expert), H(condition)) (0 = the condition says nothing about the expert, 1 = it decides it), and its
  separation, normalised by log2(min(conditions, experts)) (1 = the conditions are spread over every expert the
  layer has; an `as` layer's expert is always decided by the embodiment, so this is the score that tells whether
  it tells embodiments apart);
- for token-independent routers (`as`, `nm`): a decision tree of depth <= `--depth` distilled from the router
  (inputs: the action-space descriptor bits that vary in the data and the noise fraction of the step; label: the
  selected expert set), printed in `report.md`, drawn as `layer<i>_<kind>_tree.png`, with its agreement with the
  router on the same rows.
`report.json` holds every number.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vla.tools.calibration import Calibration, LayerRouting, collect_routing, mixture_batches, resolve_data
from vla.tools.tree import DecisionTree

logger = logging.getLogger(__name__)

TOKEN_INDEPENDENT = ("as", "nm")


# ---- statistics ------------------------------------------------------------------------------------------------


def usage_table(rec: LayerRouting, condition: np.ndarray, num_conditions: int) -> np.ndarray:
    """(C, E) selections of each expert per condition; condition: (N,) int, the condition of each row."""
    table = np.zeros((num_conditions, rec.num_experts))
    index = rec.index[0].numpy()
    for slot in range(index.shape[1]):
        np.add.at(table, (condition, index[:, slot]), 1.0)
    return table


def mutual_information(table: np.ndarray) -> tuple[float, float]:
    """(I(expert; condition) in bits, normalised by min(H(expert), H(condition))) of a (C, E) count table.

    The normalised score is 1 whenever the condition decides the expert, however few experts are used: a layer that
    routes four of five embodiments to one expert and the fifth to another scores 1. `separation` says how much of
    what the layer could separate it does."""
    total = table.sum()
    if total <= 0:
        return 0.0, 0.0
    p = table / total
    pc, pe = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pc @ pe)[nz])).sum())

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log2(q)).sum())

    bound = min(entropy(pc.ravel()), entropy(pe.ravel()))
    return max(mi, 0.0), (max(mi, 0.0) / bound if bound > 1e-12 else 0.0)


def separation(table: np.ndarray) -> float:
    """I(expert; condition) / log2(min(conditions, experts)) of a (C, E) count table: 1 when the layer splits the
    (equally frequent) conditions over as many experts as it has, or gives each condition its own expert; 0 when
    the expert says nothing about the condition, or every condition shares one expert."""
    present = int((table.sum(axis=1) > 0).sum())
    capacity = np.log2(min(present, table.shape[1])) if present > 1 and table.shape[1] > 1 else 0.0
    return mutual_information(table)[0] / capacity if capacity > 0 else 0.0


def conditions(calibration: Calibration, rec: LayerRouting) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per axis (embodiment, action space, task, step): the condition names and each row's condition id. An action
    space is one action-space descriptor, named by the embodiments that share it."""
    sample = rec.sample[0].numpy()
    legend = descriptor_legend(calibration)
    spaces = ["+".join(legend["".join(map(str, row))])
              for row in (calibration.descriptor > 0.5).int().tolist()]
    out = {}
    for axis, values in (("embodiment", calibration.embodiment), ("action space", spaces),
                         ("task", calibration.task)):
        names = sorted(set(values))
        ids = np.array([names.index(v) for v in values])
        out[axis] = (names, ids[sample])
    steps = len(calibration.noise)
    out["step"] = ([f"{s} (noise {float(calibration.noise[s]):.2f})" for s in range(steps)], rec.step[0].numpy())
    return out


# ---- router distillation ---------------------------------------------------------------------------------------


def router_features(calibration: Calibration, rec: LayerRouting) -> tuple[np.ndarray, list[str]]:
    """(N, P) tree inputs of a token-independent layer's rows: the descriptor bits that vary between the calibration
    samples (named by action slot) and the step's noise fraction."""
    desc = calibration.descriptor.numpy() > 0.5
    varying = [j for j in range(desc.shape[1]) if desc[:, j].any() and not desc[:, j].all()]
    sample, step = rec.sample[0].numpy(), rec.step[0].numpy()
    columns = [desc[sample][:, varying].astype(np.float64), calibration.noise.numpy()[step][:, None]]
    return np.concatenate(columns, axis=1), [f"action slot {j} used" for j in varying] + ["noise fraction"]


def expert_set_labels(index: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(N,) class ids of each row's selected expert set and the class names ("expert 2", "experts 0+3")."""
    keys = [tuple(sorted(row)) for row in index.tolist()]
    classes = sorted(set(keys))
    names = [("expert " if len(c) == 1 else "experts ") + "+".join(map(str, c)) for c in classes]
    return np.array([classes.index(k) for k in keys]), names


def distil_router(calibration: Calibration, rec: LayerRouting, max_depth: int) -> tuple[DecisionTree, float]:
    """The tree and its agreement (fraction of rows where it names the router's expert set)."""
    x, feature_names = router_features(calibration, rec)
    y, class_names = expert_set_labels(rec.index[0].numpy())
    tree = DecisionTree(max_depth, feature_names, class_names).fit(x, y)
    return tree, float((tree.predict(x) == y).mean())


# ---- the report ------------------------------------------------------------------------------------------------


def draw_usage(tables: dict[str, tuple[list[str], np.ndarray]], title: str, path: Path) -> Path:
    """One heatmap per axis (rows normalised to the share of that condition's selections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.2 + 0.12 * max(
        len(n) for n, _ in tables.values())), squeeze=False)
    for ax, (axis, (names, table)) in zip(axes[0], tables.items(), strict=True):
        share = table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(table.shape[1]), [str(e) for e in range(table.shape[1])])
        ax.set_yticks(range(len(names)), [n if len(n) <= 32 else n[:29] + "..." for n in names], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"per {axis}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def descriptor_legend(calibration: Calibration) -> dict[str, list[str]]:
    """Descriptor ('0'/'1' per action slot) -> the embodiments of the calibration samples that have it."""
    legend: dict[str, set[str]] = {}
    for row, name in zip((calibration.descriptor > 0.5).int().tolist(), calibration.embodiment, strict=True):
        legend.setdefault("".join(map(str, row)), set()).add(name)
    return {k: sorted(v) for k, v in legend.items()}


def write_report(calibration: Calibration, out: str | Path, max_depth: int = 3) -> dict:
    """Heatmaps, scores and trees of every routed layer into `out`; returns what report.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers, md = [], ["# Routing report", "",
                      f"{calibration.num_samples} observations x {len(calibration.noise)} denoising steps.", "",
                      "Descriptors: " + "; ".join(f"`{k}` = {', '.join(v)}"
                                                  for k, v in descriptor_legend(calibration).items()), ""]
    for i, rec in sorted(calibration.layers.items()):
        axes = conditions(calibration, rec)
        tables = {axis: (names, usage_table(rec, ids, len(names))) for axis, (names, ids) in axes.items()}
        tag = f"layer{i}_{rec.kind}"
        draw_usage(tables, f"layer {i} ({rec.kind}): expert usage", out / f"{tag}_usage.png")
        entry = {"layer": i, "kind": rec.kind, "num_experts": rec.num_experts, "top_k": rec.top_k,
                 "rows": rec.rows, "usage_png": f"{tag}_usage.png", "specialisation": {}, "usage": {}}
        md += [f"## Layer {i} ({rec.kind}, {rec.num_experts} experts, top-{rec.top_k})", "",
               f"![usage]({tag}_usage.png)", "", "| condition | I(expert; condition) bits | normalised | separation |",
               "|---|---|---|---|"]
        for axis, (names, table) in tables.items():
            mi, nmi = mutual_information(table)
            sep = separation(table)
            entry["specialisation"][axis] = {"mutual_information_bits": mi, "normalised": nmi, "separation": sep}
            entry["usage"][axis] = {n: row.tolist() for n, row in zip(names, table, strict=True)}
            md.append(f"| {axis} | {mi:.3f} | {nmi:.3f} | {sep:.3f} |")
        md.append("")
        if rec.kind in TOKEN_INDEPENDENT:
            tree, agreement = distil_router(calibration, rec, max_depth)
            tree.draw(out / f"{tag}_tree.png", title=f"layer {i} ({rec.kind}) router, agreement {agreement:.1%}")
            text = tree.to_text()
            entry["tree"] = {"text": text, "agreement": agreement, "depth": tree.depth(), "png": f"{tag}_tree.png"}
            md += [f"Decision tree distilled from the router (depth {tree.depth()}, agrees on {agreement:.1%} of "
                   "the rows):", "", "```", text, "```", "", f"![tree]({tag}_tree.png)", ""]
        layers.append(entry)
    report = {"samples": calibration.num_samples, "noise": calibration.noise.tolist(),
              "descriptors": descriptor_legend(calibration), "layers": layers}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text("\n".join(md))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla.tools.routing_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="checkpoint directory (or a run's `last`)")
    p.add_argument("--data", default=None, help="mixture file or LeRobot dataset (default: the training mixture)")
    p.add_argument("--out", required=True, help="directory for report.md, report.json and the PNGs")
    p.add_argument("--samples", type=int, default=256, help="observations to run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=3, help="maximum depth of the distilled trees")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    from vla.policy import CheckpointError, VLAPolicy

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.samples < 1 or args.batch_size < 1 or args.depth < 0:
            raise ValueError(f"--samples and --batch-size must be >= 1 and --depth >= 0, got {args.samples}, "
                             f"{args.batch_size} and {args.depth}")
        policy = VLAPolicy.from_pretrained(args.policy)
        data = resolve_data(args.data, policy)
        with torch.no_grad():
            calibration = collect_routing(policy, mixture_batches(policy, data, args.batch_size), args.samples,
                                          max_rows=1 << 20, seed=args.seed)
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"routing_report: {e}") from None
    report = write_report(calibration, args.out, args.depth)
    for layer in report["layers"]:
        spec = ", ".join(f"{a} {v['normalised']:.2f} (separation {v['separation']:.2f})"
                         for a, v in layer["specialisation"].items())
        tree = f"; tree agreement {layer['tree']['agreement']:.1%}" if "tree" in layer else ""
        logger.info("layer %d (%s): specialisation (normalised MI) %s%s", layer["layer"], layer["kind"], spec, tree)
    logger.info("wrote %s", Path(args.out) / "report.md")
    return report


if __name__ == "__main__":
    main()

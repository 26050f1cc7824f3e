"""A small depth-limited classification tree (CART, Gini impurity), printed as text and drawn with matplotlib.

Enough to distil a token-independent router into a rule a person can read: the inputs are a handful of
descriptor bits and one noise level, the labels a few expert sets. Written here rather than pulled from a
machine-learning library, which the framework does not otherwise need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Node:
    """A tree node: a split `x[feature] <= threshold` (left) or a leaf (feature = -1).

    Attributes:
        label: majority class of the training rows that reach the node; counts: rows per class there.
    """

    label: int
    counts: np.ndarray
    feature: int = -1
    threshold: float = 0.0
    left: Node | None = None
    right: Node | None = None

    @property
    def is_leaf(self) -> bool:
        return self.feature < 0


def _gini(counts: np.ndarray) -> float:
    total = counts.sum()
    return 0.0 if total == 0 else 1.0 - float(((counts / total) ** 2).sum())


class DecisionTree:
    """Fit with `fit(x, y)`; `predict(x)`; `to_text()`; `draw(path)`.

    Args:
        max_depth: splits from the root to any leaf.
        feature_names: a name per column of x; class_names: a name per label.
    """

    def __init__(self, max_depth: int, feature_names: list[str], class_names: list[str]) -> None:
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        self.max_depth, self.feature_names, self.class_names = max_depth, feature_names, class_names
        self.root: Node | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> DecisionTree:
        """x: (N, P) float features; y: (N,) int labels in [0, len(class_names))."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names) or y.shape != (x.shape[0],) or not len(y):
            raise ValueError(f"DecisionTree.fit: x must be (N, {len(self.feature_names)}) and y (N,) with N > 0, got "
                             f"{x.shape} and {y.shape}")
        self.root = self._grow(x, y, 0)
        return self

    def _counts(self, y: np.ndarray) -> np.ndarray:
        return np.bincount(y, minlength=len(self.class_names))

    def _grow(self, x: np.ndarray, y: np.ndarray, depth: int) -> Node:
        counts = self._counts(y)
        node = Node(label=int(counts.argmax()), counts=counts)
        if depth >= self.max_depth or (counts > 0).sum() <= 1:
            return node
        best = None  # (impurity, feature, threshold)
        for f in range(x.shape[1]):
            values = np.unique(x[:, f])
            for t in (values[:-1] + values[1:]) / 2:
                left = x[:, f] <= t
                impurity = (left.sum() * _gini(self._counts(y[left])) +
                            (~left).sum() * _gini(self._counts(y[~left]))) / len(y)
                if best is None or impurity < best[0] - 1e-12:
                    best = (impurity, f, float(t))
        if best is None or best[0] >= _gini(counts) - 1e-12:
            return node
        _, node.feature, node.threshold = best
        left = x[:, node.feature] <= node.threshold
        node.left = self._grow(x[left], y[left], depth + 1)
        node.right = self._grow(x[~left], y[~left], depth + 1)
        return node

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.root is None:
            raise RuntimeError("DecisionTree.predict before fit")
        x = np.asarray(x, dtype=np.float64)
        out = np.empty(len(x), dtype=np.int64)
        for i, row in enumerate(x):
            node = self.root
            while not node.is_leaf:
                node = node.left if row[node.feature] <= node.threshold else node.right
            out[i] = node.label
        return out

    def depth(self) -> int:
        def walk(node: Node) -> int:
            return 0 if node.is_leaf else 1 + max(walk(node.left), walk(node.right))
        return walk(self.root)

    def _leaf_text(self, node: Node) -> str:
        share = node.counts[node.label] / max(node.counts.sum(), 1)
        return f"{self.class_names[node.label]}  ({node.counts.sum()} rows, {share:.0%} agree)"

    def to_text(self) -> str:
        """The tree as indented if/else lines."""
        lines: list[str] = []

        def walk(node: Node, indent: str) -> None:
            if node.is_leaf:
                lines.append(f"{indent}-> {self._leaf_text(node)}")
                return
            name = self.feature_names[node.feature]
            lines.append(f"{indent}if {name} <= {node.threshold:.3g}:")
            walk(node.left, indent + "    ")
            lines.append(f"{indent}else:  # {name} > {node.threshold:.3g}")
            walk(node.right, indent + "    ")

        walk(self.root, "")
        return "\n".join(lines)

    def draw(self, path: str | Path, title: str = "") -> Path:
        """Boxes and edges, leaves spread evenly at the bottom; written as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        positions: dict[int, tuple[float, float]] = {}
        leaves = [0]

        def place(node: Node, depth: int) -> float:
            if node.is_leaf:
                x = float(leaves[0])
                leaves[0] += 1
            else:
                x = (place(node.left, depth + 1) + place(node.right, depth + 1)) / 2
            positions[id(node)] = (x, -depth)
            return x

        place(self.root, 0)
        width, height = max(leaves[0], 1), self.depth() + 1
        fig, ax = plt.subplots(figsize=(max(4.0, 2.6 * width), 1.6 * height + 0.8))

        def draw_node(node: Node) -> None:
            x, y = positions[id(node)]
            if node.is_leaf:
                text, colour = self._leaf_text(node).replace("  (", "\n("), "#dcefdc"
            else:
                text, colour = f"{self.feature_names[node.feature]}\n<= {node.threshold:.3g}", "#dde6f5"
            for child, tag in ((node.left, "yes"), (node.right, "no")):
                if child is not None:
                    cx, cy = positions[id(child)]
                    ax.plot([x, cx], [y, cy], color="0.5", zorder=1)
                    ax.text((x + cx) / 2, (y + cy) / 2, tag, fontsize=7, color="0.3", ha="center")
                    draw_node(child)
            ax.text(x, y, text, ha="center", va="center", fontsize=8, zorder=2,
                    bbox={"boxstyle": "round", "facecolor": colour, "edgecolor": "0.4"})

        draw_node(self.root)
        ax.set_xlim(-0.7, width - 0.3)
        ax.set_ylim(-height + 0.4, 0.6)
        ax.axis("off")
        if title:
            ax.set_title(title, fontsize=9)
        path = Path(path)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

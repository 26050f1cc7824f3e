"""Per-embodiment normalization of states and actions (fp32, saved with every checkpoint).

Statistics are computed in float64 from the raw state/action columns of each dataset (never from LeRobot's
stored image stats, which overflow for uint8 frames), merged exactly across the datasets that share an embodiment,
and kept as float32 tensors. Two modes:

- "quantile": q01 -> -1, q99 -> +1, clipped to [-1, 1] (robust to the rare outlier of teleoperated data);
- "mean_std": zero mean, unit variance, unclipped.

`unnormalize(normalize(x)) == x` for every x inside [q01, q99] (quantile) or everywhere (mean_std). A dimension
that never moves (range or std below `eps`) normalizes to 0 and unnormalizes to its centre, so a constant
gripper-qpos column does not explode.

    stats = {"libero_panda": {"state": compute_stats(states), "action": compute_stats(actions)}}
    norm = Normalizer(stats, mode="quantile")
    a_n = norm.normalize(torch.from_numpy(actions), "libero_panda", "action")
    norm.save(checkpoint_dir); Normalizer.load(checkpoint_dir)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max")
KEYS = ("state", "action")
TENSORS_FILE = "normalization.safetensors"
META_FILE = "normalization.json"
Mode = Literal["quantile", "mean_std"]


def compute_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """(N, D) samples -> {mean, std, q01, q99, min, max: (D,) float32, count: int}, computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"compute_stats expects a non-empty (N, D) array, got shape {x.shape}")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    stats = {
        "mean": x.mean(0), "std": x.std(0), "q01": q01, "q99": q99, "min": x.min(0), "max": x.max(0),
    }
    out: dict[str, np.ndarray] = {k: v.astype(np.float32) for k, v in stats.items()}
    out["count"] = np.asarray(x.shape[0], dtype=np.int64)
    return out


class Normalizer:
    """Normalizes native-size state/action vectors per embodiment, in fp32 whatever the input dtype.

    Args:
        stats: {embodiment: {"state": {stat: (D,)}, "action": {stat: (D,)}}} with the STAT_NAMES (numpy or torch).
        mode: "quantile" or "mean_std".
        eps: ranges / stds below this are treated as constant dimensions.
        sources: optional {embodiment: [dataset names]} recorded in normalization.json for provenance.
    """

    def __init__(
        self,
        stats: Mapping[str, Mapping[str, Mapping[str, np.ndarray | torch.Tensor]]],
        mode: Mode = "quantile",
        eps: float = 1e-6,
        sources: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if mode not in ("quantile", "mean_std"):
            raise ValueError(f"normalization mode must be 'quantile' or 'mean_std', got '{mode}'")
        self.mode: Mode = mode
        self.eps = float(eps)
        self.sources = {k: list(v) for k, v in (sources or {}).items()}
        self.stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        problems = []
        for emb, per_key in stats.items():
            self.stats[emb] = {}
            for key in KEYS:
                if key not in per_key:
                    problems.append(f"{emb}: no '{key}' statistics")
                    continue
                entry = {}
                for s in STAT_NAMES:
                    if s not in per_key[key]:
                        problems.append(f"{emb}.{key}: missing '{s}'")
                        continue
                    entry[s] = torch.as_tensor(np.asarray(per_key[key][s]), dtype=torch.float32).reshape(-1)
                if "count" in per_key[key]:
                    entry["count"] = torch.as_tensor(np.asarray(per_key[key]["count"]), dtype=torch.int64).reshape(())
                self.stats[emb][key] = entry
        if problems:
            raise ValueError("invalid normalization statistics:\n" + "\n".join(f"  - {p}" for p in problems))
        self._affine: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for emb, per_key in self.stats.items():
            for key, s in per_key.items():
                self._affine[(emb, key)] = self._center_scale(s)

    def _center_scale(self, s: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_n = (x - center) / scale, with constant dimensions given scale = inf (so x_n = 0)."""
        if self.mode == "quantile":
            center, scale = (s["q99"] + s["q01"]) / 2, (s["q99"] - s["q01"]) / 2
        else:
            center, scale = s["mean"], s["std"]
        return center, torch.where(scale < self.eps, torch.full_like(scale, float("inf")), scale)

    @property
    def embodiments(self) -> list[str]:
        return list(self.stats)

    def _lookup(self, embodiment: str, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (embodiment, key) not in self._affine:
            if embodiment not in self.stats:
                raise KeyError(f"no normalization statistics for embodiment '{embodiment}'; "
                               f"have: {', '.join(self.stats) or '(none)'}")
            raise KeyError(f"unknown key '{key}': use one of {KEYS}")
        center, scale = self._affine[(embodiment, key)]
        if x.shape[-1] != center.shape[0]:
            raise ValueError(f"{embodiment} {key}: statistics have {center.shape[0]} dims, input has shape "
                             f"{tuple(x.shape)}")
        return center.to(x.device), scale.to(x.device)

    def normalize(self, x: torch.Tensor, embodiment: str, key: Literal["state", "action"]) -> torch.Tensor:
        """(..., D) native units -> (..., D) float32 normalized (clipped to [-1, 1] in quantile mode)."""
        x = torch.as_tensor(x)
        center, scale = self._lookup(embodiment, key, x)
        y = (x.float() - center) / scale
        return y.clamp(-1.0, 1.0) if self.mode == "quantile" else y

    def unnormalize(self, y: torch.Tensor, embodiment: str, key: Literal["state", "action"]) -> torch.Tensor:
        """(..., D) normalized -> (..., D) float32 in native units (constant dims come back as their centre)."""
        y = torch.as_tensor(y)
        center, scale = self._lookup(embodiment, key, y)
        finite = torch.where(torch.isinf(scale), torch.zeros_like(scale), scale)
        return y.float() * finite + center

    # ---- building -----------------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
        mode: Mode = "quantile",
        sources: Mapping[str, Sequence[str]] | None = None,
    ) -> Normalizer:
        """{embodiment: {"state": [(N_i, S) per dataset], "action": [...]}} -> Normalizer.

        Datasets sharing an embodiment are concatenated before the statistics are taken, so merged quantiles are
        exact rather than an average of per-dataset quantiles.
        """
        stats = {
            emb: {key: compute_stats(np.concatenate(list(per_key[key]), axis=0)) for key in KEYS}
            for emb, per_key in arrays.items()
        }
        return cls(stats, mode=mode, sources=sources)

    # ---- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{emb}/{key}/{s}": t for emb, pk in self.stats.items() for key, st in pk.items() for s, t in st.items()}

    def save(self, directory: str | Path) -> None:
        """Write normalization.safetensors (the tensors) + normalization.json (mode, eps, provenance)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / TENSORS_FILE))
        meta = {"mode": self.mode, "eps": self.eps, "embodiments": list(self.stats), "sources": self.sources}
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def exists(directory: str | Path) -> bool:
        """True if `directory` holds saved statistics."""
        return (Path(directory) / TENSORS_FILE).is_file() and (Path(directory) / META_FILE).is_file()

    @classmethod
    def load(cls, directory: str | Path, mode: Mode | None = None) -> Normalizer:
        """Read what `save` wrote; `mode` overrides the stored mode (the statistics hold both)."""
        d = Path(directory)
        for f in (TENSORS_FILE, META_FILE):
            if not (d / f).is_file():
                raise FileNotFoundError(f"no {f} in {d}")
        meta = json.loads((d / META_FILE).read_text())
        flat = load_file(str(d / TENSORS_FILE))
        stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for name, t in flat.items():
            emb, key, s = name.rsplit("/", 2)
            stats.setdefault(emb, {}).setdefault(key, {})[s] = t
        return cls(stats, mode=mode or meta["mode"], eps=meta.get("eps", 1e-6), sources=meta.get("sources"))

    def __repr__(self) -> str:
        return f"Normalizer(mode={self.mode}, embodiments={self.embodiments})"

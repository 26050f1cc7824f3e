"""Embodiments: where each robot's actions and states live inside one unified vector.

Robots disagree on everything a policy outputs: LIBERO's Panda sends 7 delta end-effector numbers, ALOHA 14 absolute
joint positions, a UR5e under OSC_POSITION control only 4. To train them together, every embodiment names the
*slots* of a shared `unified_dim`-sized vector its native dimensions occupy; the rest of the vector is zero and
masked out. The mask doubles as the action-space descriptor the HiMoE action-space router reads, so embodiments
that share a slot layout share routing, and a new robot is one registry entry (a JSON/YAML file) plus a dataset.

Slots are deliberately overlapping where the meaning agrees (every end-effector robot puts its gripper command in
slot 6, its position in slots 0-2), and every built-in fits in 16 slots so the small presets can mix them all.

    registry = default_registry()
    registry.merge_file("my_robots.yaml")          # adds or replaces entries
    emb = registry.get("libero_panda")
    u = emb.action_to_unified(actions, 24)          # (..., 7) -> (..., 24)
    a = emb.action_from_unified(u)                  # (..., 24) -> (..., 7)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REGISTRY_FILE = "embodiments.json"
"""File name of a saved registry (written next to every checkpoint so embodiment ids stay stable)."""


class EmbodimentError(ValueError):
    """An embodiment entry or registry file is invalid; the message lists every problem found."""


class UnknownEmbodimentError(KeyError):
    """A name is not in the registry; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message with quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Embodiment:
    """One robot's action/state spaces, control rate and cameras.

    Args:
        name: registry key, also the mixture files' `embodiment:` value.
        action_dim: native action size A.
        state_dim: native proprioceptive state size S.
        action_slots: the unified index of each native action dimension (length A, distinct).
        state_slots: the unified index of each native state dimension (length S, distinct).
        action_type: what the action means, e.g. "delta_eef" (OSC deltas), "rel_eef" (scaled relative pose),
            "delta_eef_pos" (position only), "abs_joint" (absolute joint targets).
        gripper: the gripper command convention in words, e.g. "-1 open, +1 close". Kept as the robot defines it:
            normalization statistics are per embodiment, so the sign needs no harmonising.
        fps: control rate in Hz at which actions are executed (the rate of its datasets).
        cameras: native camera name -> canonical camera name (`DataConfig.cameras`), the default mapping used when
            a mixture entry gives none.
        action_names: optional name per native action dimension (length A), for logs and docs.
        state_names: optional name per native state dimension (length S).
        description: one line on where the data comes from.
        obs_keys: observation key of a foreign client -> vla batch key (`vla.constants`), e.g. openpi's LIBERO
            client `{"observation/image": "observation.images.base", "prompt": "task"}`; the policy server
            (`vla.serve`) and the remote evaluation client rename with it, so a new client is a registry entry.
    """

    name: str
    action_dim: int
    state_dim: int
    action_type: str
    fps: float
    action_slots: tuple[int, ...] = ()
    state_slots: tuple[int, ...] = ()
    gripper: str = ""
    cameras: dict[str, str] = field(default_factory=dict)
    action_names: tuple[str, ...] = ()
    state_names: tuple[str, ...] = ()
    description: str = ""
    obs_keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Slots default to the first dims; lists from JSON/YAML become tuples so equality is by value.
        set_ = object.__setattr__
        for kind in ("action", "state"):
            slots = getattr(self, f"{kind}_slots")
            dim = getattr(self, f"{kind}_dim")
            if isinstance(slots, str):
                slots = parse_slots(slots)
            if not slots and isinstance(dim, int) and dim > 0:
                slots = range(dim)
            set_(self, f"{kind}_slots", tuple(int(s) for s in slots))
            set_(self, f"{kind}_names", tuple(getattr(self, f"{kind}_names")))
        set_(self, "cameras", dict(self.cameras))
        set_(self, "obs_keys", dict(self.obs_keys))
        problems = self.problems()
        if problems:
            raise EmbodimentError(f"embodiment '{self.name}' is invalid:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        """Every inconsistency of the entry (empty when valid)."""
        out = []
        if not self.name or not isinstance(self.name, str):
            out.append(f"name must be a non-empty string, got {self.name!r}")
        for kind in ("action", "state"):
            dim, slots = getattr(self, f"{kind}_dim"), getattr(self, f"{kind}_slots")
            names = getattr(self, f"{kind}_names")
            if not isinstance(dim, int) or dim <= 0:
                out.append(f"{kind}_dim must be a positive int, got {dim!r}")
                continue
            if len(slots) != dim:
                out.append(f"{kind}_slots has {len(slots)} entries but {kind}_dim is {dim}")
            if len(set(slots)) != len(slots):
                dup = sorted({s for s in slots if slots.count(s) > 1})
                out.append(f"{kind}_slots repeats slot(s) {dup}")
            if any(s < 0 for s in slots):
                out.append(f"{kind}_slots has negative slot(s) {sorted(s for s in slots if s < 0)}")
            if names and len(names) != dim:
                out.append(f"{kind}_names has {len(names)} entries but {kind}_dim is {dim}")
        if not isinstance(self.fps, int | float) or self.fps <= 0:
            out.append(f"fps must be > 0, got {self.fps!r}")
        if not self.action_type:
            out.append("action_type is empty (e.g. 'delta_eef', 'abs_joint')")
        canon = list(self.cameras.values())
        dup = sorted({c for c in canon if canon.count(c) > 1})
        if dup:
            out.append(f"cameras maps several native cameras to the same canonical name(s) {dup}")
        targets = list(self.obs_keys.values())
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            out.append(f"obs_keys maps several client keys to the same vla key(s) {dup}")
        return out

    # ---- unified vectors -----------------------------------------------------------------------------------------
    @property
    def action_extent(self) -> int:
        """Smallest unified size that holds every action slot."""
        return max(self.action_slots) + 1

    @property
    def state_extent(self) -> int:
        """Smallest unified size that holds every state slot."""
        return max(self.state_slots) + 1

    @cached_property
    def _action_index(self) -> torch.Tensor:
        return torch.tensor(self.action_slots, dtype=torch.long)

    @cached_property
    def _state_index(self) -> torch.Tensor:
        return torch.tensor(self.state_slots, dtype=torch.long)

    def action_to_unified(self, action: torch.Tensor, unified_dim: int) -> torch.Tensor:
        """(..., action_dim) native -> (..., unified_dim), zero outside the embodiment's slots."""
        return self._scatter(action, self._action_index, self.action_dim, unified_dim, "action")

    def action_from_unified(self, unified: torch.Tensor) -> torch.Tensor:
        """(..., unified_dim) -> (..., action_dim): the embodiment's slots, in native order."""
        return self._gather(unified, self._action_index, "action")

    def state_to_unified(self, state: torch.Tensor, unified_dim: int) -> torch.Tensor:
        """(..., state_dim) native -> (..., unified_dim), zero outside the embodiment's slots."""
        return self._scatter(state, self._state_index, self.state_dim, unified_dim, "state")

    def state_from_unified(self, unified: torch.Tensor) -> torch.Tensor:
        """(..., unified_dim) -> (..., state_dim)."""
        return self._gather(unified, self._state_index, "state")

    def action_mask(self, unified_dim: int) -> torch.Tensor:
        """(unified_dim,) bool, True at the action slots."""
        self._check_fits(unified_dim, self.action_extent, "action")
        mask = torch.zeros(unified_dim, dtype=torch.bool)
        mask[self._action_index] = True
        return mask

    def state_mask(self, unified_dim: int) -> torch.Tensor:
        """(unified_dim,) bool, True at the state slots."""
        self._check_fits(unified_dim, self.state_extent, "state")
        mask = torch.zeros(unified_dim, dtype=torch.bool)
        mask[self._state_index] = True
        return mask

    def _scatter(self, x: torch.Tensor, index: torch.Tensor, dim: int, unified_dim: int, kind: str) -> torch.Tensor:
        if x.shape[-1] != dim:
            raise ValueError(f"{self.name}: expected {kind} of size {dim} in the last dim, got shape {tuple(x.shape)}")
        self._check_fits(unified_dim, max(index.tolist()) + 1, kind)
        out = x.new_zeros(*x.shape[:-1], unified_dim)
        out[..., index.to(x.device)] = x
        return out

    def _gather(self, unified: torch.Tensor, index: torch.Tensor, kind: str) -> torch.Tensor:
        self._check_fits(unified.shape[-1], max(index.tolist()) + 1, kind)
        return unified.index_select(-1, index.to(unified.device))

    def _check_fits(self, unified_dim: int, extent: int, kind: str) -> None:
        if unified_dim < extent:
            raise ValueError(
                f"embodiment '{self.name}' uses {kind} slot {extent - 1} but the unified {kind} vector has only "
                f"{unified_dim} slots (raise data.unified_{kind}_dim to >= {extent})"
            )

    # ---- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("action_slots", "state_slots", "action_names", "state_names"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Embodiment:
        """Build from a JSON/YAML mapping; unknown or missing keys raise EmbodimentError naming them."""
        if not isinstance(data, Mapping):
            raise EmbodimentError(f"an embodiment entry must be a mapping, got {type(data).__name__}: {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        name = data.get("name", "<unnamed>")
        problems = []
        unknown = sorted(set(data) - set(fields))
        if unknown:
            close = {u: difflib.get_close_matches(u, fields, n=1) for u in unknown}
            hints = [f"{u} (did you mean {c[0]}?)" if c else u for u, c in close.items()]
            problems.append(f"unknown key(s) {', '.join(hints)}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and
                    f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            problems.append(f"missing required key(s) {missing}")
        if problems:
            raise EmbodimentError(f"embodiment '{name}' is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
        return cls(**dict(data))


def parse_slots(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Slots from a list of ints or a compact string of indices and half-open ranges: "0:6,6" -> (0,...,5,6)."""
    if not isinstance(spec, str):
        return tuple(int(s) for s in spec)
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                lo, hi = (int(v) for v in part.split(":"))
                out.extend(range(lo, hi))
            else:
                out.append(int(part))
        except ValueError:
            raise EmbodimentError(f"cannot parse slot spec '{spec}': use ints and half-open ranges like '0:6,7'") from None
    return tuple(out)


class EmbodimentRegistry:
    """Ordered name -> Embodiment map. The order defines `embodiment_id`, so a registry is saved with every
    checkpoint and new entries are appended (a replaced entry keeps its index)."""

    def __init__(self, embodiments: Iterable[Embodiment] = ()) -> None:
        self._items: dict[str, Embodiment] = {}
        for emb in embodiments:
            self.add(emb)

    # ---- lookup ---------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Embodiment:
        if name not in self._items:
            raise UnknownEmbodimentError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._items, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown embodiment '{name}'{hint}; known embodiments: {', '.join(self._items) or '(none)'}"

    def index(self, name: str) -> int:
        """The embodiment id: position in the registry."""
        self.get(name)
        return list(self._items).index(name)

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Embodiment]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"EmbodimentRegistry({', '.join(self._items)})"

    # ---- edits ----------------------------------------------------------------------------------------------------
    def add(self, emb: Embodiment, *, replace: bool = False) -> None:
        """Append `emb`; an existing name raises unless `replace` (then it keeps its index)."""
        old = self._items.get(emb.name)
        if old is not None and old != emb and not replace:
            raise EmbodimentError(f"embodiment '{emb.name}' is already registered with a different definition "
                                  "(pass replace=True to override it)")
        if old is not None and old != emb:
            logger.info("embodiment '%s' replaced by a new definition", emb.name)
        self._items[emb.name] = emb

    def merge_file(self, path: str | Path) -> list[str]:
        """Add (or replace) the entries of a JSON/YAML file; returns their names.

        The file holds a list of entries or `{"embodiments": [...]}`. Every invalid entry is reported in one
        EmbodimentError and nothing is added unless the whole file is valid.
        """
        path = Path(path)
        if not path.is_file():
            raise EmbodimentError(f"embodiments file not found: {path}")
        try:
            data = load_structured(path)
        except (OSError, ValueError) as e:
            raise EmbodimentError(f"cannot parse embodiments file {path}: {e}") from None
        return self.merge_entries(data.get("embodiments", data) if isinstance(data, dict) else data, source=str(path))

    def merge_entries(self, entries: Any, *, source: str = "entries") -> list[str]:
        """Validate every entry, then add/replace them all (all-or-nothing). Returns the names added."""
        if not isinstance(entries, list):
            raise EmbodimentError(f"{source}: expected a list of embodiment entries, got {type(entries).__name__}")
        built, problems = [], []
        for i, entry in enumerate(entries):
            try:
                built.append(Embodiment.from_dict(entry))
            except EmbodimentError as e:
                problems.append(f"entry {i}: {e}")
        names = [e.name for e in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"name(s) defined more than once: {dup}")
        if problems:
            raise EmbodimentError(f"{source} has {len(problems)} problem(s):\n" + "\n".join(problems))
        for emb in built:
            self.add(emb, replace=True)
        return names

    def copy(self) -> EmbodimentRegistry:
        return EmbodimentRegistry(self)

    # ---- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"embodiments": [e.to_dict() for e in self]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbodimentRegistry:
        reg = cls()
        reg.merge_entries(data.get("embodiments"), source="registry dict")
        return reg

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REGISTRY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EmbodimentRegistry:
        path = Path(directory) / REGISTRY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {REGISTRY_FILE} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))


def load_structured(path: Path) -> Any:
    """Parse a .json, .yaml or .yml file; syntax errors raise ValueError with the parser's message."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


# ---- built-ins -------------------------------------------------------------------------------------------------
OPENPI_LIBERO_KEYS = {
    "observation/image": "observation.images.base",
    "observation/wrist_image": "observation.images.wrist",
    "observation/state": "observation.state",
    "prompt": "task",
}
"""The observation keys of openpi's LIBERO client (its examples/libero/main.py) -> vla batch keys."""
_EEF_ACTION = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
_EEF_STATE = ("eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_q0", "gripper_q1")
_ALOHA_JOINTS = tuple(
    f"{arm}_{j}" for arm in ("left", "right")
    for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")
)


def default_registry() -> EmbodimentRegistry:
    """The built-in embodiments, in a fixed order (their ids): libero_panda, calvin_panda, robosuite_ur5e_osc, aloha.

    Unified layout: 0-2 end-effector position (delta or absolute), 3-5 end-effector rotation, 6 gripper command
    or first gripper finger; CALVIN's joints sit at 8-14; ALOHA's two 7-joint arms fill 0-13.
    """
    return EmbodimentRegistry([
        Embodiment(
            name="libero_panda", action_dim=7, state_dim=8, action_type="delta_eef", fps=20,
            action_slots=tuple(range(7)), state_slots=tuple(range(8)),
            gripper="-1 open, +1 close", cameras={"agentview": "base", "wrist": "wrist"},
            action_names=_EEF_ACTION, state_names=_EEF_STATE,
            description="Franka Panda in LIBERO (robosuite OSC_POSE): delta eef position/axis-angle scaled to "
                        "[-1, 1] (1 = 0.05 m / 0.5 rad) + gripper; state eef pos, axis-angle, 2 finger qpos",
            obs_keys=OPENPI_LIBERO_KEYS,
        ),
        Embodiment(
            name="calvin_panda", action_dim=7, state_dim=15, action_type="rel_eef", fps=30,
            action_slots=tuple(range(7)), state_slots=(*range(7), *range(8, 16)),
            gripper="-1 close, +1 open", cameras={"rgb_static": "base", "rgb_gripper": "wrist"},
            action_names=("rel_x", "rel_y", "rel_z", "rel_roll", "rel_pitch", "rel_yaw", "gripper"),
            state_names=("tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
                         *(f"joint_{i}" for i in range(7)), "gripper_action"),
            description="Franka Panda in CALVIN: rel_actions (position x50, orientation x20, clipped to [-1, 1]) + "
                        "binary gripper; state = CALVIN robot_obs (15)",
        ),
        Embodiment(
            name="robosuite_ur5e_osc", action_dim=4, state_dim=8, action_type="delta_eef_pos", fps=20,
            action_slots=(0, 1, 2, 6), state_slots=tuple(range(8)),
            gripper="-1 open, +1 close", cameras={"frontview": "base", "robot0_eye_in_hand": "wrist"},
            action_names=("dx", "dy", "dz", "gripper"), state_names=_EEF_STATE,
            description="UR5e in robosuite 1.4 with OSC_POSITION control: delta eef position + gripper (fixed "
                        "orientation); state eef pos, axis-angle, 2 gripper joint qpos",
        ),
        Embodiment(
            name="aloha", action_dim=14, state_dim=14, action_type="abs_joint", fps=50,
            action_slots=tuple(range(14)), state_slots=tuple(range(14)),
            gripper="absolute gripper opening per arm (dims 6 and 13), larger = more open",
            cameras={"cam_high": "base", "cam_left_wrist": "wrist", "cam_right_wrist": "wrist_right"},
            action_names=_ALOHA_JOINTS, state_names=_ALOHA_JOINTS,
            description="ALOHA bimanual: 2 x (6 arm joints + gripper) absolute positions",
        ),
    ])


def build_registry(embodiments_file: str = "") -> EmbodimentRegistry:
    """The built-ins plus the entries of `embodiments_file` (`DataConfig.embodiments_file`), if given."""
    reg = default_registry()
    if embodiments_file:
        reg.merge_file(embodiments_file)
    return reg

"""Config system: presets, JSON round trip, command-line overrides and their errors."""

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from vla.config import PRESETS, ConfigError, VLAConfig, apply_overrides, field_types, get_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_json_round_trip_is_exact(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    again = VLAConfig.from_json(path)
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    # tuples come back as tuples, not lists
    assert isinstance(again.data.cameras, tuple)


def test_overrides_parse_every_field_type():
    cfg = apply_overrides(
        get_preset("debug"),
        {
            "action.hb_num_experts": "8",
            "train.lr": "3e-4",
            "data.augment": "false",
            "data.cameras": "base,wrist,left",
            "objective.kind": "edm",
            "action.moh.horizons": "2,4",
            "train.betas": "0.9,0.99",
        },
    )
    assert cfg.action.hb_num_experts == 8
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.augment is False
    assert cfg.data.cameras == ("base", "wrist", "left")
    assert cfg.objective.kind == "edm"
    assert cfg.action.moh.horizons == (2, 4)
    assert cfg.train.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"action.num_expert": "8"}, "unknown option --action.num_expert"),
        ({"action.hb_num_experts": "eight"}, "--action.hb_num_experts expects int, got 'eight'"),
        ({"objective.kind": "ddpm"}, "--objective.kind must be one of ['flow', 'edm'], got 'ddpm'"),
        ({"action.layers": "d,xx"}, "unknown layer kind(s) ['xx']"),
        ({"action.hb_top_k": "9"}, "action.hb_top_k=9 must be between 1 and action.hb_num_experts=4"),
        ({"train.betas": "0.9"}, "--train.betas expects"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("debug"), overrides)
    assert message in str(e.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean tiny-cpu"):
        get_preset("tiny_cpu")


def test_from_dict_rejects_unknown_fields():
    data = get_preset("debug").to_dict()
    data["action"]["width_typo"] = 3
    with pytest.raises(ConfigError, match="action.width_typo"):
        VLAConfig.from_dict(data)


def leaf_value(cfg: VLAConfig, name: str):
    obj = cfg
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def matches(value, tp) -> bool:
    """Whether `value` is of the declared field type `tp` (bool is not an int here; floats must be floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def as_flag(value) -> str:
    """How a user types a value on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_leaf_field_has_its_declared_type_and_survives_the_command_line(preset):
    """Each field of each preset holds a value of its declared type, and typing that value as a flag
    (`--a.b value`) gives it back exactly: the override parser handles every field type the config uses."""
    cfg = get_preset(preset)
    types = field_types()
    assert "action.moh.dynamic" in types and types["action.moh.dynamic"] is bool
    wrong = {name: (leaf_value(cfg, name), tp) for name, tp in types.items() if not matches(leaf_value(cfg, name), tp)}
    assert not wrong, wrong
    for name in types:
        value = leaf_value(cfg, name)
        if value == () or value == "":
            continue  # an empty tuple or string has no flag spelling of its own
        again = leaf_value(apply_overrides(get_preset(preset), {name: as_flag(value)}), name)
        assert again == value and type(again) is type(value), (name, value, again)


def test_presets_are_fresh_copies():
    a, b = get_preset("tiny-cpu"), get_preset("tiny-cpu")
    a.action.width = 8
    assert b.action.width != 8
    assert dataclasses.replace(b, preset="x").preset == "x"


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=REPO)


def test_train_help_lists_presets():
    out = _run("--help")
    assert out.returncode == 0
    for name in PRESETS:
        assert name in out.stdout


def test_every_config_field_is_described_and_help_prints_it():
    """Each field's description lives in its dataclass's `Args:` docstring; `--help` prints its spelling and text."""
    from vla.cli import overrides_help
    from vla.config import field_docs

    docs = field_docs()
    assert docs.keys() == field_types().keys()
    assert not [name for name, text in docs.items() if not text], "fields without a description in Args:"
    assert docs["action.as_num_experts"] == docs["action.as_top_k"]  # `a, b: text` describes both
    assert docs["train.steps"] and "\n" not in docs["action.nm_selection"]  # continuation lines joined
    text = overrides_help()
    assert "  --action.norm layernorm|rmsnorm\n" in text
    assert "  --action.moh.horizons INT,...\n" in text
    assert "  --data.image_size INT\n" in text
    assert " ".join(docs["action.chunk_size"].split()[:4]) in text
    assert "\n  --preset " not in text  # the option of its own, not an override


def test_print_config_prints_resolved_json():
    out = _run("--preset", "tiny-cpu", "--train.steps", "7", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = VLAConfig.from_dict(json.loads(out.stdout))
    assert cfg.preset == "tiny-cpu" and cfg.train.steps == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--action.nope", "1"], "unknown option --action.nope"),
        (["--train.steps", "many"], "--train.steps expects int, got 'many'"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(args, message):
    out = _run(*args, "--print-config")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], out.stderr

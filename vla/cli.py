"""Command-line parsing shared by `train.py`, `eval/*.py` and the console scripts.

A run is `--preset NAME` (or `--config run/config.json`), then any dotted field override: `--action.layers d,d,hb,hb`,
`--train.steps 200`. Unknown options and values of the wrong type exit with status 2 and one line naming them,
before anything is built.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from vla.config import (
    PRESETS,
    ConfigError,
    VLAConfig,
    apply_overrides,
    field_docs,
    field_types,
    get_preset,
    metavar,
)


def build_parser(prog: str, description: str, default_preset: str = "tiny-cpu") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=overrides_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=default_preset, help=f"named preset ({', '.join(PRESETS)})")
    parser.add_argument("--config", default="", help="a config.json written by an earlier run (replaces --preset)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def overrides_help(width: int = 116) -> str:
    """The `--help` epilog: the presets, then every config field by section with its spelling and description."""
    types, docs = field_types(), field_docs()
    lines = ["presets: " + ", ".join(PRESETS), "",
             "overrides: any config field, e.g. --train.steps 200 (`--print-config` shows a preset's values)"]
    section = ""
    for name, tp in types.items():
        if name == "preset":  # the option above
            continue
        if name.split(".")[0] != section:
            section = name.split(".")[0]
            lines += ["", f"{section}:"]
        lines.append(f"  --{name} {metavar(tp)}")
        lines += textwrap.wrap(docs[name], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, VLAConfig]:
    """Parse known flags, then treat every remaining `--a.b value` pair as a config override."""
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            parser.exit(2, f"{parser.prog}: error: unexpected argument '{tok}'\n")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                parser.exit(2, f"{parser.prog}: error: option --{key} needs a value\n")
            value = rest[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = value
        i += 1
    try:
        cfg = VLAConfig.from_json(args.config) if args.config else get_preset(args.preset)
        cfg = apply_overrides(cfg, overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.print_config:
        print(cfg.to_json())
        parser.exit(0)
    return args, cfg


def train_main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser("train.py", "Train a vla policy (single process, or under `accelerate launch`).")
    _, cfg = parse_config(parser, argv)
    from vla.data.lerobot_source import SampleError
    from vla.data.mixture import MixtureError
    from vla.policy import CheckpointError
    from vla.training import TrainingDiverged, train

    try:
        train(cfg)
    except (MixtureError, SampleError, TrainingDiverged, ConfigError, CheckpointError) as e:
        # problems found in the data or the run: one message, no traceback (the run's log has the details)
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def eval_libero_main(argv: Sequence[str] | None = None) -> None:
    from vla.sim.libero import main

    main(argv)


def eval_calvin_main(argv: Sequence[str] | None = None) -> None:
    from vla.sim.calvin import main

    main(argv)


def eval_robosuite_main(argv: Sequence[str] | None = None) -> None:
    from vla.sim.robosuite import main

    main(argv)


if __name__ == "__main__":  # pragma: no cover
    train_main(sys.argv[1:])

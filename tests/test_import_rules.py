"""The package's dependency arrows, checked on the source: config -> data -> backbones / action -> policy ->
training / sim. Heads and backbones meet only in the policy (through `vla.prefix`), and a policy runs without a
trainer (its checkpoint location rules come from `vla.layout`)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vla"


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports count too), as dotted names; a
    `from pkg import name` also counts as importing `pkg.name`, since the name may be a submodule."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(subpackage: str) -> list[Path]:
    root = PACKAGE / subpackage
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


def offending(paths: list[Path], forbidden: str) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        hits = sorted(m for m in imported_modules(path) if m == forbidden or m.startswith(forbidden + "."))
        if hits:
            bad[str(path.relative_to(PACKAGE.parent))] = hits
    return bad


def test_the_parser_sees_every_import_form(tmp_path, monkeypatch):
    """The rule checker itself: plain, from, relative and function-level imports are all found."""
    pkg = tmp_path / "vla" / "action"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("import vla.backbones.base\nfrom vla import backbones\nfrom ..training import layout\n"
                   "def f():\n    from vla.backbones.prefix import Prefix\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "vla")
    found = imported_modules(src)
    assert {"vla.backbones.base", "vla.backbones", "vla.training.layout", "vla.backbones.prefix"} <= found


@pytest.mark.parametrize("subpackage, forbidden", [
    ("action", "vla.backbones"),      # the hand-off type is vla.prefix; heads and backbones meet in the policy
    ("backbones", "vla.action"),
    ("policy", "vla.training"),       # a policy loads and acts without the trainer (vla.layout, not training)
    ("config", "vla.data"),           # config is the root of the arrows
    ("config", "vla.action"),
    ("data", "vla.policy"),
    ("action", "vla.policy"),
    ("backbones", "vla.policy"),
    ("layout", "vla.training"),
    ("prefix", "vla.backbones"),
])
def test_import_rule(subpackage, forbidden):
    paths = sources(subpackage)
    assert paths and all(p.exists() for p in paths), f"no sources for vla/{subpackage}"
    assert offending(paths, forbidden) == {}, f"vla/{subpackage} must not import {forbidden}"

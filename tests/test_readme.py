"""The README and the docs keep their promises: every flag they name exists, every headline number has a source.

Commands are checked against the real argument parsers (each script's `--help`, run in this process), so a renamed
or removed flag fails here instead of in a reader's terminal. The results table's numbers must appear in
`bench/results.md` (what `make bench` writes) or in a `docs/` page that names the command producing them.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# entry points whose flags are checked; anything else in a code block (make, pip, git, curl, vla-eval) is not ours
SCRIPTS = ("train.py", "eval/libero.py", "eval/calvin.py", "eval/robosuite.py", "bench/run.py",
           "bench/bench_learning.py", "bench/bench_hetero.py", "bench/bench_scale.py", "bench/bench_serve.py",
           "bench/gpu_check.py")
MODULES = ("vla.serve", "vla.serve.vla_eval_server", "vla.tools.merge_experts", "vla.tools.routing_report")


def code_commands(text: str) -> list[list[str]]:
    """Shell commands of the ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def entry_and_flags(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(script or module, the --flags given to it) for a command that runs one of ours, else None."""
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
            rest = tokens[i + 2:]
            return tokens[i + 1], [t.split("=")[0] for t in rest if t.startswith("--")]
        if tok in SCRIPTS:
            rest = tokens[i + 1:]
            return tok, [t.split("=")[0] for t in rest if t.startswith("--")]
    return None


@cache
def help_text(entry: str) -> str:
    """The `--help` output of a script or module, run in this process (no interpreter start-up per entry)."""
    out = io.StringIO()
    argv, path = sys.argv, list(sys.path)
    sys.argv = [entry, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            if entry in MODULES:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / entry), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
    return out.getvalue()


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for tokens in code_commands(doc.read_text()):
            hit = entry_and_flags(tokens)
            if hit:
                found.append((doc.name, *hit))
    return found


def test_the_docs_run_our_entry_points():
    entries = {entry for _, entry, _ in documented_commands()}
    assert {"train.py", "eval/libero.py", "eval/calvin.py", "vla.serve"} <= entries, entries


@pytest.mark.parametrize("entry", sorted({e for _, e, _ in documented_commands()}))
def test_every_documented_flag_exists(entry):
    text = help_text(entry)
    assert "usage" in text.lower(), f"{entry} --help printed no usage:\n{text[:500]}"
    missing = sorted({f"{doc}: {flag}" for doc, e, flags in documented_commands() if e == entry for flag in flags
                      if not re.search(rf"(?<![\w.-]){re.escape(flag)}(?![\w.-])", text)})
    assert not missing, f"flags named in the docs that {entry} does not accept: {missing}"


def test_the_flag_check_catches_a_flag_that_does_not_exist():
    hit = entry_and_flags(shlex.split("python eval/calvin.py --policy x --num-sequences 1000"))
    assert hit == ("eval/calvin.py", ["--policy", "--num-sequences"])
    assert not re.search(r"(?<![\w.-])--num-sequences(?![\w.-])", help_text("eval/calvin.py"))


def results_table_numbers(readme: str) -> list[tuple[str, str]]:
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    numbers = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers += [(cells[0], n) for n in re.findall(r"\d+(?:\.\d+)?\s*%?", cells[1])]
    return numbers


def test_every_headline_number_has_a_source():
    readme = (ROOT / "README.md").read_text()
    corpus = (ROOT / "bench" / "results.md").read_text() + "".join(p.read_text() for p in DOCS[2:])
    numbers = results_table_numbers(readme)
    assert len(numbers) >= 10
    unsourced = []
    for what, token in numbers:
        value = token.rstrip("% ").strip()
        candidates = {value}
        if token.endswith("%"):
            candidates.add(f"{float(value) / 100:g}")
        if not any(re.search(rf"(?<![\d.]){re.escape(c)}(?![\d])", corpus) for c in candidates):
            unsourced.append(f"{what}: {token}")
    assert not unsourced, f"README numbers found in neither bench/results.md nor docs/: {unsourced}"

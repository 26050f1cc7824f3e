#!/usr/bin/env python
"""Run every benchmark in bench/ and write bench/results.json + bench/results.md.

A benchmark is a module `bench/bench_<name>.py` with `run(quick: bool) -> list[dict]`; each dict is one result:

    {"benchmark": "expert cache", "metric": "uncached / cached time", "value": 2.3, "goal": ">= 2",
     "met": True, "figures": {"cached_ms": 10.1, "uncached_ms": 23.4}, "notes": "MoDE shape, 10 steps"}

Ratios are measured side by side in one run; nothing here asserts timings. `--only NAME` runs one module,
`--skip NAME,...` leaves modules out (`learning` trains and evaluates policies: hours at full size), `--quick`
shrinks sizes for a smoke run. Modules run in name order, so `merge` (expert merging, bench_merge.py) finds the
checkpoints `learning` trained.

Bookkeeping, so that every figure on the page says how it was made:
- every row records the date it was measured and its mode, `full` or `quick`; the table marks quick rows;
- with `--only` or `--skip`, the rows of modules not run this time are kept from the existing results.json; so are
  the rows a module did not produce when it says it ran only part of itself (its optional `partial() -> bool`,
  e.g. bench_learning with some arms chosen);
- a quick run never replaces or removes a full row: a quick row whose full counterpart exists is not recorded
  (the run says so), and quick rows are only written where no full measurement of that row exists;
- a failed measurement fails the run: a module that raises, or a row that reports an `error`, makes this script
  exit non-zero after writing the page (which shows the error rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FULL, QUICK = "full", "quick"


def discover(only: str | None, skip: str = "", where: Path | None = None) -> list[Path]:
    """The benchmark files of `where` (default: this folder) that `--only` / `--skip` select."""
    files = sorted((where or HERE).glob("bench_*.py"))
    names = {f.stem.removeprefix("bench_") for f in files}
    unknown = [n for n in [only or "", *skip.split(",")] if n.strip() and n.strip().removeprefix("bench_") not in names]
    if unknown:
        raise SystemExit(f"bench/run.py: no benchmark named {unknown} in {where or HERE}; benchmarks: {sorted(names)}")
    if only:
        files = [f for f in files if f.stem.removeprefix("bench_") == only.removeprefix("bench_")]
    skipped = {n.strip().removeprefix("bench_") for n in skip.split(",") if n.strip()}
    return [f for f in files if f.stem.removeprefix("bench_") not in skipped]


def row_key(row: dict) -> tuple[str, str]:
    return row.get("benchmark", ""), row.get("metric", "")


def row_mode(row: dict) -> str:
    """`full` or `quick`; a row written before modes were recorded reads `?` (never taken for a full one)."""
    return row.get("mode", "?")


def read_rows(out: Path) -> list[dict]:
    """The rows of the existing results.json in `out` (none when there is none), each with its date."""
    path = out / "results.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    rows = old.get("results", [])
    for r in rows:
        r.setdefault("date", old.get("meta", {}).get("date", "?"))
    return rows


def merge(old: list[dict], new: list[dict], replaced: set[str], quick: bool) -> tuple[list[dict], list[dict]]:
    """(rows to record, new quick rows not recorded because a full row of the same key exists).

    Old rows stay unless this run replaces them: a row with the key of a new row, or any row of a module in
    `replaced` (the modules that ran in full). A quick run replaces quick rows only: every full row survives it."""
    full_keys = {row_key(r) for r in old if row_mode(r) == FULL}
    dropped = [r for r in new if quick and row_key(r) in full_keys]
    new = [r for r in new if r not in dropped]
    fresh = {row_key(r) for r in new}

    def replaced_by_this_run(r: dict) -> bool:
        if quick and row_mode(r) == FULL:
            return False
        return r.get("module") in replaced or row_key(r) in fresh

    kept = [r for r in old if not replaced_by_this_run(r)]
    return sorted(kept + new, key=lambda r: r.get("module", "")), dropped


def kept_rows(out: Path, replaced: set[str], new: list[dict]) -> list[dict]:
    """Rows of the existing results.json that a full run producing `new` (modules `replaced` ran in full) keeps."""
    fresh = {row_key(r) for r in new}
    return [r for r in read_rows(out) if r.get("module") not in replaced and row_key(r) not in fresh]


def failed_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows that report a failed measurement (`error` set, or an `error` value/metric) instead of a figure."""
    return [r for r in rows if r.get("error") or r.get("value") == "error" or r.get("metric") == "error"]


def run_module(path: Path, quick: bool) -> tuple[list[dict], bool]:
    """The module's rows, and whether it ran only part of itself (its `partial()`, False when it has none)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    start = time.perf_counter()
    results = module.run(quick=quick)
    for r in results:
        r.setdefault("module", path.stem)
        r.setdefault("seconds", round(time.perf_counter() - start, 1))
    return results, bool(getattr(module, "partial", lambda: False)())


def to_markdown(results: list[dict], meta: dict) -> str:
    quick_rows = sum(row_mode(r) == QUICK for r in results)
    lines = [
        "# Benchmarks",
        "",
        f"Last run {meta['date']} on {meta['machine']} ({meta['threads']} torch threads, torch {meta['torch']}); "
        "each row gives its own date when it is older. Ratios are measured side by side in one run. Regenerate "
        "with `make bench`.",
    ]
    if quick_rows:
        lines += ["", f"{quick_rows} row(s) marked **quick** come from `bench/run.py --quick` (reduced sizes and "
                      "repeats: a smoke run of the code, not a measurement to quote); `make bench` replaces them."]
    lines += [
        "",
        "| benchmark | metric | value | goal | met | mode | figures | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = {True: "yes", False: "no", None: "-"}[r.get("met")]
        notes = r.get("notes", "")
        if r.get("error"):
            notes = f"FAILED: {r['error']}"
        if r.get("date", meta["date"]) != meta["date"]:
            notes = f"{notes} (measured {r['date']})".strip()
        mode = {QUICK: "**quick**", FULL: "full"}.get(row_mode(r), "?")
        value = r.get("value")
        value = f"{value:.3g}" if isinstance(value, float) else str(value)
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {r['benchmark']} | {r['metric']} | {value} | {r.get('goal', '')} | {met} | {mode} | "
                     f"{figures} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only bench_<NAME>.py")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out, e.g. learning")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run (rows marked quick)")
    parser.add_argument("--out", default=str(HERE), help="directory for results.json / results.md")
    args = parser.parse_args(argv)

    mode = QUICK if args.quick else FULL
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    results: list[dict] = []
    failed, in_full = [], set()
    modules = discover(args.only, args.skip)
    for path in modules:
        print(f"== {path.stem}", flush=True)
        try:
            rows, partial = run_module(path, args.quick)
            results.extend({**r, "date": meta["date"], "mode": mode} for r in rows)
            if not partial:
                in_full.add(path.stem)
        except Exception as e:  # one broken benchmark must not hide the others; the run still fails below
            traceback.print_exc()
            failed.append(path.stem)
            in_full.add(path.stem)
            results.append({"benchmark": path.stem, "metric": "error", "value": "error", "error": f"{type(e).__name__}: {e}",
                            "goal": "", "met": None, "module": path.stem, "date": meta["date"], "mode": mode})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors = failed_rows(results)
    dropped: list[dict] = []
    if args.quick or args.only or args.skip or len(in_full) < len(modules):
        results, dropped = merge(read_rows(out), results, in_full, quick=args.quick)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))
    for r in dropped:
        print(f"not recorded (a full measurement exists): {r['benchmark']} / {r['metric']} = {r['value']} (quick)")
    if errors:
        lines = [f"  {r.get('module', '?')}: {r['benchmark']}: {r.get('error') or r.get('notes', '')}" for r in errors]
        print("\n".join(["", "BENCHMARKS FAILED (their rows say error):", *lines]), file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

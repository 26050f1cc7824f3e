#!/usr/bin/env python
"""Run every benchmark in bench/ and write bench/results.json + bench/results.md.

A benchmark is a module `bench/bench_<name>.py` with `run(quick: bool) -> list[dict]`; each dict is one result:

    {"benchmark": "expert cache", "metric": "uncached / cached time", "value": 2.3, "goal": ">= 2",
     "met": True, "figures": {"cached_ms": 10.1, "uncached_ms": 23.4}, "notes": "MoDE shape, 10 steps"}

Ratios are measured side by side in one run; nothing here asserts timings. `--only NAME` runs one module,
`--skip NAME,...` leaves modules out (`learning` trains and evaluates policies: hours at full size), `--quick`
shrinks sizes for a smoke run. With `--only` or `--skip`, the rows of modules not run this time are kept from the
existing results.json; so are the rows a module did not produce when it says it ran only part of itself (its
optional `partial() -> bool`, e.g. bench_learning with some arms chosen). Every row carries the date it was
measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def discover(only: str | None, skip: str = "") -> list[Path]:
    files = sorted(HERE.glob("bench_*.py"))
    names = {f.stem.removeprefix("bench_") for f in files}
    unknown = [n for n in [only or "", *skip.split(",")] if n and n.removeprefix("bench_") not in names]
    if unknown:
        raise SystemExit(f"bench/run.py: no benchmark named {unknown} in {HERE}; benchmarks: {sorted(names)}")
    if only:
        files = [f for f in files if f.stem.removeprefix("bench_") == only.removeprefix("bench_")]
    skipped = {n.strip().removeprefix("bench_") for n in skip.split(",") if n.strip()}
    return [f for f in files if f.stem.removeprefix("bench_") not in skipped]


def kept_rows(out: Path, replaced: set[str], new: list[dict]) -> list[dict]:
    """Rows of earlier runs that this run does not replace (a partial run must not erase the rest of the page):
    every row of a module outside `replaced` (the modules run in full) that no new row has the key of."""
    path = out / "results.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    fresh = {row_key(r) for r in new}
    rows = [r for r in old.get("results", []) if r.get("module") not in replaced and row_key(r) not in fresh]
    for r in rows:
        r.setdefault("date", old.get("meta", {}).get("date", "?"))
    return rows


def row_key(row: dict) -> tuple[str, str]:
    return row.get("benchmark", ""), row.get("metric", "")


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
    lines = [
        "# Benchmarks",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['threads']} torch threads, torch {meta['torch']}).",
        "Ratios are measured side by side in one run. Regenerate with `make bench`"
        + (" (this page: `bench/run.py --quick`, reduced sizes and repeats)." if meta.get("quick") else "."),
        "",
        "| benchmark | metric | value | goal | met | figures | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = {True: "yes", False: "no", None: "-"}[r.get("met")]
        if r.get("date", meta["date"]) != meta["date"]:
            r = {**r, "notes": f"{r.get('notes', '')} (measured {r['date']})".strip()}
        value = r.get("value")
        value = f"{value:.3g}" if isinstance(value, float) else str(value)
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {r['benchmark']} | {r['metric']} | {value} | {r.get('goal', '')} | {met} | {figures} | {r.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only bench_<NAME>.py")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out, e.g. learning")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=str(HERE), help="directory for results.json / results.md")
    args = parser.parse_args()

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
            results.extend({**r, "date": meta["date"]} for r in rows)
            if not partial:
                in_full.add(path.stem)
        except Exception as e:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(path.stem)
            in_full.add(path.stem)
            results.append({"benchmark": path.stem, "metric": "error", "value": f"{type(e).__name__}: {e}",
                            "goal": "", "met": False, "module": path.stem, "date": meta["date"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only or args.skip or len(in_full) < len(modules):
        results = sorted(kept_rows(out, in_full, results) + results, key=lambda r: r.get("module", ""))
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

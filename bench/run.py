#!/usr/bin/env python
"""Run every benchmark in bench/ and write bench/results.json + bench/results.md.

A benchmark is a module `bench/bench_<name>.py` with `run(quick: bool) -> list[dict]`; each dict is one result:

    {"benchmark": "expert cache", "metric": "uncached / cached time", "value": 2.3, "goal": ">= 2",
     "met": True, "figures": {"cached_ms": 10.1, "uncached_ms": 23.4}, "notes": "MoDE shape, 10 steps"}

Ratios are measured side by side in one run; nothing here asserts timings. `--only NAME` runs one module,
`--quick` shrinks sizes for a smoke run.
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


def discover(only: str | None) -> list[Path]:
    files = sorted(HERE.glob("bench_*.py"))
    if only:
        files = [f for f in files if f.stem == f"bench_{only}" or f.stem == only]
        if not files:
            raise SystemExit(f"bench/run.py: no benchmark named '{only}' in {HERE}")
    return files


def run_module(path: Path, quick: bool) -> list[dict]:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    start = time.perf_counter()
    results = module.run(quick=quick)
    for r in results:
        r.setdefault("module", path.stem)
        r.setdefault("seconds", round(time.perf_counter() - start, 1))
    return results


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
        value = r.get("value")
        value = f"{value:.3g}" if isinstance(value, float) else str(value)
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {r['benchmark']} | {r['metric']} | {value} | {r.get('goal', '')} | {met} | {figures} | {r.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only bench_<NAME>.py")
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
    failed = []
    for path in discover(args.only):
        print(f"== {path.stem}", flush=True)
        try:
            results.extend(run_module(path, args.quick))
        except Exception as e:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(path.stem)
            results.append({"benchmark": path.stem, "metric": "error", "value": f"{type(e).__name__}: {e}",
                            "goal": "", "met": False, "module": path.stem})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""bench/run.py keeps the rows a partial run does not replace."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH_RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_bench(path: Path, monkeypatch):
    """Import a bench/ script as run.py does, undoing its sys.modules and sys.path changes after the test."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # bench_learning puts the repository on sys.path
    spec.loader.exec_module(module)
    return module


def row(module: str, benchmark: str, value: float) -> dict:
    return {"module": module, "benchmark": benchmark, "metric": "success", "value": value}


def test_partial_runs_keep_the_rows_they_do_not_replace(tmp_path, monkeypatch):
    run = load_bench(BENCH_RUN, monkeypatch)
    old = [row("bench_learning", "learning: dense", 0.82), row("bench_learning", "learning: mode", 0.5),
           row("bench_policy", "chunk rate", 13.0)]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"date": "before"}, "results": old}))
    new = [row("bench_learning", "learning: mode", 0.68)]

    # bench_learning ran some arms only: its other arms' rows and every other module's rows stay
    kept = run.kept_rows(tmp_path, replaced=set(), new=new)
    assert [(r["benchmark"], r["value"]) for r in kept] == [("learning: dense", 0.82), ("chunk rate", 13.0)]
    assert all(r["date"] == "before" for r in kept)

    # bench_learning ran in full: only the other modules' rows stay
    kept = run.kept_rows(tmp_path, replaced={"bench_learning"}, new=new)
    assert [r["benchmark"] for r in kept] == ["chunk rate"]


def test_bench_learning_is_partial_when_some_arms_are_chosen(monkeypatch):
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    monkeypatch.delenv(module.ARMS_ENV, raising=False)
    assert not module.partial()
    monkeypatch.setenv(module.ARMS_ENV, "dense,mode")
    assert module.partial()
    monkeypatch.setenv(module.ARMS_ENV, ",".join(module.ARMS))
    assert not module.partial()


def test_lerobot_log_of_a_resumed_run_keeps_the_later_record_of_each_step(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from vla.training.layout import point_last_to

    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    ckpt = tmp_path / "step-000050"
    ckpt.mkdir()
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(5)}, str(ckpt / "model.safetensors"))
    point_last_to(tmp_path, ckpt)
    # steps 25 and 50 were logged, the run stopped before its next checkpoint, and resumed from step 25
    records = [(25, 0.5, 0.2), (50, 0.4, 0.2), (50, 0.3, 0.25), (75, 0.2, 0.25)]
    (tmp_path / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": loss, "steps_per_s": rate}) + "\n" for s, loss, rate in records))

    losses, rates, params_m = module.lerobot_training_log(tmp_path)
    assert losses == [(25, 0.5), (50, 0.3), (75, 0.2)]
    assert rates == [0.2, 0.25, 0.25]
    assert params_m == 17 / 1e6

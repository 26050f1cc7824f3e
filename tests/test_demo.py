"""`make demo` at reduced size: real scripted demonstrations -> training -> official-protocol LIBERO evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.sim
def test_quick_demo_runs_every_stage_and_writes_the_outputs(tmp_path):
    cmd = [sys.executable, "-m", "vla.demo", "--quick", "--run", "quick", "--workdir", str(tmp_path), "--workers", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    dataset = tmp_path / "datasets" / "local" / "libero_object_0_2ep"
    assert (dataset / "meta" / "info.json").exists()
    run = tmp_path / "checkpoints" / "quick"
    log = (run / "train.log").read_text()
    losses = [float(x.split("loss=")[1].split()[0]) for x in log.splitlines() if " loss=" in x]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    assert min(losses[len(losses) // 2:]) < losses[0], f"training loss did not fall: {losses}"

    eval_dir = run / "eval" / "libero_object"
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["summary"]["episodes"] == 2
    assert (eval_dir / "results.md").exists() and (eval_dir / "success_per_task.png").exists()
    assert list((eval_dir / "videos").glob("*.mp4"))

    # a second run skips finished work: no new checkpoint, the evaluation resumes with nothing to do
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stdout + again.stderr

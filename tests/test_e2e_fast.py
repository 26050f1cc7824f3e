"""Fast end-to-end paths, as a user types them: `train.py` on a generated dataset, `eval/libero.py` on the
checkpoint it wrote, a policy that has learnt to use its image and its instruction, and the README's other
entry points (`--config`, `--data.embodiments_file`, `--backbone.freeze all`, a hub id resolved offline).

Also the test suite's own guard: where the `sim` extra is installed, a broken simulator import fails the
simulator tests instead of skipping them (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla.config import VLAConfig, get_preset
from vla.policy import VLAPolicy
from vla.training.layout import PRETRAINED_DIR, list_checkpoints, read_last

REPO = Path(__file__).resolve().parents[1]


def env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_DATASETS_CACHE=str(tmp / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false", MUJOCO_GL="egl")


def train_py(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env(tmp),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SMALL = ("--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0", "--train.log_every", "1")


@pytest.fixture(scope="module")
def panda_data(tmp_path_factory, write_lerobot_dataset) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "panda"
    return write_lerobot_dataset(root, robot_type="libero_panda", action_dim=7, state_dim=8, episodes=(10, 10),
                                 tasks=("pick up the alphabet soup and place it in the basket",))


@pytest.fixture(scope="module")
def debug_run(panda_data, tmp_path_factory) -> Path:
    """Two steps of the `debug` preset through `train.py`, the way the README starts a run."""
    out = tmp_path_factory.mktemp("e2e_runs")
    train_py(out, "--preset", "debug", "--data.mixture", str(panda_data), "--data.embodiment", "libero_panda",
             "--train.output_dir", str(out), "--train.run_name", "debug", "--train.steps", "2",
             "--train.save_every", "2", *SMALL)
    return out / "debug"


def test_train_py_runs_the_debug_preset_and_writes_a_loadable_checkpoint(debug_run):
    assert [p.name for p in list_checkpoints(debug_run)] == ["step-000002"]
    state = json.loads((read_last(debug_run) / "training_state" / "trainer_state.json").read_text())
    assert state["step"] == 2
    policy = VLAPolicy.from_pretrained(debug_run / "last")
    assert policy.config.preset == "debug" and "libero_panda" in policy.normalizer.embodiments
    obs = {"observation.images.base": np.zeros((32, 32, 3), np.uint8),
           "observation.images.wrist": np.zeros((32, 32, 3), np.uint8),
           "observation.state": np.zeros(8, np.float32), "task": "pick up the alphabet soup",
           "embodiment": "libero_panda"}
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (1, policy.config.action.chunk_size, 7) and torch.isfinite(chunk).all()


@pytest.mark.sim
def test_eval_libero_runs_one_short_episode_of_the_trained_checkpoint(debug_run, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "libero.py"), "--policy", str(debug_run / "last"), "--suite",
         "libero_object", "--tasks", "0", "--episodes", "1", "--max-steps", "4", "--workers", "1", "--videos", "0",
         "--no-failure-videos", "--no-progress", "--image-size", "32", "--out", str(out)],
        cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["episodes"] == 1 and results["summary"]["errors"] == 0
    (record,) = [r for t in results["tasks"] for r in t["records"]]
    assert record["steps"] == 4 and record["policy_queries"] >= 2  # debug executes 2 actions per chunk
    assert results["protocol"]["init_states"].startswith("benchmark fixed init states")


def test_config_file_embodiments_file_and_frozen_backbone_through_train_py(write_lerobot_dataset, tmp_path):
    """`--config` (a config.json replaces --preset), `--data.embodiments_file` (a robot the registry does not
    know) and `--backbone.freeze all` (only the head trains), all through `train.py`."""
    data = write_lerobot_dataset(tmp_path / "my_arm", robot_type="my_arm", action_dim=5, state_dim=6,
                                 episodes=(8, 8))
    registry = tmp_path / "embodiments.json"
    registry.write_text(json.dumps({"embodiments": [{
        "name": "my_arm", "action_dim": 5, "state_dim": 6, "action_type": "delta_eef", "fps": 20,
        "action_slots": [0, 1, 2, 3, 6], "state_slots": list(range(6)),
        "cameras": {"agentview": "base", "wrist": "wrist"}}]}))
    cfg = get_preset("debug")
    cfg.train.steps, cfg.train.save_every, cfg.train.lr = 2, 1, 1e-2
    cfg.action.width = 48  # a value no preset has: it can only come from the file
    config = tmp_path / "config.json"
    cfg.to_json(config)
    train_py(tmp_path, "--config", str(config), "--data.mixture", str(data), "--data.embodiment", "my_arm",
             "--data.embodiments_file", str(registry), "--backbone.freeze", "all",
             "--train.output_dir", str(tmp_path), "--train.run_name", "custom", *SMALL)
    run = tmp_path / "custom"
    written = VLAConfig.from_json(read_last(run) / PRETRAINED_DIR / "config.json")
    assert written.action.width == 48 and written.backbone.freeze == "all"
    policy = VLAPolicy.from_pretrained(run / "last")
    assert policy.normalizer.embodiments == ["my_arm"] or set(policy.normalizer.embodiments) == {"my_arm"}
    assert policy.registry.get("my_arm").action_dim == 5

    step1, step2 = (load_file(str(p / PRETRAINED_DIR / "model.safetensors")) for p in list_checkpoints(run))
    # `all` freezes the vision and text encoders; their projections into the prefix and the head still train
    frozen = [k for k in step1 if k.startswith(("backbone.vision.", "backbone.text."))]
    assert {k.split(".")[1] for k in frozen} == {"vision", "text"}
    changed = [k for k in frozen if not torch.equal(step1[k], step2[k])]
    assert not changed, f"frozen encoder tensors changed: {changed[:5]}"
    for trained in ("head.", "backbone.image_proj."):
        assert any(not torch.equal(step1[k], step2[k]) for k in step1 if k.startswith(trained)), trained


# ---- the test suite's simulator guard ----------------------------------------------------------------------------


def test_sim_tests_fail_where_the_sim_extra_is_installed_but_broken(monkeypatch):
    import conftest

    assert conftest.sim_status()[0] == "ok"  # this environment: `make setup` installs the sim extra
    monkeypatch.setitem(sys.modules, "robosuite", None)  # `import robosuite` now raises ImportError
    state, reason = conftest.sim_status()
    assert state == "broken" and "robosuite" in reason


def test_sim_tests_skip_only_where_the_sim_extra_is_not_installed(monkeypatch):
    from importlib import metadata

    import conftest

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setitem(sys.modules, "robosuite", None)
    monkeypatch.setattr(metadata, "distribution", not_installed)
    monkeypatch.delenv(conftest.REQUIRE_SIM_ENV, raising=False)
    assert conftest.sim_status()[0] == "missing"
    monkeypatch.setenv(conftest.REQUIRE_SIM_ENV, "1")  # CI: the simulators must be there
    assert conftest.sim_status()[0] == "broken"


def test_the_guard_fails_or_skips_sim_tests_before_they_run(monkeypatch):
    import conftest

    class Item:
        keywords = {"sim": True}

    monkeypatch.setattr(conftest, "_SIM_STATUS", ("broken", "robosuite does not import"))
    with pytest.raises(pytest.fail.Exception, match="robosuite does not import"):
        conftest.pytest_runtest_setup(Item())
    monkeypatch.setattr(conftest, "_SIM_STATUS", ("missing", "not installed"))
    with pytest.raises(pytest.skip.Exception):
        conftest.pytest_runtest_setup(Item())

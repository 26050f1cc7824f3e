"""bench/lerobot_diffusion.py: lerobot's Diffusion Policy trains on our LeRobot data, resumes, and acts in our
evaluation's interface. The bench's reference arm runs for hours; these checks run it for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_bench_run import BENCH_RUN, load_bench

from vla.constants import OBS_STATE, image_key
from vla.training.layout import checkpoint_name, read_last

SCRIPT = BENCH_RUN.parent / "lerobot_diffusion.py"


@pytest.fixture(scope="module")
def panda_data(tmp_path_factory, write_lerobot_dataset) -> Path:
    root = tmp_path_factory.mktemp("lerobot_diffusion") / "panda"
    return write_lerobot_dataset(root, robot_type="libero_panda", action_dim=7, state_dim=8, episodes=(12, 12))


def test_trains_resumes_and_acts_through_our_evaluation_interface(panda_data, tmp_path, monkeypatch):
    module = load_bench(SCRIPT, monkeypatch)
    out = tmp_path / "run"
    options = dict(batch_size=2, num_workers=0, save_every=2, log_every=1, seed=0)
    module.train(panda_data, out, steps=2, **options)
    assert read_last(out).name == checkpoint_name(2)

    module.train(panda_data, out, steps=3, **options)  # resumes from step 2: only step 3 is trained
    assert read_last(out).name == checkpoint_name(3)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)

    agent = module.DiffusionAgent(read_last(out))
    rng = np.random.default_rng(0)
    observation = {image_key(cam): rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for cam in ("base", "wrist")}
    observation[OBS_STATE] = np.zeros(8, np.float32)
    agent.reset()
    action = agent.select_action(observation)
    assert action.shape == (7,) and np.isfinite(action).all()


def test_a_dataset_without_the_wrist_camera_is_refused_before_training(write_lerobot_dataset, tmp_path,
                                                                        monkeypatch):
    module = load_bench(SCRIPT, monkeypatch)
    root = write_lerobot_dataset(tmp_path / "one_camera", robot_type="libero_panda", action_dim=7, state_dim=8,
                                 cameras=("agentview",), episodes=(4,))
    with pytest.raises(ValueError, match="wrist"):
        module.train(root, tmp_path / "run", steps=2, batch_size=2, num_workers=0, save_every=2, log_every=1,
                     seed=0)
    assert not (tmp_path / "run").exists()

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
    return write_lerobot_dataset(root, robot_type="libero_panda", action_dim=7, state_dim=8, episodes=(12, 12),
                                 action_offset=ACTION_OFFSET)


ACTION_OFFSET = 10.0
"""The dataset's actions lie in [9, 11]: an action near 0 would be one the agent forgot to un-normalize."""


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

    stored = json.loads((read_last(out) / module.STATS_FILE).read_text())  # what the agent normalizes with
    for key in ("observation.images.agentview", "observation.images.wrist"):
        assert np.asarray(stored[key]["std"]).min() > 0.05, key

    agent = module.DiffusionAgent(read_last(out))
    rng = np.random.default_rng(0)
    observation = {image_key(cam): rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for cam in ("base", "wrist")}
    observation[OBS_STATE] = np.zeros(8, np.float32)
    agent.reset()
    actions = [agent.select_action(observation) for _ in range(agent.policy.config.n_action_steps + 1)]
    assert all(a.shape == (7,) and np.isfinite(a).all() for a in actions)
    # native units: lerobot samples in [-1, 1] (clipped) and maps back through the dataset's min/max
    stacked = np.stack(actions)
    assert (stacked > ACTION_OFFSET - 1.05).all() and (stacked < ACTION_OFFSET + 1.05).all(), stacked


def test_the_preprocessor_gets_float_image_statistics_of_the_decoded_frames(panda_data, monkeypatch):
    """lerobot 0.4.4's own image std overflows (uint8 squared) to ~0.001; the bench must hand over true values."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    module = load_bench(SCRIPT, monkeypatch)
    _, meta = module.diffusion_config(panda_data)
    stats = module.float_image_stats(panda_data, meta)
    ds = LeRobotDataset(repo_id=meta.repo_id, root=panda_data)
    for key in meta.camera_keys:
        frames = np.stack([ds[i][key].numpy().astype(np.float64) for i in range(len(ds))])  # (N, 3, H, W)
        np.testing.assert_allclose(np.asarray(stats[key]["mean"]).reshape(3), frames.mean(axis=(0, 2, 3)),
                                   rtol=1e-6)
        np.testing.assert_allclose(np.asarray(stats[key]["std"]).reshape(3), frames.std(axis=(0, 2, 3)),
                                   rtol=1e-6)
        assert np.asarray(stats[key]["std"]).shape == (3, 1, 1)
        assert np.asarray(stats[key]["std"]).min() > 0.05  # the brightness varies with the state
        normalized = (frames.max() - np.asarray(stats[key]["mean"]).max()) / np.asarray(stats[key]["std"]).min()
        assert normalized < 10  # images land in a few units, not hundreds
    assert stats.keys() == meta.stats.keys()  # the other features' statistics pass through


def test_a_dataset_without_the_wrist_camera_is_refused_before_training(write_lerobot_dataset, tmp_path,
                                                                        monkeypatch):
    module = load_bench(SCRIPT, monkeypatch)
    root = write_lerobot_dataset(tmp_path / "one_camera", robot_type="libero_panda", action_dim=7, state_dim=8,
                                 cameras=("agentview",), episodes=(4,))
    with pytest.raises(ValueError, match="wrist"):
        module.train(root, tmp_path / "run", steps=2, batch_size=2, num_workers=0, save_every=2, log_every=1,
                     seed=0)
    assert not (tmp_path / "run").exists()

"""Test-wide settings: offline hubs, headless rendering, deterministic CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Skip `sim` tests with a clear reason when the simulators are not installed."""
    try:
        import libero.libero  # noqa: F401
        import robosuite  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no simulator here"
        skip = pytest.mark.skip(reason=f"simulators not importable: {e}")
        for item in items:
            if "sim" in item.keywords:
                item.add_marker(skip)


def _write_lerobot_dataset(root, *, robot_type, action_dim, state_dim, cameras=("agentview", "wrist"),
                           hw=(32, 32), fps=20, episodes=(16, 16), tasks=("pick up the bowl",), seed=0):
    """Write a small LeRobot v3 image dataset at `root` (which must not exist) and return `root`.

    The data is learnable: each action is a fixed function of the state, and the images' brightness follows the
    first state entry, so a policy's loss can go down in a few steps.
    """
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {f"observation.images.{c}": {"dtype": "image", "shape": (*hw, 3),
                                            "names": ["height", "width", "channels"]} for c in cameras}
    features["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    ds = LeRobotDataset.create(root.name, fps=fps, features=features, root=root, robot_type=robot_type,
                               use_videos=False)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(state_dim, action_dim)) / np.sqrt(state_dim)
    for ep, length in enumerate(episodes):
        for _ in range(length):
            state = rng.normal(size=state_dim).astype(np.float32)
            level = int(128 + 100 * np.tanh(state[0]))
            frame = {f"observation.images.{c}": np.full((*hw, 3), level, np.uint8) for c in cameras}
            frame["observation.state"] = state
            frame["action"] = np.tanh(state @ w).astype(np.float32)
            frame["task"] = tasks[ep % len(tasks)]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root


@pytest.fixture(scope="session")
def write_lerobot_dataset(tmp_path_factory):
    """`write_lerobot_dataset(root, robot_type=..., action_dim=..., state_dim=..., **options)` writes a small
    LeRobot dataset (see `_write_lerobot_dataset`); Hugging Face `datasets` caches go to a temporary directory."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield _write_lerobot_dataset
    datasets.config.HF_DATASETS_CACHE = old


# tiny random VLMs (PaliGemma, Idefics3, Qwen2.5-VL) saved to disk once per session, for every test module
from fixtures.tiny_vlms import tiny_vlm_dirs_fixture  # noqa: F401

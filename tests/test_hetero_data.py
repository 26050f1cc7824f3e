"""The heterogeneous-robot data: robosuite generators of several embodiments, their registry entries, the
pretraining and held-out mixture files, and a policy trained on all of them acting in each robot's own space.

Fast: the generators' embodiment specs agree with `datasets/embodiments.yaml` and the mixture files; bad robot or
task names fail before any file is written; a mixture with every new embodiment's features trains the debug
preset for a few steps and `select_action` answers in each embodiment's own dimension and units; one real
simulator episode of the cheapest new robot loads with LeRobot and validates as a mixture.
Slow: one real episode of every other robosuite robot (the held-out Kinova3 included).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from vla.config import get_preset
from vla.data.embodiments import build_registry
from vla.data.mixture import load_mixture

ROOT = Path(__file__).resolve().parents[1]
EMBODIMENTS_FILE = ROOT / "datasets" / "embodiments.yaml"
PRETRAIN = ROOT / "datasets" / "mixtures" / "hetero_pretrain.yaml"
NEW_ROBOT = ROOT / "datasets" / "mixtures" / "hetero_new_robot.yaml"


def _generator():
    spec = importlib.util.spec_from_file_location("_gen_robosuite_expert_hetero", ROOT / "datasets" /
                                                  "robosuite_expert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rx = _generator()


def _mixture_entries(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["datasets"]


# ---- registry and mixture files (no simulator) ---------------------------------------------------------------------


def test_every_generator_embodiment_is_registered_with_its_recorded_layout():
    registry = build_registry(str(EMBODIMENTS_FILE))
    for robot, spec in rx.ROBOTS.items():
        emb = registry.get(spec.embodiment)
        assert emb.action_dim == len(spec.action_names), robot
        assert emb.state_dim == len(spec.state_names), robot
        assert emb.fps == spec.control_freq, robot
        assert list(emb.cameras) == list(spec.cameras), robot
        if emb.action_names:
            assert list(emb.action_names) == spec.action_names, robot
        assert emb.action_extent <= 16 and emb.state_extent <= 16, robot  # the debug preset's unified sizes


def test_pretraining_mixture_is_heterogeneous_and_holds_out_the_new_robot():
    registry = build_registry(str(EMBODIMENTS_FILE))
    pretrain = [e["embodiment"] for e in _mixture_entries(PRETRAIN)]
    held_out = [e["embodiment"] for e in _mixture_entries(NEW_ROBOT)]
    assert len(set(pretrain)) >= 5 and "libero_panda" in pretrain
    assert held_out == [rx.ROBOTS[rx.HELD_OUT_ROBOT].embodiment] and not set(held_out) & set(pretrain)
    embs = [registry.get(n) for n in pretrain]
    assert len({tuple(e.action_slots) for e in embs}) >= 4  # distinct action spaces (what the router sees)
    assert {e.action_dim for e in embs} >= {4, 7, 8, 14}
    assert len({e.fps for e in embs}) >= 2
    assert len({tuple(e.cameras) for e in embs}) >= 3
    by_embodiment = {rx.ROBOTS[r].embodiment: r for r in rx.ROBOTS}
    for entry in [*_mixture_entries(PRETRAIN), *_mixture_entries(NEW_ROBOT)]:
        robot = by_embodiment.get(entry["embodiment"])
        if robot is None:
            continue  # LIBERO's Panda comes from libero_expert.py
        spec = rx.ROBOTS[robot]
        assert Path(entry["dataset"]).name == f"{spec.out_prefix}_{'_'.join(spec.tasks)}"  # the default --out
        assert list(entry["cameras"]) == list(spec.cameras)


@pytest.mark.parametrize("argv, message", [
    (["--robot", "sawyer_osc_pose"], "invalid choice"),
    (["--robot", "panda_bimanual", "--tasks", "lift"], "cannot do task(s) ['lift']"),
    (["--robot", "kinova3_osc_pose", "--tasks", "push"], "--tasks must list distinct names"),
])
def test_bad_robot_or_task_fails_before_any_file_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        rx.main([*argv, "--out", str(out), "--no-progress"])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_default_task_output_and_image_size_follow_the_robot():
    args = rx.parse_args(["--robot", "panda_bimanual"])
    assert [rx.TASK_NAMES[t] for t in args.tasks] == ["two_arm_lift"] and args.image_size == 128
    assert rx.parse_args(["--robot", "iiwa_joint_position"]).image_size == 112
    assert rx.parse_args(["--robot", "iiwa_joint_position", "--image-size", "48"]).image_size == 48
    assert rx.parse_args([]).robot == "ur5e_osc_position"  # the existing UR5e datasets keep their command


def test_joint_adapter_maps_a_cartesian_step_through_the_jacobian():
    """The JOINT_POSITION expert asks for the joint step whose end-effector motion is the Cartesian step."""

    class Controller:
        J_full = torch.eye(6, 7).numpy() * 0.5  # joint j moves axis j by 0.5 per rad (joint 6 does nothing)

        def update(self, force=False):
            pass

    class Robot:
        controller = Controller()

    class Env:
        robots = [Robot()]

    import numpy as np

    adapter = rx.ArmAdapter(Env(), 0, "JOINT_POSITION", hold=np.eye(3))
    obs = {"robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0])}
    action = adapter.action(obs, np.array([0.2, 0.0, 0.0]), rx.CLOSE, None, 0.0)
    assert action.shape == (8,) and action[-1] == rx.CLOSE
    dq = action[:7] * rx.JOINT_SCALE / adapter.JOINT_GAIN
    np.testing.assert_allclose(Controller.J_full @ dq, [0.2 * rx.POS_SCALE, 0, 0, 0, 0, 0], atol=1e-3)
    # OSC_POSE holds the orientation: a hand turned by 0.2 rad about z is turned back
    pose = rx.ArmAdapter(Env(), 0, "OSC_POSE", hold=np.eye(3)).action(
        {"robot0_eef_quat": np.array([0.0, 0.0, np.sin(0.1), np.cos(0.1)])}, np.zeros(3), rx.OPEN, None, 0.0)
    np.testing.assert_allclose(pose[3:6], [0, 0, -0.2 / rx.ROT_SCALE], atol=1e-6)


# ---- a policy on every new embodiment (no simulator) ---------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_mixture_of_every_embodiment_trains_and_acts_in_each_native_space(tmp_path, write_lerobot_dataset,
                                                                          fresh_accelerate_state):
    """Small datasets with each embodiment's exact features (its cameras, state and action sizes, fps); actions
    offset by 10 per embodiment, so an answer in normalized units (near 0) cannot pass for a native one."""
    from vla.policy import VLAPolicy
    from vla.training import train

    registry = build_registry(str(EMBODIMENTS_FILE))
    names = [e["embodiment"] for e in _mixture_entries(PRETRAIN)] + [e["embodiment"] for e in
                                                                      _mixture_entries(NEW_ROBOT)]
    entries, offsets = [], {}
    for i, name in enumerate(names):
        emb = registry.get(name)
        offsets[name] = 10.0 * (i + 1)
        root = write_lerobot_dataset(tmp_path / name, robot_type=name, action_dim=emb.action_dim,
                                     state_dim=emb.state_dim, cameras=tuple(emb.cameras), fps=int(emb.fps),
                                     episodes=(4, 4), seed=i, action_offset=offsets[name],
                                     tasks=("lift the red cube",))
        entries.append({"dataset": str(root), "embodiment": name, "cameras": dict(emb.cameras)})
    mixture_file = tmp_path / "all.yaml"
    mixture_file.write_text(yaml.safe_dump({"datasets": entries}))

    cfg = get_preset("debug")
    cfg.data.mixture, cfg.data.embodiments_file = str(mixture_file), str(EMBODIMENTS_FILE)
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers = 32, 4, 0
    cfg.train.output_dir, cfg.train.run_name = str(tmp_path / "runs"), "hetero"
    cfg.train.steps, cfg.train.save_every, cfg.train.log_every = 2, 2, 1
    cfg.validate()
    load_mixture(cfg.data, build_registry(cfg.data.embodiments_file)).validate()
    run_dir = train(cfg)

    policy = VLAPolicy.from_pretrained(run_dir / "last")
    assert set(policy.normalizer.embodiments) == set(names)
    for name in names:
        emb = registry.get(name)
        policy.reset()
        obs = {f"observation.images.{canon}": torch.rand(3, 32, 32) for canon in emb.cameras.values()}
        obs.update({"observation.state": torch.randn(emb.state_dim), "task": "lift the red cube", "embodiment": name})
        action = policy.select_action(obs)
        assert action.shape == (emb.action_dim,), name
        assert torch.isfinite(action).all(), name
        assert (action - offsets[name]).abs().max() < 5.0, (name, action)  # native units, not normalized


# ---- real simulator episodes ---------------------------------------------------------------------------------------


def _record_one(robot: str, task: str, out: Path) -> None:
    code = rx.main(["--robot", robot, "--tasks", task, "--episodes", "1", "--workers", "0", "--image-size", "32",
                    "--max-steps", "150", "--out", str(out), "--no-progress"])
    assert code == 0


def _check_dataset(robot: str, out: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    spec = rx.ROBOTS[robot]
    ds = LeRobotDataset(f"local/{out.name}", root=out)
    assert ds.num_episodes == 1 and ds.fps == spec.control_freq and ds.meta.robot_type == spec.embodiment
    assert set(ds.meta.camera_keys) == {f"observation.images.{c}" for c in spec.cameras}
    item = ds[len(ds) - 1]
    assert item["observation.state"].shape == (len(spec.state_names),)
    assert item["action"].shape == (len(spec.action_names),)
    assert all(item[f"observation.images.{c}"].shape == (3, 32, 32) for c in spec.cameras)
    actions = torch.stack([ds[i]["action"] for i in range(len(ds))])
    assert actions.abs().max() <= 1.0
    grippers = actions[:, spec.arm_action_dim - 1 :: spec.arm_action_dim]
    assert (grippers == rx.CLOSE).any() and (grippers == rx.OPEN).any()  # it opened and closed
    cfg = get_preset("debug")
    cfg.data.mixture, cfg.data.embodiments_file = str(out), str(EMBODIMENTS_FILE)  # robot_type names it
    load_mixture(cfg.data, build_registry(cfg.data.embodiments_file)).validate()


@pytest.mark.sim
def test_cheapest_generator_writes_a_dataset_that_validates(tmp_path):
    """robosuite's Panda at 10 Hz with one camera: ~30 steps, the cheapest real episode of the new robots."""
    out = tmp_path / "panda_lift"
    _record_one("panda_osc_position", "lift", out)
    _check_dataset("panda_osc_position", out)


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("robot, task", [("kinova3_osc_pose", "lift"), ("iiwa_joint_position", "lift"),
                                         ("panda_bimanual", "two_arm_lift"), ("ur5e_osc_position", "stack")])
def test_generator_writes_a_dataset_that_validates(tmp_path, robot, task):
    out = tmp_path / f"{robot}_{task}"
    _record_one(robot, task, out)
    _check_dataset(robot, out)

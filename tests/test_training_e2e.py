"""Training end to end with the real VLAPolicy (preset "debug", shrunk) on small LeRobot datasets written here.

Fast: interrupted + resumed == uninterrupted; NaN stops cleanly and the last checkpoint loads; fine-tuning from
embodiment A (LIBERO Panda, 7-dim actions) to B (robosuite UR5e, 4-dim actions).
Slow: a 2-process CPU run through `accelerate launch`; kill -9 mid-run, then resume == uninterrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from vla.config import get_preset
from vla.policy import VLAPolicy
from vla.training import TrainingDiverged, train
from vla.training.layout import PRETRAINED_DIR, TRAINING_STATE_DIR, list_checkpoints, read_last

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_lerobot_dataset) -> dict[str, Path]:
    """Embodiment A: libero_panda (7-dim actions, 8-dim state); B: robosuite_ur5e_osc (4-dim actions)."""
    root = tmp_path_factory.mktemp("training_data")
    return {
        "A": write_lerobot_dataset(root / "panda", robot_type="libero_panda", action_dim=7, state_dim=8,
                                   episodes=(12, 12), tasks=("put the bowl on the plate",)),
        "B": write_lerobot_dataset(root / "ur5e", robot_type="robosuite_ur5e_osc", action_dim=4, state_dim=8,
                                   episodes=(10, 10), tasks=("lift the cube",), seed=1,
                                   cameras=("frontview", "robot0_eye_in_hand")),
    }


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(dataset: Path, out: Path, run: str, embodiment: str = "libero_panda", **train_opts):
    cfg = get_preset("debug")
    cfg.data.mixture = str(dataset)
    cfg.data.embodiment = embodiment
    cfg.data.image_size = 32
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.train.output_dir = str(out)
    cfg.train.run_name = run
    cfg.train.steps = 4
    cfg.train.save_every = 2
    cfg.train.log_every = 1
    cfg.train.lr = 1e-3
    for k, v in train_opts.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def run_train(cfg) -> Path:
    run_dir = train(cfg)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return run_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(read_last(run_dir) / TRAINING_STATE_DIR / "model.safetensors"))


def data_state(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((read_last(run_dir) / TRAINING_STATE_DIR / f"rank_{rank}.json").read_text())["data"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst <= 1e-6, f"weights differ by {worst}"


# ---- fast --------------------------------------------------------------------------------------------------------


def test_two_steps_then_resume_to_four_equals_four_in_one_go(data, tmp_path):
    full = run_train(make_cfg(data["A"], tmp_path, "full"))
    run_train(make_cfg(data["A"], tmp_path, "split", stop_at=2))
    split = run_train(make_cfg(data["A"], tmp_path, "split", resume=True))
    assert read_last(full).name == read_last(split).name == "step-000004"
    assert_same_weights(final_weights(full), final_weights(split))
    assert data_state(full) == data_state(split)
    assert "resumed from" in (split / "train.log").read_text()
    policy = VLAPolicy.from_pretrained(split / "last")  # what evaluation loads
    assert policy.normalizer is not None and "libero_panda" in policy.normalizer.embodiments


def test_nan_stops_cleanly_and_previous_checkpoint_loads(data, tmp_path, monkeypatch):
    forward = VLAPolicy.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        losses = forward(self, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 2:  # step 3 onwards
                losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(VLAPolicy, "forward", poisoned)
    cfg = make_cfg(data["A"], tmp_path, "nan", steps=6)
    with pytest.raises(TrainingDiverged, match="at step 3"):
        run_train(cfg)
    run_dir = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000002"]
    policy = VLAPolicy.from_pretrained(run_dir / "last")
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_dataset_problems_stop_the_run_before_any_step(data, tmp_path):
    from vla.data.mixture import MixtureError

    cfg = make_cfg(data["A"], tmp_path, "bad", embodiment="aloha")  # 14-dim actions, the dataset has 7
    with pytest.raises(MixtureError, match="aloha"):
        run_train(cfg)
    assert list_checkpoints(tmp_path / "bad") == []
    assert not (tmp_path / "bad" / "tensorboard").exists()


def test_finetune_from_embodiment_a_to_b_with_another_action_size(data, tmp_path, caplog):
    source = run_train(make_cfg(data["A"], tmp_path, "pretrain", steps=2))
    caplog.set_level("INFO", logger="vla")
    cfg = make_cfg(data["B"], tmp_path, "finetune", embodiment="robosuite_ur5e_osc", steps=2,
                   init_from=str(source / "last"), freeze_routers=True)
    cfg.backbone.freeze = "vision"
    tuned = run_train(cfg)
    n_tensors = len(VLAPolicy(cfg).state_dict())
    # the unified action/state vectors keep every tensor's shape: all loaded, nothing re-initialised
    assert f"{n_tensors} tensors loaded, 0 newly initialised" in caplog.text

    src = load_file(str(read_last(source) / PRETRAINED_DIR / "model.safetensors"))
    out = load_file(str(read_last(tuned) / PRETRAINED_DIR / "model.safetensors"))
    routers = [k for k in out if "router" in k]
    assert routers, "the debug preset has routed layers"
    for k in routers:  # frozen: exactly the pretrained routers
        torch.testing.assert_close(out[k], src[k], atol=0, rtol=0)
    vision = [k for k in out if k.startswith("backbone.vision") and out[k].is_floating_point()]
    assert vision and all(torch.equal(out[k], src[k]) for k in vision)

    policy = VLAPolicy.from_pretrained(tuned / "last")
    assert set(policy.normalizer.embodiments) == {"robosuite_ur5e_osc"}
    obs = {
        "observation.images.base": torch.rand(3, 32, 32),  # canonical names (the embodiment maps frontview -> base)
        "observation.images.wrist": torch.rand(3, 32, 32),
        "observation.state": torch.randn(8),
        "task": "lift the cube",
        "embodiment": "robosuite_ur5e_osc",
    }
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (1, cfg.action.chunk_size, 4)
    assert torch.isfinite(chunk).all()


# ---- slow --------------------------------------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def _args(dataset: Path, out: Path, run: str, embodiment: str = "libero_panda", **train_opts) -> list[str]:
    opts = {"data.mixture": str(dataset), "data.embodiment": embodiment, "data.image_size": 32,
            "data.batch_size": 4, "data.num_workers": 0, "train.output_dir": str(out), "train.run_name": run,
            "train.lr": 1e-3, **{f"train.{k}": v for k, v in train_opts.items()}}
    args = ["--preset", "debug"]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def _scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted({p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


@pytest.mark.slow
def test_two_process_cpu_run_through_accelerate_launch(data, tmp_path):
    """Through the repo's CPU launcher config (the same as `--multi_gpu --num_processes 2 --num_machines 1
    --mixed_precision no --dynamo_backend no` on the command line)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "vla" / "training" / "accelerate" / "cpu_2proc.yaml"), str(REPO / "train.py"),
           *_args(data["A"], tmp_path, "ddp", steps=24, save_every=12, log_every=2, warmup_steps=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "ddp"
    meta = json.loads((read_last(run_dir) / TRAINING_STATE_DIR / "trainer_state.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 24
    ranks = [data_state(run_dir, r) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 24
    assert ranks[0]["digest"] != ranks[1]["digest"], "both ranks trained on the same samples"
    loss = _scalars(run_dir, "loss/loss")
    assert len(loss) == 12
    # flow-matching losses are noisy from step to step (one run here: 1.35 -> 1.09 over the thirds): compare the
    # means of the first and last thirds of the run rather than single logged values
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    assert last < 0.95 * first, f"loss did not go down: {loss}"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_uninterrupted(data, tmp_path):
    opts = {"steps": 8, "save_every": 2, "log_every": 2}
    env = _env(tmp_path)
    train_py = [sys.executable, str(REPO / "train.py")]
    full = subprocess.run([*train_py, *_args(data["A"], tmp_path, "full", **opts), "--data.num_workers", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert full.returncode == 0, full.stderr[-4000:]

    run_dir = tmp_path / "killed"
    args = [*train_py, *_args(data["A"], tmp_path, "killed", **opts), "--data.num_workers", "2"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (run_dir / "step-000004").is_dir():  # killed somewhere after step 4 was published
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
        proc.wait()
    killed_at = read_last(run_dir).name
    assert killed_at in ("step-000004", "step-000006")

    resumed = subprocess.run([*args, "--train.resume", "true"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900, check=False)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    meta = json.loads((read_last(run_dir) / TRAINING_STATE_DIR / "trainer_state.json").read_text())
    assert meta["step"] == 8
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(run_dir))
    assert data_state(tmp_path / "full") == data_state(run_dir)

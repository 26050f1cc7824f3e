"""Hostile-but-realistic use: resume at epoch boundaries, honest "last good" checkpoints, typed config files,
non-finite settings, corrupt checkpoints and bad observations each end in one clear line (issue 23).

The failure cases and the test that shows each are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import (  # the stand-in policy, toy loader and run helper of the training tests
    TinyPolicy,
    assert_same,
    fresh_accelerate_state,  # noqa: F401 - autouse fixture
    make_cfg,
    rank_state,
    run,
    toy_loader,
    weights,
)

from vla.config import ConfigError, VLAConfig, get_preset
from vla.training.layout import read_last

# ---- 1. exact resume at an epoch boundary ----------------------------------------------------------------------


def test_resume_exactly_at_an_epoch_boundary_equals_uninterrupted(tmp_path):
    """5 batches per epoch, stop at step 5 (the end of epoch 0), resume to 8: same weights as 8 in one go."""
    opts = {"steps": 8, "save_every": 5}
    full_dir, _ = run(make_cfg(tmp_path, "full", **opts), loader=toy_loader(4, n=20))
    run(make_cfg(tmp_path, "part", stop_at=5, **opts), loader=toy_loader(4, n=20))
    part_dir, _ = run(make_cfg(tmp_path, "part", resume=True, **opts), loader=toy_loader(4, n=20))
    assert read_last(part_dir).name == read_last(full_dir).name == "step-000008"
    assert_same(weights(read_last(full_dir)), weights(read_last(part_dir)))  # incl. BatchNorm running stats
    assert rank_state(read_last(full_dir))["data"] == rank_state(read_last(part_dir))["data"]


# ---- 2. a "last good" checkpoint is finite; a non-finite one is not resumed silently ---------------------------


class ExplodesAt(TinyPolicy):
    """The gradient of training forward `at` is infinite while its loss is finite: update `at` writes NaN weights
    (no clipping), and the loss only turns NaN one step later."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def forward(self, batch):
        out = super().forward(batch)
        if torch.is_grad_enabled() and self.training_forwards == self.at:
            out["loss"].register_hook(lambda g: g * float("inf"))
        return out


def test_weights_exploded_by_a_saving_step_are_not_saved_nor_called_good(tmp_path):
    from vla.training import TrainingDiverged
    from vla.training.layout import list_checkpoints

    cfg = make_cfg(tmp_path, "boom", steps=8, save_every=2, log_every=1, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"after step 4 .*Last good checkpoint: \S*step-000002"):
        run(cfg, policy=ExplodesAt(4))
    assert [p.name for p in list_checkpoints(tmp_path / "boom")] == ["step-000002"]
    assert all(torch.isfinite(t).all() for t in weights(read_last(tmp_path / "boom")).values())


def _poison_weights(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = ckpt / "training_state" / "model.safetensors"
    state = load_file(str(path))
    state["head.1.weight"] = torch.full_like(state["head.1.weight"], float("nan"))
    save_file(state, str(path))


def test_resume_from_a_non_finite_checkpoint_says_so_in_one_line(tmp_path):
    from vla.policy import CheckpointError

    run(make_cfg(tmp_path, "r", stop_at=2))
    _poison_weights(tmp_path / "r" / "step-000002")
    with pytest.raises(CheckpointError, match="non-finite weights") as err:
        run(make_cfg(tmp_path, "r", resume=True))
    assert "\n" not in str(err.value) and "normaliz" not in str(err.value)


@pytest.mark.parametrize("corrupt", ["optimizer", "trainer_state", "weights_nan", "normalization"])
def test_resume_takes_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, caplog, corrupt):
    """step-2 and step-4 exist; step-4 is damaged: resume warns, restarts from step-2 and ends where an
    uninterrupted run ends."""
    opts = {"steps": 6, "save_every": 2}
    full_dir, _ = run(make_cfg(tmp_path, "full", **opts))
    run(make_cfg(tmp_path, "r", stop_at=4, **opts))
    newest = tmp_path / "r" / "step-000004"
    if corrupt == "optimizer":
        (newest / "training_state" / "optimizer.bin").write_bytes(b"\x00garbage")
    elif corrupt == "trainer_state":
        (newest / "training_state" / "trainer_state.json").write_text('{"step": 4,')
    elif corrupt == "weights_nan":
        _poison_weights(newest)
    else:
        (newest / "pretrained_model" / "normalization.json").write_text("{not json")
    caplog.set_level("WARNING", logger="vla")
    run(make_cfg(tmp_path, "r", resume=True, **opts))
    assert "cannot resume step-000004" in caplog.text and "step-000002" in caplog.text
    assert_same(weights(read_last(full_dir)), weights(read_last(tmp_path / "r")))


# ---- 3. config files are type-checked like the command line ------------------------------------------------------


def _config_file(tmp_path: Path, **sections) -> Path:
    data = get_preset("debug").to_dict()
    for dotted, value in sections.items():
        section, leaf = dotted.split("__")
        data[section][leaf] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_config_file_values_are_type_checked_naming_file_and_field(tmp_path):
    path = _config_file(tmp_path, backbone__width="wide")
    with pytest.raises(ConfigError, match=r"config\.json: field backbone\.width expects int, got .wide.") as err:
        VLAConfig.from_json(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="field train.lr expects float"):
        VLAConfig.from_json(_config_file(tmp_path, train__lr=[1]))
    with pytest.raises(ConfigError, match="field train.resume expects bool, got 1"):
        VLAConfig.from_json(_config_file(tmp_path, train__resume=1))
    with pytest.raises(ConfigError, match=r"field train.mixed_precision expects one of \['no', 'bf16', 'fp16'\]"):
        VLAConfig.from_json(_config_file(tmp_path, train__mixed_precision="fp8"))


def test_config_file_strings_read_like_the_command_line(tmp_path):
    cfg = VLAConfig.from_json(_config_file(tmp_path, train__resume="false", train__lr="3e-4", data__cameras=["base"]))
    assert cfg.train.resume is False and cfg.train.lr == 3e-4 and cfg.data.cameras == ("base",)


def test_missing_config_path_is_one_line_not_json_text(tmp_path, capsys):
    from vla.cli import build_parser, parse_config

    with pytest.raises(SystemExit) as code:
        parse_config(build_parser("train.py", "t"), ["--config", str(tmp_path / "nope.json")])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read config file" in err and "nope.json" in err and "JSON" not in err
    (tmp_path / "bad.json").write_text("{'single': quotes}")
    with pytest.raises(SystemExit):
        parse_config(build_parser("train.py", "t"), ["--config", str(tmp_path / "bad.json")])
    assert "bad.json is not valid JSON" in capsys.readouterr().err


# ---- 4. NaN and inf are rejected by every numeric check ----------------------------------------------------------


@pytest.mark.parametrize("option,value", [("train.lr", "nan"), ("train.grad_clip", "nan"), ("train.lr", "inf"),
                                          ("data.crop_scale", "nan"), ("train.betas", "0.9,nan")])
def test_non_finite_numbers_are_rejected_on_the_command_line(option, value):
    from vla.config import apply_overrides

    with pytest.raises(ConfigError, match=f"--{option} must be a finite number"):
        apply_overrides(get_preset("debug"), {option: value})


def test_non_finite_numbers_are_rejected_in_config_files_and_presets(tmp_path):
    import dataclasses

    with pytest.raises(ConfigError, match="field train.grad_clip must be a finite number"):
        VLAConfig.from_json(_config_file(tmp_path, train__grad_clip="nan"))
    cfg = get_preset("debug")
    cfg.train = dataclasses.replace(cfg.train, ema_decay=float("nan"))
    with pytest.raises(ConfigError, match="train.ema_decay must be a finite number, got nan"):
        cfg.validate()


# ---- silent garbage at inference: each bad observation is one error naming the key -------------------------------


@pytest.fixture(scope="module")
def policy():
    from test_policy import libero_normalizer, shrink

    from vla.policy import VLAPolicy

    torch.manual_seed(0)
    return VLAPolicy(shrink(get_preset("debug")), normalizer=libero_normalizer()).eval()


def _obs(batch: int | None = None, **change):
    from test_policy import raw_observation

    obs = raw_observation(3, batch=batch)
    for key, value in change.items():
        key = {"base": "observation.images.base", "wrist": "observation.images.wrist", "state": "observation.state",
               "agentview": "observation.images.agentview"}.get(key, key)
        if value is _DROP:
            obs.pop(key)
        else:
            obs[key] = value
    return obs


_DROP = object()

BAD_OBSERVATIONS = {
    "nan state": (dict(state=np.full(8, np.nan, dtype=np.float32)), r"'observation.state' holds 8 NaN/inf"),
    "inf image": (dict(base=np.full((3, 48, 48), np.inf, dtype=np.float32)), r"'observation.images.base' holds .* NaN"),
    "native camera name": (dict(agentview=np.zeros((48, 48, 3), np.uint8)),
                           r"'observation.images.agentview' names no camera of this policy: expected "
                           r"'observation.images.base', 'observation.images.wrist'"),
    "0-255 float image": (dict(base=np.full((3, 48, 48), 200.0, dtype=np.float32)), r"float images must be in \[0, 1\]"),
    "missing task": (dict(task=_DROP), r"missing 'task'"),
    "task None": (dict(task=None), r"'task' must be a string"),
    "0x0 image": (dict(base=np.zeros((0, 0, 3), np.uint8)), r"'observation.images.base' is empty"),
    "(1, 1, 8) state": (dict(state=np.zeros((1, 1, 8), np.float32)), r"'observation.state' must be \(state_dim,\)"),
    "missing state": (dict(state=_DROP), r"missing 'observation.state'"),
}
BAD_OBSERVATIONS["typo camera"] = ({"observation.images.wirst": np.zeros((48, 48, 3), np.uint8)},
                                   r"'observation.images.wirst' names no camera")  # a key that is no identifier


@pytest.mark.parametrize("case", list(BAD_OBSERVATIONS))
def test_bad_observations_are_one_error_naming_the_key(policy, case):
    from vla.data.validation import ObservationError

    change, message = BAD_OBSERVATIONS[case]
    policy.reset()
    with pytest.raises(ObservationError, match=message) as err:
        policy.select_action(_obs(**change))
    assert "\n" not in str(err.value)


def test_batched_state_with_unbatched_images_or_mismatched_batches_is_an_error(policy):
    from vla.data.validation import ObservationError

    obs = _obs(batch=2, base=np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ObservationError, match=r"'observation.images.base' must be \(B=2, H, W, C\)"):
        policy.predict_action_chunk(obs)
    obs = _obs(batch=2, wrist=np.zeros((3, 48, 48, 3), np.uint8))
    with pytest.raises(ObservationError, match="'observation.images.wrist' has a batch of 3 but 'observation.state'"):
        policy.predict_action_chunk(obs)
    with pytest.raises(ObservationError, match="'task' must be a string or a list of 2 strings"):
        policy.predict_action_chunk(_obs(batch=2, task=["a", "b", "c"]))


def test_documented_conversions_still_act(policy):
    """[0, 1] float images (CHW or HWC), a masked (absent) camera and batched input give finite actions."""
    rng = np.random.default_rng(0)
    for change in (dict(base=rng.random((3, 48, 48), dtype=np.float32)), dict(wrist=_DROP),
                   dict(base=torch.rand(48, 48, 3))):
        policy.reset()
        assert torch.isfinite(policy.select_action(_obs(**change))).all()
    assert torch.isfinite(policy.predict_action_chunk(_obs(batch=2))).all()


# ---- 6. a checkpoint that would act NaN or lacks its processor files is refused at load ------------------------


@pytest.fixture
def saved_policy(policy, tmp_path):
    return policy.save_pretrained(tmp_path / "ckpt")


def test_non_finite_weights_are_refused_at_load(saved_policy):
    from safetensors.torch import load_file, save_file

    from vla.policy import CheckpointError, VLAPolicy

    state = load_file(str(saved_policy / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(saved_policy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors holds non-finite values in 1 tensor") as err:
        VLAPolicy.from_pretrained(saved_policy)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage,message", [
    ("normalization.json", r"normalization statistics in .*ckpt .* cannot be read"),
    ("embodiments.json", r"ckpt/embodiments.json is missing"),
    ("embodiments.json:corrupt", r"ckpt/embodiments.json cannot be read"),
])
def test_corrupt_or_missing_processor_files_name_the_file(saved_policy, damage, message):
    from vla.policy import CheckpointError, VLAPolicy

    name, _, how = damage.partition(":")
    if name == "embodiments.json" and not how:
        (saved_policy / name).unlink()
    else:
        (saved_policy / name).write_text('{"mode": ')
    with pytest.raises(CheckpointError, match=message) as err:
        VLAPolicy.from_pretrained(saved_policy)
    assert "\n" not in str(err.value)


# ---- 5. an evaluation loads and checks the policy before it writes anything ----------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", ["truncated weights", "weight-changing --policy-set", "nan weights"])
def test_libero_eval_of_a_broken_policy_is_one_line_and_writes_nothing(saved_policy, tmp_path, capsys, damage):
    from vla.sim import libero as L

    extra = []
    if damage == "truncated weights":
        _truncate(saved_policy / "model.safetensors")
    elif damage == "nan weights":
        from safetensors.torch import load_file, save_file

        state = {k: v * float("nan") if v.is_floating_point() else v
                 for k, v in load_file(str(saved_policy / "model.safetensors")).items()}
        save_file(state, str(saved_policy / "model.safetensors"))
    else:
        extra = ["--policy-set", "action.ffn_dim=48"]  # the saved policy has 64
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as code:
        L.main(["--policy", str(saved_policy), "--out", str(out), "--tasks", "0", "--episodes", "1", "--no-progress",
                *extra])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1 and "model.safetensors" in err[-1]
    assert not out.exists()  # no results.json / run.json / plot left to block the next run


def test_calvin_eval_of_a_broken_policy_is_one_line_and_writes_nothing(saved_policy, tmp_path, capsys):
    from vla.sim import calvin as C

    _truncate(saved_policy / "model.safetensors")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as code:
        C.main(["--policy", str(saved_policy), "--out", str(out), "--no-progress"])
    assert code.value.code == 2
    assert "model.safetensors cannot be read" in capsys.readouterr().err
    assert not out.exists()


# ---- data: a masked camera is announced; a corrupt image is one line naming where it is ------------------------


@pytest.fixture(scope="module")
def one_camera_dataset(write_lerobot_dataset, tmp_path_factory):
    """libero_panda data with only its agent-view camera: the policy's `wrist` camera is never filled."""
    root = tmp_path_factory.mktemp("data") / "one_cam"
    return write_lerobot_dataset(root, robot_type="libero_panda", action_dim=7, state_dim=8, cameras=("agentview",),
                                 episodes=(8, 8))


def _mixture(root: Path):
    from vla.data.mixture import load_mixture

    path = root.parent / "mixture.yaml"
    path.write_text(f"datasets:\n  - dataset: {root}\n    embodiment: libero_panda\n    cameras: {{agentview: base}}\n")
    cfg = get_preset("debug")
    cfg.data.mixture, cfg.data.batch_size, cfg.data.num_workers = str(path), 4, 1
    return cfg, load_mixture(cfg.data)


def test_a_camera_the_mixture_never_fills_is_a_warning_at_start(one_camera_dataset, caplog):
    caplog.set_level("WARNING", logger="vla")
    _, mixture = _mixture(one_camera_dataset)
    mixture.validate()
    assert "no camera maps to data.cameras ['wrist']" in caplog.text and "masked in every sample" in caplog.text


def test_a_corrupt_image_names_dataset_episode_frame_and_camera_in_one_line(one_camera_dataset):
    from vla.data.lerobot_source import SampleError, decode_rgb
    from vla.data.mixture import make_dataloader

    cfg, mixture = _mixture(one_camera_dataset)
    (source,) = mixture.open()
    good = source.cameras["base"]
    source.cameras["base"] = lambda i: decode_rgb(b"\x89PNG\r\n\x1a\n truncated") if i >= 8 else good(i)
    loader = make_dataloader(cfg, mixture, mixture.compute_stats(), rank=0, world_size=1, train=True)
    with pytest.raises(SampleError) as err:  # raised in a worker process, re-raised here
        for _ in range(20):
            next(iter(loader))
    message = str(err.value)
    assert "\n" not in message, message
    assert f"dataset {one_camera_dataset}: episode 1 frame" in message and "camera 'base'" in message


def test_a_sample_error_mid_run_keeps_the_last_checkpoint(tmp_path):
    from test_training import ToyDataset

    from vla.data.lerobot_source import SampleError
    from vla.data.mixture import MixtureLoader, _identity
    from vla.data.sampler import MixtureSampler
    from vla.training.layout import list_checkpoints

    class CorruptLater(ToyDataset):
        calls = 0

        def __getitem__(self, keys):
            CorruptLater.calls += 1
            if CorruptLater.calls > 6:  # steps 1-6 read (the dry run peeks at the first), step 7 fails
                raise SampleError("dataset toy: episode 0 frame 3 (row 3), camera 'base' cannot be decoded")
            return super().__getitem__(keys)

    ds = CorruptLater()
    loader = MixtureLoader(ds, sampler=MixtureSampler([len(ds)], [1.0], 4, seed=7), batch_size=None,
                           collate_fn=_identity)
    with pytest.raises(SampleError, match="episode 0 frame 3"):
        run(make_cfg(tmp_path, "r", steps=8, save_every=2), loader=loader)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-000004", "step-000006"]
    assert read_last(tmp_path / "r").name == "step-000006"


def test_a_camera_the_embodiment_declares_but_the_policy_lacks_is_ignored():
    """LIBERO renders `base` and `wrist` for every policy; a base-only policy ignores `wrist` (libero_panda declares
    it) but still refuses a name no camera mapping knows."""
    from test_policy import libero_normalizer, shrink

    from vla.data.validation import ObservationError
    from vla.policy import VLAPolicy

    cfg = shrink(get_preset("debug"))
    cfg.data.cameras = ("base",)
    base_only = VLAPolicy(cfg.validate(), normalizer=libero_normalizer()).eval()
    assert torch.isfinite(base_only.predict_action_chunk(_obs())).all()
    with pytest.raises(ObservationError, match="expected 'observation.images.base' "):
        base_only.predict_action_chunk(_obs(agentview=np.zeros((48, 48, 3), np.uint8)))

"""VLAPolicy: every preset trains and acts, save -> load gives identical actions, bad inputs fail clearly."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vla.config import PRESETS, get_preset
from vla.constants import ACTION, ACTION_IS_PAD, EMBODIMENT, OBS_STATE, TASK, image_key
from vla.data.normalize import Normalizer
from vla.data.transforms import Processor, collate_frames
from vla.policy import CheckpointError, VLAPolicy

IMAGE = 32


def shrink(cfg, vlm_dir: Path | None = None):
    """The preset's layer pattern, objective and backbone family at a size that runs in a second on a CPU."""
    a = cfg.action
    cfg.action = dataclasses.replace(
        a, chunk_size=4, n_action_steps=2, width=32, num_heads=2, ffn_dim=64, expert_ffn_dim=0,
        hb_num_experts=min(a.hb_num_experts, 4), hb_top_k=min(a.hb_top_k, 2),
        layers=",".join(a.layer_kinds[:: max(1, a.depth // 6)]),
    )
    if cfg.backbone.kind == "compact":
        cfg.backbone = dataclasses.replace(cfg.backbone, vision_model="resnet10t", text_model="embedding",
                                           width=32, tokens_per_image=4)
    else:
        cfg.backbone = dataclasses.replace(cfg.backbone, model_name_or_path=str(vlm_dir), dtype="float32",
                                           gradient_checkpointing=False)
    cfg.data = dataclasses.replace(cfg.data, image_size=IMAGE, unified_action_dim=16, unified_state_dim=16)
    cfg.objective = dataclasses.replace(cfg.objective, num_inference_steps=3)
    return cfg.validate()


def libero_normalizer(seed: int = 0) -> Normalizer:
    rng = np.random.default_rng(seed)
    return Normalizer.from_arrays(
        {"libero_panda": {"state": [rng.normal(size=(64, 8))], "action": [rng.uniform(-1, 1, size=(64, 7))]}}
    )


def raw_observation(seed: int = 0, batch: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    return {
        image_key("base"): rng.integers(0, 255, size=(*lead, 48, 48, 3), dtype=np.uint8),
        image_key("wrist"): rng.integers(0, 255, size=(*lead, 48, 48, 3), dtype=np.uint8),
        OBS_STATE: rng.normal(size=(*lead, 8)).astype(np.float32),
        TASK: "put the bowl on the plate",
        EMBODIMENT: "libero_panda",
    }


def training_batch(policy: VLAPolicy, b: int = 3, seed: int = 0) -> dict:
    """A batch built through the same Processor the data loader uses."""
    cfg = policy.config
    proc = Processor(cfg.data, policy.registry, policy.normalizer)
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(b):
        obs = raw_observation(seed + i)
        images = {"base": obs[image_key("base")], "wrist": obs[image_key("wrist")]}
        frame = proc.frame(images, obs[OBS_STATE], obs[TASK], "libero_panda", train=True, seed=i)
        actions = torch.as_tensor(rng.uniform(-1, 1, size=(cfg.action.chunk_size, 7)), dtype=torch.float32)
        frame[ACTION] = proc.actions_to_model(actions, "libero_panda")
        frame[ACTION_IS_PAD] = torch.arange(cfg.action.chunk_size) >= cfg.action.chunk_size - i
        frames.append(frame)
    return collate_frames(frames)


@pytest.fixture(scope="module")
def paligemma_dir(tiny_vlm_dirs):
    return tiny_vlm_dirs["paligemma"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_saves_loads_and_acts_identically(preset, tmp_path, request):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    vlm_dir = request.getfixturevalue("paligemma_dir") if cfg.backbone.kind == "hf_vlm" else None
    policy = VLAPolicy(shrink(cfg, vlm_dir), normalizer=libero_normalizer())

    losses = policy(training_batch(policy))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters()
               if n.startswith("head.")), "the action head got no gradient"
    assert trainable

    policy.eval()
    noise = torch.randn(1, cfg.action.chunk_size, cfg.data.unified_action_dim)
    before = policy.predict_action_chunk(raw_observation(1), noise=noise)
    assert before.shape == (1, cfg.action.chunk_size, 7)

    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    after = loaded.predict_action_chunk(raw_observation(1), noise=noise)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert loaded.config == policy.config
    assert not loaded.training


@pytest.fixture(scope="module")
def debug_policy():
    torch.manual_seed(0)
    return VLAPolicy(shrink(get_preset("debug")), normalizer=libero_normalizer()).eval()


def test_select_action_uses_a_queue_of_n_action_steps(debug_policy):
    policy = debug_policy
    policy.reset()
    assert policy.needs_observation()
    first = policy.select_action(raw_observation(2))
    assert first.shape == (7,)
    assert not policy.needs_observation()  # n_action_steps=2: one more queued action
    policy.select_action(raw_observation(2))
    assert policy.needs_observation()
    batched = policy.select_action(raw_observation(3, batch=2))
    assert batched.shape == (2, 7)
    policy.reset()
    assert policy.needs_observation()


def test_actions_come_back_in_native_units(debug_policy):
    """Unnormalized actions span the statistics' range, not [-1, 1] of the model space."""
    policy = debug_policy
    wide = Normalizer(
        {"libero_panda": {
            k: {"mean": np.zeros(d), "std": np.ones(d), "q01": np.full(d, 100.0), "q99": np.full(d, 300.0),
                "min": np.zeros(d), "max": np.ones(d)}
            for k, d in (("state", 8), ("action", 7))}}
    )
    original = policy.normalizer
    policy.normalizer = wide
    try:
        chunk = policy.predict_action_chunk(raw_observation(4))
    finally:
        policy.normalizer = original
    assert chunk.min() > 0  # centre 200, half-range 100: model outputs near [-1, 1] map to ~[100, 300]


@pytest.mark.parametrize(
    "change, message",
    [
        ({EMBODIMENT: "r2d2"}, "unknown embodiment 'r2d2'"),
        ({OBS_STATE: np.zeros(5, dtype=np.float32)}, "statistics have 8 dims"),
        ({image_key("base"): np.zeros((48, 48, 5), dtype=np.uint8)}, "expected one image as (H, W, C)"),
    ],
)
def test_bad_observations_fail_with_one_clear_error(debug_policy, change, message):
    obs = {**raw_observation(5), **change}
    with pytest.raises((KeyError, ValueError)) as e:
        debug_policy.predict_action_chunk(obs)
    assert message in str(e.value)


@pytest.fixture
def saved(debug_policy, tmp_path):
    return debug_policy.save_pretrained(tmp_path / "ckpt")


def test_truncated_weights_are_reported(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        VLAPolicy.from_pretrained(saved)


def test_mismatched_config_lists_every_problem(saved):
    import json

    cfg = json.loads((saved / "config.json").read_text())
    cfg["action"]["width"] = 48
    cfg["action"]["num_heads"] = 2
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        VLAPolicy.from_pretrained(saved)
    text = str(e.value)
    assert "shape mismatches" in text and "checkpoint (32" in text and "model (48" in text


def test_inference_settings_change_on_load_and_shape_changes_fail(saved, debug_policy):
    """`from_pretrained(overrides=...)` changes inference settings on the same weights; an override that changes a
    weight shape is reported like any mismatched checkpoint, and an unknown key names the option."""
    from vla.config import ConfigError
    from vla.sim.policies import CheckpointPolicy

    loaded = VLAPolicy.from_pretrained(saved, overrides={"objective.num_inference_steps": "2",
                                                         "action.n_action_steps": "1"})
    assert loaded.config.objective.num_inference_steps == 2 and loaded.config.action.n_action_steps == 1
    for name, value in debug_policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    loaded.reset()
    loaded.select_action(raw_observation(2))
    assert loaded.needs_observation()  # one action per chunk now
    with pytest.raises(CheckpointError, match="shape mismatches"):
        VLAPolicy.from_pretrained(saved, overrides={"action.chunk_size": "5"})
    with pytest.raises(ConfigError, match="unknown option --action.moh.dynamc"):
        VLAPolicy.from_pretrained(saved, overrides={"action.moh.dynamc": "true"})
    source = pickle.loads(pickle.dumps(CheckpointPolicy(str(saved), (("action.n_action_steps", "1"),))))
    assert source().config.action.n_action_steps == 1
    assert source.identity()["overrides"] == {"action.n_action_steps": "1"} and source.identity()["sha256"]


def test_loads_from_a_training_run_layout(debug_policy, tmp_path):
    """A run directory (its newest step), `last` as a symlink or as a pointer file, or a step directory."""
    from vla.training.layout import LAST, PRETRAINED_DIR, point_last_to

    run = tmp_path / "run"
    for step in (1, 2):
        debug_policy.save_pretrained(run / f"step-00000{step}" / PRETRAINED_DIR)
    point_last_to(run, run / "step-000001")
    for source in (run, run / LAST, run / "step-000002"):
        assert VLAPolicy.from_pretrained(source).config == debug_policy.config
    (run / LAST).unlink()
    (run / LAST).write_text("step-000001\n")  # where symlinks fail
    assert VLAPolicy.from_pretrained(run / LAST).config == debug_policy.config


def test_missing_and_unexpected_keys_are_listed(saved):
    from safetensors.torch import load_file

    state = load_file(str(saved / "model.safetensors"))
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["head.not_a_param"] = torch.zeros(1)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        VLAPolicy.from_pretrained(saved)
    assert dropped in str(e.value) and "head.not_a_param" in str(e.value)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        VLAPolicy.from_pretrained(tmp_path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        VLAPolicy.from_pretrained(tmp_path / "nope")


def test_save_is_atomic_when_writing_fails(debug_policy, tmp_path, monkeypatch):
    target = debug_policy.save_pretrained(tmp_path / "ckpt")
    good = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vla.policy.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        debug_policy.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dir left behind

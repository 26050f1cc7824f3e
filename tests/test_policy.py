"""VLAPolicy: every preset trains and acts, save -> load gives identical actions, bad inputs fail clearly."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vla.config import PRESETS, HorizonConfig, get_preset
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
        moh=dataclasses.replace(a.moh, horizons=(2, 4), min_replan_steps=1, min_active_horizons=1)
        if a.moh.horizons else a.moh,
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
    # no preset freezes anything (backbone.freeze "none", no LoRA): every parameter trains, and the head's
    # input and output layers, which every sample passes through, get a gradient
    assert cfg.backbone.freeze == "none" and cfg.backbone.lora_rank == 0
    frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert not frozen, f"frozen although the preset freezes nothing: {frozen[:5]}"
    no_grad = [n for n, p in policy.named_parameters()
               if n.startswith("head.") and p.ndim >= 2 and (p.grad is None or not p.grad.abs().sum() > 0)]
    ffn_only = all(".ffn." in n or "router" in n or "horizon" in n for n in no_grad)
    assert ffn_only, f"head weights off the routed paths got no gradient: {[n for n in no_grad if '.ffn.' not in n]}"

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


def quantile_normalizer(action_low: float, action_high: float) -> Normalizer:
    """Quantile statistics: the state's q01/q99 at -1/1 (identity), the action's at `action_low`/`action_high`."""
    def stats(d: int, low: float, high: float) -> dict:
        return {"mean": np.zeros(d), "std": np.ones(d), "q01": np.full(d, low), "q99": np.full(d, high),
                "min": np.zeros(d), "max": np.ones(d)}

    return Normalizer({"libero_panda": {"state": stats(8, -1.0, 1.0), "action": stats(7, action_low, action_high)}})


def test_actions_come_back_in_native_units(debug_policy):
    """The same model output, un-normalized with q01=100 / q99=300, is exactly 200 + 100 x what identity
    statistics (q01=-1 / q99=1) give: actions leave the policy in the statistics' units, per dimension."""
    policy = debug_policy
    noise = torch.randn(1, policy.config.action.chunk_size, policy.config.data.unified_action_dim,
                        generator=torch.Generator().manual_seed(0))
    original = policy.normalizer
    chunks = {}
    try:
        for name, (low, high) in {"identity": (-1.0, 1.0), "wide": (100.0, 300.0)}.items():
            policy.normalizer = quantile_normalizer(low, high)
            chunks[name] = policy.predict_action_chunk(raw_observation(4), noise=noise)
    finally:
        policy.normalizer = original
    assert chunks["identity"].abs().max() > 1e-3  # the check below would hold trivially for an all-zero output
    torch.testing.assert_close(chunks["wide"], 200 + 100 * chunks["identity"], rtol=1e-5, atol=1e-3)


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


def test_a_policy_overfit_on_contrasting_examples_uses_its_image_and_its_instruction():
    """Three examples, where only the pair (image, instruction) decides the action: (red, "left") -> +0.8,
    (blue, "left") -> -0.8, (red, "right") -> -0.8. After overfitting, changing the image alone and changing the
    instruction alone must each flip the action: a policy that ignored either input could fit at most two."""
    torch.manual_seed(0)
    cfg = shrink(get_preset("debug"))
    cfg.data.augment = False
    cfg.action.layers = "d,d"
    cfg.backbone.freeze = "vision"  # fast: the frozen encoder still sees red and blue apart; the rest must learn
    policy = VLAPolicy(cfg, normalizer=libero_normalizer())
    proc = Processor(cfg.data, policy.registry, policy.normalizer)
    red, blue = np.zeros((IMAGE, IMAGE, 3), np.uint8), np.zeros((IMAGE, IMAGE, 3), np.uint8)
    red[..., 0], blue[..., 2] = 230, 230
    state = np.zeros(8, np.float32)
    cases = [(red, "push left", 0.8), (blue, "push left", -0.8), (red, "push right", -0.8)]

    def observation(image, task):
        return {image_key("base"): image, image_key("wrist"): image, OBS_STATE: state, TASK: task,
                EMBODIMENT: "libero_panda"}

    frames = []
    for image, task, target in cases:
        frame = proc.frame({"base": image, "wrist": image}, state, task, "libero_panda", train=False)
        native = torch.full((cfg.action.chunk_size, 7), target)
        frame[ACTION] = proc.actions_to_model(native, "libero_panda")
        frame[ACTION_IS_PAD] = torch.zeros(cfg.action.chunk_size, dtype=torch.bool)
        frames.append(frame)
    batch = collate_frames(frames * 2)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(80):
        loss = policy(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    policy.eval()
    noise = torch.zeros(1, cfg.action.chunk_size, cfg.data.unified_action_dim)  # the mean of the noise
    means = [policy.predict_action_chunk(observation(image, task), noise=noise).mean().item()
             for image, task, _ in cases]
    assert means[0] > 0.4, f"(red, left) should give +0.8, got {means}"
    assert means[1] < -0.4, f"changing only the image should flip the action, got {means}"
    assert means[2] < -0.4, f"changing only the instruction should flip the action, got {means}"


def moh_policy(dynamic: bool, threshold: float) -> VLAPolicy:
    torch.manual_seed(0)
    cfg = shrink(get_preset("debug"))
    cfg.action = dataclasses.replace(cfg.action, chunk_size=8, n_action_steps=2, moh=HorizonConfig(
        horizons=(2, 4, 6, 8), dynamic=dynamic, agreement_threshold=threshold))
    return VLAPolicy(cfg.validate(), normalizer=libero_normalizer()).eval()


def actions_per_observation(policy: VLAPolicy) -> int:
    """How many `select_action` calls one observation serves (the queue a chunk fills)."""
    policy.reset()
    policy.select_action(raw_observation(2))
    served = 1
    while not policy.needs_observation():
        policy.select_action(raw_observation(2))
        served += 1
    return served


def test_moh_dynamic_execution_through_select_action():
    """With dynamic execution, `select_action` queues as many actions as the horizons agree on: all the
    steps where enough horizons overlap when any disagreement is accepted, the minimum (1) when none is, and
    the fixed `n_action_steps` (2) without dynamic execution."""
    agree = moh_policy(dynamic=True, threshold=1e6)
    head_says = agree.head.sample(*head_inputs(agree, raw_observation(2))).num_execute
    assert actions_per_observation(agree) == agree.last_num_execute == int(head_says.min()) > 2
    assert actions_per_observation(moh_policy(dynamic=True, threshold=0.0)) == 1
    assert actions_per_observation(moh_policy(dynamic=False, threshold=1e6)) == 2


def head_inputs(policy: VLAPolicy, observation: dict) -> tuple:
    from vla.constants import ACTION_MASK, STATE_MASK
    from vla.data.transforms import prepare_observation

    batch, _ = prepare_observation(observation, registry=policy.registry, normalizer=policy.normalizer,
                                   data_cfg=policy.config.data, default_embodiment="libero_panda")
    with torch.no_grad():
        return policy.encode(batch), batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK]


def test_from_pretrained_resolves_a_hub_id_from_the_local_hub_cache_offline(debug_policy, tmp_path, monkeypatch):
    """`VLAPolicy.from_pretrained("owner/name")` with no network: the checkpoint is found in the Hugging Face hub
    cache layout (models--owner--name/refs/main -> snapshots/<commit>/)."""
    import huggingface_hub.constants as hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vla-test--tiny-debug"
    debug_policy.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "vla-test/tiny-debug" is no local path here
    loaded = VLAPolicy.from_pretrained("vla-test/tiny-debug")
    assert loaded.config == debug_policy.config
    for name, value in debug_policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="Hub download failed"):
        VLAPolicy.from_pretrained("vla-test/not-cached")

"""The training loop and its checkpoints, on a tiny stand-in policy and an in-memory dataset (fast).

The stand-in follows the VLAPolicy call conventions (`policy(batch)` -> dict of losses with "loss",
`save_pretrained`, `routing_stats`, a `backbone` submodule, a router) and draws random numbers in its forward pass
(dropout, target noise) like a flow-matching head, so exact resume is a real test of RNG handling. The data goes
through the real `MixtureSampler`/`MixtureLoader` with per-sample seeded augmentation. End-to-end tests with the
real VLAPolicy and a LeRobot dataset are in test_training_e2e.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from vla.config import ConfigError, get_preset
from vla.constants import ACTION, DATASET_ID, OBS_STATE
from vla.data.mixture import MixtureLoader, _identity
from vla.data.sampler import MixtureSampler
from vla.training import TrainingDiverged, fit
from vla.training import checkpoint as ckpt_mod
from vla.training.ema import EMA
from vla.training.finetune import freeze_routers, load_matching
from vla.training.layout import (
    LAST,
    PRETRAINED_DIR,
    TRAINING_STATE_DIR,
    list_checkpoints,
    read_last,
    resolve_checkpoint,
    resolve_pretrained,
)
from vla.training.loop import make_accelerator, resume_checkpoint
from vla.training.optim import make_optimizer, make_scheduler, parameter_groups

STATE_DIM, H, A = 6, 4, 3


class ToyDataset(Dataset):
    """Map-style dataset over MixtureSampler keys (dataset_id, frame, seed); a list of keys gives a batch.

    The "augmentation" is noise on the state drawn from the per-sample seed, as the real pipeline does.
    """

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(123)
        self.state = torch.randn(n, STATE_DIM, generator=g)
        w = torch.randn(STATE_DIM, H * A, generator=g)
        self.action = torch.tanh(self.state @ w).reshape(n, H, A)

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, keys):
        frames = torch.tensor([f for _, f, _ in keys])
        jitter = torch.stack([torch.randn(STATE_DIM, generator=torch.Generator().manual_seed(s)) for *_, s in keys])
        return {OBS_STATE: self.state[frames] + 0.05 * jitter, ACTION: self.action[frames],
                DATASET_ID: torch.zeros(len(keys), dtype=torch.long), "index": frames}


def toy_loader(batch_size=4, num_workers=0, rank=0, world_size=1, n=48) -> MixtureLoader:
    ds = ToyDataset(n)
    sampler = MixtureSampler([len(ds)], [1.0], batch_size, seed=7, rank=rank, world_size=world_size)
    return MixtureLoader(ds, sampler=sampler, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                         persistent_workers=num_workers > 0)


class TinyPolicy(nn.Module):
    """Stand-in for VLAPolicy: backbone + router + head, dropout, batch norm and noisy targets."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(STATE_DIM, 32), nn.BatchNorm1d(32), nn.GELU())
        self.router = nn.Linear(32, 2)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, H * A))
        self.usage = torch.zeros(2)
        self.poison_after: int | None = None  # training forwards after which the loss is NaN
        self.training_forwards = 0

    def forward(self, batch):
        h = self.backbone(batch[OBS_STATE])
        gate = self.router(h).softmax(-1)
        self.usage += gate.detach().mean(0).cpu()
        target = batch[ACTION] + 0.01 * torch.randn_like(batch[ACTION])
        pred = (self.head(h) * (1 + gate[:, :1])).view_as(target)
        mse = F.mse_loss(pred, target)
        balance = (gate.mean(0) - 0.5).pow(2).sum()
        loss = mse + 0.01 * balance
        if torch.is_grad_enabled():
            self.training_forwards += 1
            if self.poison_after is not None and self.training_forwards > self.poison_after:
                loss = loss * float("nan")
        return {"loss": loss, "mse": mse, "balance": balance}

    def routing_stats(self, reset: bool = False) -> dict:
        """VLAPolicy's schema: per routed layer, decisions per expert by action-space descriptor."""
        out = {"layers": [{"layer": 0, "kind": "hb", "num_experts": 2,
                           "by_embodiment": {"111": self.usage.tolist()}}]}
        if reset:
            self.usage = torch.zeros(2)
        return out

    def save_pretrained(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}\n")
        return d


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; forget the process-wide state of the previous one."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(tmp_path: Path, run: str, **train):
    cfg = get_preset("debug")
    cfg.train.output_dir = str(tmp_path)
    cfg.train.run_name = run
    cfg.train.steps = 4
    cfg.train.warmup_steps = 1
    cfg.train.lr = 3e-3
    cfg.train.save_every = 2
    cfg.train.log_every = 1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def run(cfg, policy=None, loader=None, num_workers=0) -> tuple[Path, TinyPolicy]:
    """What `train()` does, with the stand-in parts."""
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    accelerator = make_accelerator(cfg, run_dir)
    resume_from = resume_checkpoint(cfg, run_dir)
    torch.manual_seed(cfg.train.seed)
    policy = policy or TinyPolicy()
    loader = loader or toy_loader(cfg.data.batch_size, num_workers)
    fit(cfg, accelerator, policy, loader, run_dir, resume_from=resume_from)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return run_dir, policy


def weights(ckpt: Path, which: str = TRAINING_STATE_DIR) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / which / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol=1e-6):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=0, msg=f"tensor {k} differs")


def rank_state(ckpt: Path) -> dict:
    return json.loads((ckpt / TRAINING_STATE_DIR / "rank_0.json").read_text())


# ---- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, num_workers):
    """2 steps, stop; resume to 6 == 6 steps in one go: weights, EMA, optimizer and data order (1e-6).

    6 steps of 4 samples over 48 frames cross no epoch; 14 would, see the next test.
    """
    opts = {"steps": 6, "ema_decay": 0.9, "grad_accum": 2}
    full_dir, _ = run(make_cfg(tmp_path, "full", **opts), num_workers=num_workers)
    part_dir, _ = run(make_cfg(tmp_path, "part", stop_at=2, **opts), num_workers=num_workers)
    assert [p.name for p in list_checkpoints(part_dir)] == ["step-000002"]
    resumed_dir, _ = run(make_cfg(tmp_path, "part", resume=True, **opts), num_workers=num_workers)

    full, resumed = read_last(full_dir), read_last(resumed_dir)
    assert full.name == resumed.name == "step-000006"
    assert_same(weights(full), weights(resumed))                                   # raw weights
    assert_same(weights(full, PRETRAINED_DIR), weights(resumed, PRETRAINED_DIR))   # EMA weights
    assert_same(load_file(str(full / TRAINING_STATE_DIR / "ema.safetensors")),
                load_file(str(resumed / TRAINING_STATE_DIR / "ema.safetensors")))
    opt_full = torch.load(full / TRAINING_STATE_DIR / "optimizer.bin", weights_only=True)
    opt_res = torch.load(resumed / TRAINING_STATE_DIR / "optimizer.bin", weights_only=True)
    for i, s in opt_full["state"].items():
        torch.testing.assert_close(s["exp_avg_sq"], opt_res["state"][i]["exp_avg_sq"], atol=1e-9, rtol=0)
    assert rank_state(full)["data"] == rank_state(resumed)["data"]  # same samples, same order, same position
    assert rank_state(full)["data"]["batches"] == 12
    # EMA weights are not the raw weights (EMA really on), and training moved the weights
    assert not torch.equal(weights(full)["head.1.weight"], weights(full, PRETRAINED_DIR)["head.1.weight"])


def test_resume_across_an_epoch_boundary(tmp_path):
    """Stopping in one epoch and resuming into the next keeps the data order exact."""
    opts = {"steps": 8, "save_every": 3}
    full_dir, _ = run(make_cfg(tmp_path, "full", **opts), loader=toy_loader(4, n=20))  # 5 batches per epoch
    run(make_cfg(tmp_path, "part", stop_at=3, **opts), loader=toy_loader(4, n=20))
    part_dir, _ = run(make_cfg(tmp_path, "part", resume=True, **opts), loader=toy_loader(4, n=20))
    assert_same(weights(read_last(full_dir)), weights(read_last(part_dir)))
    assert rank_state(read_last(full_dir))["data"] == rank_state(read_last(part_dir))["data"]
    assert rank_state(read_last(part_dir))["data"]["loader"]["epoch"] == 1


def test_resume_refuses_another_layout(tmp_path):
    run(make_cfg(tmp_path, "r", stop_at=2))
    cfg = make_cfg(tmp_path, "r", resume=True, grad_accum=2)
    with pytest.raises(ValueError, match="grad_accum: checkpoint 1, now 2"):
        run(cfg)


def test_resume_warns_about_changed_settings(tmp_path, caplog):
    run(make_cfg(tmp_path, "r", stop_at=2))
    caplog.set_level("WARNING", logger="vla")
    caplog.clear()  # only what the resumed run says (an earlier test may have left the root logger at INFO)
    run(make_cfg(tmp_path, "r", resume=True, lr=1e-3))
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "changed setting: train.lr: 0.003 -> 0.001" in warnings
    assert "train.resume" not in warnings and "train.stop_at" not in warnings


def test_existing_run_is_not_overwritten(tmp_path):
    run(make_cfg(tmp_path, "r", steps=2))
    with pytest.raises(ConfigError, match="--train.resume true"):
        run(make_cfg(tmp_path, "r", steps=2))


# ---- safety ------------------------------------------------------------------------------------------------------


def test_nan_loss_stops_without_saving_and_last_checkpoint_loads(tmp_path):
    policy = TinyPolicy()
    policy.poison_after = 3  # step 4 is the first bad one
    cfg = make_cfg(tmp_path, "nan", steps=8, save_every=3, log_every=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient at step 4 .*step-000003"):
        run(cfg, policy=policy)
    run_dir = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000003"]
    assert read_last(run_dir).name == "step-000003"
    good = weights(read_last(run_dir))
    assert all(torch.isfinite(t).all() for t in good.values())
    fresh = TinyPolicy()
    fresh.load_state_dict(load_file(str(read_last(run_dir) / PRETRAINED_DIR / "model.safetensors")))
    # and the run can be resumed from it (with a healthy policy)
    run(make_cfg(tmp_path, "nan", steps=8, save_every=3, log_every=2, resume=True))
    assert read_last(run_dir).name == "step-000008"


def test_bad_first_batch_fails_before_any_step(tmp_path):
    class Broken(TinyPolicy):
        def forward(self, batch):
            return {"loss": super().forward(batch)["loss"] * float("inf")}

    with pytest.raises(ValueError, match="first training batch gives non-finite"):
        run(make_cfg(tmp_path, "broken"), policy=Broken())
    assert list_checkpoints(tmp_path / "broken") == []


@pytest.mark.parametrize("crash_in", ["_save_pretrained", "_fsync_tree"])
def test_crash_mid_save_leaves_last_valid(tmp_path, monkeypatch, crash_in):
    """The process dies while writing the policy, or with every file written just before the rename."""
    run(make_cfg(tmp_path, "crash", steps=4, stop_at=2))
    run_dir = tmp_path / "crash"

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_mod, crash_in, die)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, "crash", steps=4, resume=True))
    monkeypatch.undo()
    assert (run_dir / ".tmp-step-000004" / TRAINING_STATE_DIR / "optimizer.bin").is_file()  # half-written
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000002"]
    assert resolve_checkpoint(run_dir / LAST).name == "step-000002"
    assert weights(resolve_checkpoint(run_dir / LAST))  # loads
    run(make_cfg(tmp_path, "crash", steps=4, resume=True))
    assert not (run_dir / ".tmp-step-000004").exists()
    assert read_last(run_dir).name == "step-000004"


def test_last_is_a_file_where_symlinks_fail(tmp_path, monkeypatch):
    def no_symlinks(*a, **k):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    run_dir, _ = run(make_cfg(tmp_path, "nolink", steps=4, keep_last=1))
    last = run_dir / LAST
    assert last.is_file() and not last.is_symlink()
    assert last.read_text().strip() == "step-000004"
    assert resolve_pretrained(last) == (run_dir / "step-000004" / PRETRAINED_DIR).resolve()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000004"]  # keep_last=1 pruned step 2


def test_keep_last_and_run_layout(tmp_path):
    run_dir, _ = run(make_cfg(tmp_path, "keep", steps=6, keep_last=2))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000004", "step-000006"]
    assert (run_dir / LAST).is_symlink() and read_last(run_dir).name == "step-000006"
    assert json.loads((run_dir / "config.json").read_text())["train"]["run_name"] == "keep"
    ckpt = read_last(run_dir)
    assert (ckpt / PRETRAINED_DIR / "config.json").is_file()
    meta = json.loads((ckpt / TRAINING_STATE_DIR / "trainer_state.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_logged_scalars_cover_losses_lr_and_routing(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run(make_cfg(tmp_path, "tb", steps=2))
    tags, acc = set(), None
    for events in {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}:
        candidate = EventAccumulator(str(events))
        candidate.Reload()
        if "loss/loss" in candidate.Tags()["scalars"]:
            acc, tags = candidate, set(candidate.Tags()["scalars"])
    assert acc is not None, "no scalars logged"
    for tag in ("loss/loss", "loss/mse", "loss/balance", "train/grad_norm", "lr/action/decay", "lr/backbone/decay",
                "routing/layer0_hb/expert_0", "routing/layer0_hb/max_over_mean", "perf/steps_per_s"):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    assert [e.step for e in acc.Scalars("loss/loss")] == [1, 2]


# ---- pieces ------------------------------------------------------------------------------------------------------


def test_optimizer_groups_decay_only_matrices_and_scale_backbone_lr():
    cfg = get_preset("debug").train
    cfg.backbone_lr_scale = 0.1
    opt = make_optimizer(TinyPolicy(), cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"action/decay", "action/no_decay", "backbone/decay", "backbone/no_decay"}
    assert all(p.dim() >= 2 for g in ("action/decay", "backbone/decay") for p in groups[g]["params"])
    assert all(p.dim() < 2 for g in ("action/no_decay", "backbone/no_decay") for p in groups[g]["params"])
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0
    assert groups["backbone/decay"]["lr"] == pytest.approx(cfg.lr * 0.1)
    assert groups["action/decay"]["lr"] == pytest.approx(cfg.lr)


def test_optimizer_is_fused_on_cpu_and_updates_like_the_reference_adamw():
    cfg = get_preset("debug").train
    model, reference = TinyPolicy(), TinyPolicy()
    reference.load_state_dict(model.state_dict())
    opt = make_optimizer(model, cfg)
    ref = torch.optim.AdamW(parameter_groups(reference, cfg), lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)
    assert all(g["fused"] for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref)):
            torch.manual_seed(1)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            o.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_schedule_warms_up_then_decays_to_min_ratio():
    cfg = get_preset("debug").train
    cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio = 10, 2, 0.1
    opt = make_optimizer(TinyPolicy(), cfg)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"] / cfg.lr)
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert opt.param_groups[0]["lr"] / cfg.lr == pytest.approx(0.1)


def test_ema_swap_restores_raw_weights_and_round_trips(tmp_path):
    model = TinyPolicy()
    ema = EMA(model, decay=0.5)
    raw_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model)  # first decay is min(0.5, 1/10) = 0.1 -> shadow = 0.1*old + 0.9*new
    with ema.swapped_into(model):
        w = model.head[1].weight.detach().clone()
    torch.testing.assert_close(w, raw_before["head.1.weight"] + 0.9)
    torch.testing.assert_close(model.head[1].weight, raw_before["head.1.weight"] + 1.0)
    ema.save(tmp_path / "ema.safetensors")
    other = EMA(TinyPolicy(), decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.num_updates == 1
    assert_same(other.shadow, ema.shadow, atol=0)


def test_freeze_routers_keeps_router_weights(tmp_path):
    policy = TinyPolicy()
    frozen = freeze_routers(policy)
    assert frozen == ["router.weight", "router.bias"]
    before = policy.router.weight.detach().clone()
    run(make_cfg(tmp_path, "frozen", steps=2), policy=policy)
    torch.testing.assert_close(policy.router.weight, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no router"):
        freeze_routers(nn.Linear(2, 2))


def test_load_matching_reports_new_and_unused_tensors(tmp_path):
    src = TinyPolicy()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["head.1.weight"] = torch.zeros(5, 32)  # another action size: must not be loaded
    state["old_only"] = torch.zeros(3)
    target = TinyPolicy()
    report = load_matching(target, state, tmp_path)
    assert report.new == ["head.1.weight"]
    assert report.unused == ["head.1.weight", "old_only"]
    torch.testing.assert_close(target.backbone[0].weight, src.backbone[0].weight)
    with pytest.raises(ValueError, match="no tensor"):
        load_matching(nn.Linear(1, 1), state, tmp_path)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("cpu_2proc", "MULTI_GPU")])
def test_accelerate_launch_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "vla" / "training" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == kind
    assert cfg.mixed_precision == "no"  # the run's train.mixed_precision decides, not the launcher file
    if name == "deepspeed_zero2":
        assert cfg.deepspeed_config["zero_stage"] == 2
    if name == "cpu_2proc":
        assert cfg.num_processes == 2 and not cfg.use_cpu


def test_routing_scalars_shares_per_layer_and_embodiment():
    from accelerate import Accelerator

    from vla.training.metrics import routing_scalars

    stats = {
        "layers": [
            {"layer": 0, "kind": "as", "by_embodiment": {"110": [6, 0, 0], "011": [0, 2, 0]}},
            {"layer": 2, "kind": "hb", "by_embodiment": {}},  # nothing routed this interval: nothing logged
        ],
        "horizons": {"horizons": [2, 4], "samples": 4, "mean_weight": [[0.5, 0.5, 0, 0], [0.5, 0.5, 1, 1]]},
    }
    out = routing_scalars(stats, Accelerator(cpu=True), names={"110": "panda"})
    assert out["routing/layer0_as/expert_0"] == pytest.approx(0.75)
    assert out["routing/layer0_as/expert_1"] == pytest.approx(0.25)
    assert out["routing/layer0_as/max_over_mean"] == pytest.approx(0.75 * 3)
    assert out["routing/layer0_as/panda/expert_0"] == 1.0 and out["routing/layer0_as/011/expert_1"] == 1.0
    assert not any(k.startswith("routing/layer2") for k in out)
    assert out["routing/horizon_2/mean_weight"] == pytest.approx(0.5)
    assert out["routing/horizon_4/mean_weight"] == pytest.approx(0.75)

"""The scale path without a GPU: FSDP2 sharding and sharded checkpoints, bf16 autocast, streaming mixtures, the
launcher checks and bench/gpu_check.py at toy size.

Fast: wrap policy; a sharded save -> consolidate -> from_pretrained round trip in one gloo process; bf16 step
close to fp32 with fp32 routers; streaming with weights and per-dataset statistics; the v2.x error; the launch
checks; `bench/gpu_check.py --toy` with lerobot and the simulators hidden from import.
Slow: 2 real CPU processes under FSDP2: train, sharded checkpoints, SIGKILL, resume == uninterrupted to 1e-6,
consolidated weights load with `VLAPolicy.from_pretrained`; the 1 vs 2 process throughput bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla.config import get_preset
from vla.data.embodiments import default_registry
from vla.policy import VLAPolicy
from vla.training.synthetic import synthetic_batch, synthetic_normalizer

REPO = Path(__file__).resolve().parents[1]


def debug_cfg(image_size: int = 32):
    cfg = get_preset("debug")
    cfg.data.image_size = image_size
    return cfg.validate()


def debug_policy(seed: int = 0) -> VLAPolicy:
    cfg = debug_cfg()
    registry = default_registry()
    torch.manual_seed(seed)
    return VLAPolicy(cfg, registry, synthetic_normalizer(cfg, registry))


# ---- FSDP wrap policy and sharded checkpoints -------------------------------------------------------------------


def test_wrap_policy_has_one_unit_per_block_and_backbone_layer():
    from vla.training.distributed import shard_units, unit_class_names

    policy = debug_policy()
    names = [n for n, _ in shard_units(policy)]
    blocks = [f"head.transformer.blocks.{i}" for i in range(4)]
    assert all(b in names for b in blocks)
    assert [n for n in names if n.startswith("backbone.")], f"no backbone layer is a unit: {names}"
    assert {"Block", "BasicBlock"} <= set(unit_class_names(policy))
    # experts are sharded with their block: no expert module is a unit of its own
    assert not [n for n in names if ".ffn" in n]


@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_save_consolidates_to_the_checkpoint_from_pretrained_loads(tmp_path, gloo_group):
    from vla.training.distributed import consolidate, load_sharded, save_sharded, shard_policy
    from vla.training.optim import make_optimizer, make_scheduler

    policy = debug_policy()
    cfg, registry = policy.config, policy.registry
    shard_policy(policy)
    optimizer = make_optimizer(policy, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    losses = policy(synthetic_batch(cfg, registry, 4, seed=1))
    losses["loss"].backward()
    optimizer.step()
    scheduler.step()
    save_sharded(tmp_path / "ckpt", policy, optimizer, scheduler, {"step": 1})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    out = consolidate(tmp_path / "ckpt", tmp_path / "pretrained")
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == full.keys()
    assert max((saved[k] - full[k]).abs().max().item() for k in full) == 0
    loaded = VLAPolicy.from_pretrained(out)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    meta = load_sharded(tmp_path / "ckpt", policy, optimizer, scheduler)
    assert meta["step"] == 1 and meta["world_size"] == 1


def test_consolidate_names_what_is_missing(tmp_path):
    from vla.training.distributed import ShardingError, consolidate

    with pytest.raises(ShardingError, match="no torch.distributed.checkpoint files"):
        consolidate(tmp_path, tmp_path / "out")


def test_fsdp_or_deepspeed_config_on_cpu_fails_with_one_clear_error(monkeypatch, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from vla.config import ConfigError
    from vla.training.distributed import check_launch
    from vla.training.loop import make_accelerator

    check_launch("NO", env={})
    with pytest.raises(ConfigError, match="FSDP launcher config was used but the run is MULTI_CPU"):
        check_launch("DistributedType.MULTI_CPU", env={"ACCELERATE_USE_FSDP": "true"})

    def accelerator_error(**env: str) -> str:
        """The error the trainer's make_accelerator gives under the env `accelerate launch` sets for a config."""
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            try:
                with pytest.raises(ConfigError) as err:
                    make_accelerator(debug_cfg(), tmp_path)
            finally:
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
        return str(err.value)

    assert "FSDP launcher config was used but the run is NO" in accelerator_error(ACCELERATE_USE_FSDP="true")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # deepspeed not installed
    assert "needs the deepspeed package" in accelerator_error(ACCELERATE_USE_DEEPSPEED="true")


# ---- bf16 ----------------------------------------------------------------------------------------------------


def test_bf16_autocast_step_is_finite_close_to_fp32_with_fp32_routers():
    from vla.action.moe import Router

    policy = debug_policy()
    cfg = policy.config
    batch = synthetic_batch(cfg, policy.registry, 8, seed=3)
    batch["noise"] = torch.randn(8, cfg.action.chunk_size, cfg.data.unified_action_dim,
                                 generator=torch.Generator().manual_seed(0))
    batch["time"] = torch.rand(8, generator=torch.Generator().manual_seed(1))
    policy.train()
    fp32 = policy(batch)["loss"]

    router_dtypes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: router_dtypes.append((out.logits.dtype, out.probs.dtype)))
             for m in policy.modules() if isinstance(m, Router)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = policy(batch)["loss"]
    for h in hooks:
        h.remove()
    bf16.backward()
    assert torch.isfinite(bf16)
    assert abs(bf16.item() - fp32.item()) <= 0.05 * abs(fp32.item()), (bf16.item(), fp32.item())
    assert router_dtypes and all(d == (torch.float32, torch.float32) for d in router_dtypes)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- streaming -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, write_lerobot_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streaming")
    return {
        "panda": write_lerobot_dataset(root / "panda", robot_type="libero_panda", action_dim=7, state_dim=8,
                                       episodes=(12, 12, 12)),
        "ur5e": write_lerobot_dataset(root / "ur5e", robot_type="robosuite_ur5e_osc", action_dim=4, state_dim=8,
                                      episodes=(10, 10), seed=1, cameras=("frontview", "robot0_eye_in_hand")),
    }


def _mixture_cfg(tmp_path: Path, entries: list[dict]):
    cfg = debug_cfg()
    cfg.data.batch_size = 8
    cfg.data.num_workers = 0
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"datasets": entries}))
    cfg.data.mixture = str(path)
    return cfg


def test_streaming_mixture_keeps_weights_batches_and_per_dataset_stats(two_datasets, tmp_path):
    from vla.constants import ACTION, ACTION_IS_PAD, DATASET_ID, OBS_STATE, image_key
    from vla.data.mixture import load_mixture, make_dataloader
    from vla.data.streaming import StreamingMixture

    cfg = _mixture_cfg(tmp_path, [{"dataset": str(two_datasets["panda"]), "weight": 3.0},
                                  {"dataset": str(two_datasets["ur5e"]), "weight": 1.0}])
    stream = StreamingMixture(cfg, load_mixture(cfg.data), shuffle_buffer=16)
    assert set(stream.normalizer.embodiments) == {"libero_panda", "robosuite_ur5e_osc"}
    # the statistics are each dataset's own (meta/stats.json), not a blend across robots
    raw = json.loads((two_datasets["ur5e"] / "meta" / "stats.json").read_text())
    ur5e = stream.normalizer.stats["robosuite_ur5e_osc"]["action"]
    np.testing.assert_allclose(ur5e["mean"].numpy(), np.asarray(raw["action"]["mean"]), rtol=1e-5)

    ids = []
    batches = iter(stream.loader())
    for _ in range(12):
        batch = next(batches)
        ids += batch[DATASET_ID].tolist()
    share = ids.count(0) / len(ids)
    assert 0.62 <= share <= 0.88, f"panda share {share:.2f}, weight 3:1 gives 0.75"

    ref = next(iter(make_dataloader(cfg, load_mixture(cfg.data), stream.normalizer)))
    assert set(batch) == set(ref)
    for key in (ACTION, ACTION_IS_PAD, OBS_STATE, image_key("base")):
        assert batch[key].shape == ref[key].shape and batch[key].dtype == ref[key].dtype, key
    assert torch.isfinite(batch[ACTION]).all()


def test_v2_dataset_gets_one_error_naming_the_converter(two_datasets, tmp_path):
    import shutil

    from vla.data.mixture import MixtureError, load_mixture
    from vla.data.streaming import StreamingMixture

    old = tmp_path / "old_format"
    shutil.copytree(two_datasets["panda"] / "meta", old / "meta")
    info = json.loads((old / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (old / "meta" / "info.json").write_text(json.dumps(info))
    cfg = _mixture_cfg(tmp_path, [{"dataset": str(old), "embodiment": "libero_panda"}])
    with pytest.raises(MixtureError) as streamed:
        StreamingMixture(cfg, load_mixture(cfg.data))
    with pytest.raises(MixtureError) as in_memory:
        load_mixture(cfg.data).validate()
    for err in (streamed.value, in_memory.value):
        assert len(err.problems) == 1
        assert "v2.1" in str(err) and "lerobot.datasets.v30.convert_dataset_v21_to_v30" in str(err)


# ---- bench/gpu_check.py --------------------------------------------------------------------------------------

HIDE = """
import importlib.abc, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"lerobot", "libero", "robosuite", "mujoco"}:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, _Hide())
"""


def test_gpu_check_toy_runs_on_cpu_without_lerobot_or_simulators(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--toy", "--steps", "2",
                           "--budget-s", "120", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["imported_forbidden"] == []
    presets = {r["preset"]: r for r in report["runs"]}
    assert set(presets) == {"mode", "himoe-paligemma"}
    for r in presets.values():
        assert r["steps"] == 2 and np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["step_s"] > 0
        assert r["mfu"] is None or r["mfu"] >= 0
        assert set(r["expert_cache_speedup"]) == {"1", "64"}


# ---- slow: 2 CPU processes -----------------------------------------------------------------------------------


def _worker(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "bench" / "bench_scale.py"), "worker", "--mode", "fsdp", "--out", str(out), "--steps", "6",
            "--save-every", "2", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_fsdp_two_processes_kill_resume_consolidate(tmp_path):
    from vla.training.distributed import consolidate

    full = subprocess.run(_worker(tmp_path / "full"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    assert full.returncode == 0, full.stderr[-4000:]

    killed = subprocess.run(_worker(tmp_path / "split", "--kill-at", "4"), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=900, check=False, start_new_session=True)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["step-000002", "step-000004"]

    resumed = subprocess.run(_worker(tmp_path / "split", "--resume"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=900, check=False)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    a = consolidate(tmp_path / "full" / "step-000006", tmp_path / "full_pretrained")
    b = consolidate(tmp_path / "split" / "step-000006", tmp_path / "split_pretrained")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    start = load_file(str(consolidate(tmp_path / "full" / "step-000002", tmp_path / "s2") / "model.safetensors"))
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 0, "training changed nothing"
    policy = VLAPolicy.from_pretrained(b)
    assert all(torch.equal(v, wb[k]) for k, v in policy.state_dict().items())


@pytest.mark.slow
def test_one_vs_two_process_throughput_bench():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_scale

    rows = bench_scale.run(quick=True)
    assert {r["benchmark"] for r in rows} == {"scale ddp CPU", "scale fsdp CPU"}
    for r in rows:
        f = r["figures"]
        assert f["samples_per_s_1"] > 0 and f["samples_per_s_2"] > 0 and 0 <= f["comm_share_2"]

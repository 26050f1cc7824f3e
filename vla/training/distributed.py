"""Fully sharded training of a `VLAPolicy`: the wrap policy, sharded checkpoints and their consolidation.

Under `accelerate launch --config_file vla/training/accelerate/fsdp.yaml` on GPUs, Accelerate applies FSDP2
(`torch.distributed.fsdp.fully_shard`) to the classes listed in that file. On CPU processes it does not:
Accelerate 1.15 turns its FSDP and DeepSpeed plugins on only for accelerator process groups (see
`ACCELERATE_CPU_LIMIT`), so this module applies the same `fully_shard` calls itself, which is what proves the
sharded path on a machine without a GPU (bench/bench_scale.py, tests/test_scale.py):

    units = shard_policy(policy)                        # one FSDP unit per action Block and backbone layer
    save_sharded(ckpt, policy, optimizer, scheduler)     # every rank writes its shards (torch.distributed.checkpoint)
    load_sharded(ckpt, policy, optimizer, scheduler)     # every rank reads them back, resharding if needed
    consolidate(ckpt, out)                               # one process, no process group: out/model.safetensors

A sharded checkpoint directory holds `model/` (DCP files of {"model": ..., "optim": ...}, the same "model" key
Accelerate's SHARDED_STATE_DICT uses), `policy/` (config, registry, normalization, backbone files: everything
`VLAPolicy.from_pretrained` needs except the weights) and `trainer.json` (step, scheduler state, world size).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
POLICY_DIR = "policy"
TRAINER_FILE = "trainer.json"
OUTSIDE_CALLED = ("attn", "noise_proj")
"""Submodules of an action Block that the head calls directly (not through Block.forward)."""
FORWARD_METHODS = {"attn": ("project_prefix",)}
"""Methods besides forward that must gather a unit's weights (`register_fsdp_forward_method`)."""
BACKBONE_LAYER_SUFFIXES = ("Layer", "Block", "Bottleneck")
"""Class-name endings of one repeated layer of a backbone (GemmaDecoderLayer, SiglipEncoderLayer, BasicBlock)."""

ACCELERATE_CPU_LIMIT = (
    "Accelerate 1.15 enables its FSDP and DeepSpeed plugins only for GPU/NPU/XPU process groups: with "
    "Accelerator(cpu=True) under `accelerate launch` the run becomes MULTI_CPU (plain DDP over gloo) and the plugin "
    "is dropped without a message (accelerate/state.py, AcceleratorState.__init__)"
)
"""Why the FSDP and DeepSpeed launcher configs cannot shard CPU processes (measured with accelerate 1.15.0)."""


class ShardingError(RuntimeError):
    """A sharded run or checkpoint cannot be used as asked; the message names the problem."""


# ---- the wrap policy -------------------------------------------------------------------------------------------


def shard_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every FSDP unit below the root, outermost first.

    One unit per action-transformer `Block` (its norms, router and experts together, so an expert's weights are
    sharded with the block that routes to it), with the block's attention and noise projection nested in it as
    units of their own because the head calls them outside `Block.forward`; and one per backbone layer: the
    outermost composite modules whose class name ends in Layer, Block or Bottleneck (VLM decoder and
    vision-encoder layers, BERT layers, ResNet/RegNet residual blocks). A lone Linear or Conv is never a unit.
    """
    from vla.action.transformer import Block

    units: list[tuple[str, nn.Module]] = []
    taken: set[int] = set()

    def inside_unit(name: str) -> bool:
        return any(name.startswith(u + ".") for u, _ in units)

    for name, module in model.named_modules():
        if isinstance(module, Block) and not inside_unit(name):
            units.append((name, module))
            taken.add(id(module))
            # called by the head outside Block.forward (prefix keys/values once per observation, the noise shift
            # once per denoising step), so they gather their own weights: nested units of the block
            for child in OUTSIDE_CALLED:
                if getattr(module, child, None) is not None:
                    units.append((f"{name}.{child}", getattr(module, child)))
                    taken.add(id(getattr(module, child)))
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        prefix = next(n for n, m in model.named_modules() if m is backbone)
        for name, module in backbone.named_modules():
            full = ".".join(p for p in (prefix, name) if p)
            composite = any(True for _ in module.children()) and any(True for _ in module.parameters())
            if (composite and type(module).__name__.endswith(BACKBONE_LAYER_SUFFIXES) and id(module) not in taken
                    and not inside_unit(full)):
                units.append((full, module))
                taken.add(id(module))
    return units


def unit_class_names(model: nn.Module) -> list[str]:
    """Class names of the units, for `fsdp_transformer_layer_cls_to_wrap` in an Accelerate FSDP config."""
    return sorted({type(m).__name__ for _, m in shard_units(model)})


def shard_policy(
    model: nn.Module,
    mesh: Any = None,
    mixed_precision: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Apply FSDP2 to `model` in place: each unit of `shard_units`, then the root; returns the unit names.

    Needs an initialised process group (gloo on CPU, nccl on GPU). `mixed_precision` (e.g. torch.bfloat16) is
    the compute dtype of the gathered weights; master weights, gradients reduction and the optimizer stay fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ShardingError("shard_policy needs torch.distributed initialised (launch with torchrun or "
                            "accelerate launch)")
    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    dense = _make_contiguous(model)
    if dense:
        logger.info("FSDP2 shards contiguous parameters only: %d channels-last tensors made contiguous", dense)
    units = shard_units(model)
    for _, module in reversed(units):  # innermost first, as fully_shard expects
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    register_forward_methods(model)
    logger.info("sharded %d units over %d processes (%s)", len(units), dist.get_world_size(),
                ", ".join(unit_class_names(model)))
    return [n for n, _ in units]


def _make_contiguous(model: nn.Module) -> int:
    """Give every non-contiguous parameter (channels-last convolution weights) a contiguous layout, in place."""
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
                count += 1
    return count


def register_forward_methods(model: nn.Module) -> int:
    """Make the methods of FORWARD_METHODS gather their unit's weights on every FSDP unit that has them (units
    made by `shard_policy` or by Accelerate's FSDP2 plugin); returns how many were registered."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    count = 0
    for name, module in model.named_modules():
        for method in FORWARD_METHODS.get(name.rsplit(".", 1)[-1], ()):
            if isinstance(module, FSDPModule) and hasattr(module, method):
                register_fsdp_forward_method(module, method)
                count += 1
    return count


# ---- sharded checkpoints ---------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_policy_files(policy: nn.Module, directory: str | os.PathLike) -> Path:
    """Everything `VLAPolicy.from_pretrained` reads except the weights: config, registry, normalizer, backbone."""
    from vla.layout import CONFIG_NAME

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    policy.config.to_json(out / CONFIG_NAME)
    policy.registry.save(out)
    if policy.normalizer is not None:
        policy.normalizer.save(out)
    policy.backbone.save_extra(out)
    return out


def save_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    trainer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sharded checkpoint of a `shard_policy`-ed model; call on every rank (collective).

    Each rank writes only its own shards of the weights and optimizer state; rank 0 adds the policy files and
    `trainer.json` ({"step", "world_size", "scheduler", **trainer_state}). Not atomic by itself: write into a
    temporary directory and rename it once every rank returned (bench/bench_scale.py does).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / MODEL_DIR))
    if _rank() == 0:
        write_policy_files(model, out / POLICY_DIR)
        meta = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "scheduler": scheduler.state_dict() if scheduler is not None else None, **(trainer_state or {})}
        (out / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return out


def load_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load a `save_sharded` checkpoint into a `shard_policy`-ed model and its optimizer (every rank); returns
    `trainer.json`. DCP reshards on load, so the world size may differ from the one that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    src = Path(directory)
    meta_path = src / TRAINER_FILE
    if not (src / MODEL_DIR / ".metadata").is_file() or not meta_path.is_file():
        raise ShardingError(f"{src} is not a complete sharded checkpoint: it needs {MODEL_DIR}/.metadata and "
                            f"{TRAINER_FILE}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(src / MODEL_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads(meta_path.read_text())
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta


def consolidate(checkpoint: str | os.PathLike, out: str | os.PathLike, policy_dir: str | os.PathLike | None = None
                ) -> Path:
    """Turn a sharded checkpoint into the directory `VLAPolicy.from_pretrained` loads (one model.safetensors).

    Runs in one process without a process group. `checkpoint` is a `save_sharded` directory, or any DCP folder
    whose weights sit under the "model" key (Accelerate's `pytorch_model_fsdp_0`) together with `policy_dir`,
    a folder with the policy files (a `pretrained_model/` of the same run has them).
    """
    import torch.distributed.checkpoint as dcp

    from vla.config import VLAConfig
    from vla.data.embodiments import EmbodimentRegistry
    from vla.data.normalize import Normalizer
    from vla.layout import CONFIG_NAME
    from vla.policy import VLAPolicy

    ckpt = Path(checkpoint)
    model_dir = ckpt / MODEL_DIR if (ckpt / MODEL_DIR / ".metadata").is_file() else ckpt
    files = Path(policy_dir) if policy_dir is not None else ckpt / POLICY_DIR
    if not (model_dir / ".metadata").is_file():
        raise ShardingError(f"{ckpt} holds no torch.distributed.checkpoint files (no .metadata)")
    if not (files / CONFIG_NAME).is_file():
        raise ShardingError(f"{files} has no {CONFIG_NAME}: pass policy_dir, a folder with the run's policy files")
    config = VLAConfig.from_json(files / CONFIG_NAME)
    normalizer = Normalizer.load(files) if Normalizer.exists(files) else None
    policy = VLAPolicy(config, registry=EmbodimentRegistry.load(files), normalizer=normalizer, checkpoint_dir=files)
    state = {"model": policy.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(model_dir), no_dist=True)
    policy.load_state_dict(state["model"], strict=True)
    return policy.save_pretrained(out)


# ---- launch checks ---------------------------------------------------------------------------------------------


def check_launch(distributed_type: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Raise one clear error when the launcher asked for FSDP/DeepSpeed and the Accelerator is something else.

    `accelerate launch` with the fsdp/deepspeed configs sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED; on CPU
    processes Accelerate ignores both, so without this check such a run trains unsharded without saying so. Call
    it once before building the Accelerator (`distributed_type` None: only the deepspeed package is checked, which
    the Accelerator would otherwise report as an ImportError traceback) and once after.
    """
    from vla.config import ConfigError

    env = os.environ if env is None else env
    wanted_ds = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    wanted_fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted_ds:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("the DeepSpeed launcher config needs the deepspeed package, which vla does not "
                              "install: `pip install deepspeed` on a CUDA machine, or use "
                              "vla/training/accelerate/ddp.yaml or fsdp.yaml")
    if distributed_type is None:
        return
    kind = str(distributed_type).split(".")[-1].upper()
    if wanted_ds and kind != "DEEPSPEED":
        raise ConfigError(f"the DeepSpeed launcher config was used but the run is {kind}: {ACCELERATE_CPU_LIMIT}; "
                            "on CPU use vla/training/accelerate/cpu_2proc.yaml")
    if wanted_fsdp and kind != "FSDP":
        raise ConfigError(f"the FSDP launcher config was used but the run is {kind}: {ACCELERATE_CPU_LIMIT}; on "
                            "CPU use vla/training/accelerate/cpu_2proc.yaml (DDP), or vla.training.distributed."
                            "shard_policy as bench/bench_scale.py does")

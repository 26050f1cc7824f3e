"""The training loop: one Accelerate loop from one CPU process to many GPUs.

    train(cfg)
      ├─ make_accelerator     mixed precision, gradient accumulation, DDP/FSDP/DeepSpeed from `accelerate launch`
      ├─ resume_checkpoint    the run's newest checkpoint if train.resume, else refuse to overwrite a run
      ├─ build                validate the mixture, normalization stats, policy (+ init_from, freezing), loader
      └─ fit
           ├─ AdamW + warm-up/cosine, accelerator.prepare, EMA, load the checkpoint when resuming
           ├─ dry run         one forward on the first batch: config/data problems surface before any step
           └─ for each step   grad_accum x (accumulate > autocast > policy(batch) > backward), clip on sync,
                              optimizer/scheduler/EMA step; log every log_every; checkpoint every save_every

Every process runs the same code; rank-0-only work (writing files, the progress bar) is gated inside helpers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vla.config import ConfigError, VLAConfig
from vla.training.batches import BatchStream
from vla.training.checkpoint import (
    last_good_checkpoint,
    load_checkpoint,
    nonfinite_names,
    pick_resumable,
    restore_rng,
    save_checkpoint,
)
from vla.training.distributed import check_launch, register_forward_methods
from vla.training.ema import EMA
from vla.training.finetune import freeze_routers, init_from_checkpoint
from vla.training.layout import CONFIG_NAME, PRETRAINED_DIR, list_checkpoints, remove_partial
from vla.training.metrics import LossMeter, TrainingDiverged, routing_scalars
from vla.training.optim import make_optimizer, make_scheduler

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"


def train(cfg: VLAConfig) -> Path:
    """Train a policy as `cfg` says; returns the run directory (`train.output_dir/train.run_name`).

    Works the same in one process and under `accelerate launch`. Raises before the first step on configuration or
    data problems, and `TrainingDiverged` (leaving the last good checkpoint intact) if the loss becomes NaN/inf.
    """
    cfg.validate()
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    accelerator = make_accelerator(cfg, run_dir)
    with _log_to_file(accelerator, run_dir):
        resume_from = resume_checkpoint(cfg, run_dir)
        set_seed(cfg.train.seed)  # the same on every process: identical initial weights
        policy, loader = build(cfg, accelerator, resume_from)
        return fit(cfg, accelerator, policy, loader, run_dir, resume_from=resume_from)


def make_accelerator(cfg: VLAConfig, run_dir: Path) -> Accelerator:
    """The Accelerator for a run; the process layout (DDP, FSDP, DeepSpeed, CPU) comes from `accelerate launch`."""
    moe = any(kind != "d" for kind in cfg.action.layer_kinds)
    check_launch()  # a DeepSpeed launch without the deepspeed package: one error, not an ImportError traceback
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # Step the scheduler once per optimiser step ourselves; a prepared scheduler would otherwise step
        # num_processes times per call.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        # Experts that no token of a batch was routed to get no gradient; DDP must not wait for them.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=moe)],
    )
    check_launch(accelerator.distributed_type)  # an FSDP/DeepSpeed launch that Accelerate dropped (CPU) fails here
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # The loader is not passed through accelerator.prepare (it shards by rank itself), so DeepSpeed cannot
        # read the micro-batch size from it; gradient clipping follows train.grad_clip unless the file sets it.
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            ds.deepspeed_config["gradient_clipping"] = cfg.train.grad_clip
    return accelerator


def resume_checkpoint(cfg: VLAConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (train.resume), None for a fresh run; refuses to overwrite a run.

    A newest checkpoint that cannot be restored (corrupt state files, non-finite weights) is skipped with a
    warning for the previous complete one; CheckpointError if none can be.
    """
    ckpts = list_checkpoints(run_dir)
    if cfg.train.resume:
        if not ckpts:
            logger.info("train.resume is set but %s has no checkpoint yet: starting from step 0", run_dir)
            return None
        return pick_resumable(run_dir)
    if ckpts:
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({ckpts[-1].name} is the newest): pass --train.resume true to "
            "continue it, or choose another --train.run_name"
        )
    return None


def build(cfg: VLAConfig, accelerator: Accelerator, resume_from: Path | None = None) -> tuple[nn.Module, DataLoader]:
    """Validate the data mixture, take its normalization statistics, build the policy and this process's loader.

    When resuming, the statistics come from the checkpoint (the policy keeps the ones it was trained with) and
    `train.init_from` is skipped: the checkpoint being resumed already holds those weights.
    """
    from vla.data.embodiments import build_registry
    from vla.data.mixture import load_mixture, make_dataloader
    from vla.data.normalize import Normalizer
    from vla.policy import VLAPolicy

    registry = build_registry(cfg.data.embodiments_file)
    mixture = load_mixture(cfg.data, registry)
    mixture.validate()  # one error listing every problem of every dataset
    if resume_from is not None:
        normalizer = Normalizer.load(resume_from / PRETRAINED_DIR)
    else:
        normalizer = mixture.compute_stats()
    policy = VLAPolicy(cfg, registry, normalizer)
    if cfg.train.init_from and resume_from is None:
        init_from_checkpoint(policy, cfg.train.init_from, cfg)
    if cfg.train.freeze_routers:
        logger.info("froze %d router tensors", len(freeze_routers(policy)))
    loader = make_dataloader(
        cfg, mixture, normalizer, rank=accelerator.process_index, world_size=accelerator.num_processes, train=True
    )
    return policy, loader


def fit(
    cfg: VLAConfig,
    accelerator: Accelerator,
    policy: nn.Module,
    loader: DataLoader,
    run_dir: Path,
    resume_from: Path | None = None,
) -> Path:
    """Optimise `policy` on batches from `loader` (this process's shard) up to `train.stop_at or train.steps`.

    `policy(batch)` must return a dict of scalar losses with the total under "loss"; the policy must provide
    `save_pretrained(dir)` and may provide `routing_stats(reset=True)`.
    """
    tcfg = cfg.train
    end_step = tcfg.stop_at or tcfg.steps
    if accelerator.distributed_type == DistributedType.FSDP:
        if tcfg.ema_decay > 0:
            raise ConfigError("train.ema_decay > 0 is not supported with FSDP (sharded weights); use DDP or DeepSpeed")
        if "state_dict" not in inspect.signature(policy.save_pretrained).parameters:
            raise ConfigError("FSDP checkpoints need policy.save_pretrained(directory, state_dict=...) to write the "
                              "gathered full weights; this policy class does not accept state_dict")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in remove_partial(run_dir):
            logger.info("removed %s left by an interrupted save", p.name)
    accelerator.wait_for_everyone()

    policy.to(accelerator.device)
    optimizer = make_optimizer(policy, tcfg)
    scheduler = make_scheduler(optimizer, tcfg)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    model = accelerator.unwrap_model(policy)
    if accelerator.distributed_type == DistributedType.FSDP:
        register_forward_methods(model)  # the head calls Attention.project_prefix outside Block.forward
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    stream = BatchStream(loader)
    set_seed(tcfg.seed, device_specific=True)  # from here on each process draws its own noise and dropout

    step, rng = 0, None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, cfg, ema)
        step, rng = state.step, state.rank_state["rng"]
        stream.load_state_dict(state.rank_state["data"])
    dry_run(policy, stream.peek(), accelerator)
    if rng is not None:
        restore_rng(rng)  # last: nothing between here and the first step may draw a random number
    if step >= end_step:
        logger.info("nothing to do: the run is at step %d and train.%s is %d", step,
                    "stop_at" if tcfg.stop_at else "steps", end_step)
        return run_dir

    if accelerator.is_main_process:
        _write_config(cfg, run_dir)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("training %s: %.2fM parameters (%.2fM trainable), %d processes, steps %d -> %d",
                    run_dir, sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6,
                    accelerator.num_processes, step, end_step)
    accelerator.init_trackers(TENSORBOARD_DIR, config=_hparams(cfg))
    meter = LossMeter(accelerator.device)
    bar = tqdm(total=tcfg.steps, initial=step, desc=cfg.train.run_name, dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    samples_per_step = cfg.data.batch_size * tcfg.grad_accum * accelerator.num_processes
    clock = _Clock(step)
    policy.train()
    try:
        while step < end_step:
            grad_norm = None
            for _ in range(tcfg.grad_accum):
                with clock.data():
                    batch = send_to_device(next(stream), accelerator.device, non_blocking=True)
                with accelerator.accumulate(policy):
                    with accelerator.autocast():
                        losses = policy(batch)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and tcfg.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), tcfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # fp16 overflows are expected (the grad scaler skips those steps); elsewhere a bad norm is fatal
                meter.add(losses, step + 1, grad_norm if tcfg.mixed_precision != "fp16" else None)
            if not accelerator.sync_gradients:
                raise RuntimeError("gradient accumulation fell out of step with train.grad_accum")
            lrs = {name: g["lr"] for name, g in zip(_group_names(optimizer), optimizer.param_groups, strict=True)}
            scheduler.step()
            if ema is not None:
                ema.step(model)
            step += 1
            bar.update()

            saving = step % tcfg.save_every == 0 or step == end_step
            if saving or step % tcfg.log_every == 0:
                values = _log_interval(meter, model, lrs, accelerator, clock, step, samples_per_step, run_dir)
                bar.set_postfix(loss=f"{values['loss/loss']:.4g}", lr=f"{next(iter(lrs.values())):.2e}")
                if accelerator.is_main_process:  # the run's text log keeps the loss curve next to TensorBoard
                    logger.info("step %d loss=%.5g lr=%.3g", step, values["loss/loss"], next(iter(lrs.values())))
                if ema is not None:
                    values["train/ema_decay"] = ema.current_decay()
                accelerator.log(values, step=step)
            if saving:
                _refuse_nonfinite(accelerator, model, optimizer, step, run_dir)
                save_checkpoint(accelerator, run_dir, step, cfg, policy, ema, stream.state_dict())
    finally:
        bar.close()
        accelerator.end_training()
    if step < tcfg.steps:
        logger.info("stopped at step %d of %d (train.stop_at); continue with --train.resume true", step, tcfg.steps)
    return run_dir


def dry_run(policy: nn.Module, batch: Any, accelerator: Accelerator) -> None:
    """One forward pass on the first batch before any step, leaving no trace (RNG, buffers, routing counts).

    A wrong config, a malformed batch or statistics that produce NaN fail here, before anything is written.
    """
    model = accelerator.unwrap_model(policy)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
            losses = policy(send_to_device(batch, accelerator.device))
    except Exception as e:
        raise ValueError(f"the policy failed on the first training batch, before any step: {type(e).__name__}: {e}") from e
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    if hasattr(model, "routing_stats"):
        model.routing_stats(reset=True)
    if not isinstance(losses, dict) or "loss" not in losses:
        raise ValueError(f"policy(batch) must return a dict with the total under 'loss', got {type(losses).__name__}"
                         + (f" with keys {sorted(losses)}" if isinstance(losses, dict) else ""))
    bad = [k for k, v in losses.items() if not torch.isfinite(v.detach().float()).all()]
    if bad:
        raise ValueError(f"the first training batch gives non-finite loss terms {bad} before any update: check the "
                         "normalization statistics and the data")


# ---- helpers -------------------------------------------------------------------------------------------------


class _Clock:
    """Wall time per log interval and the share of it spent waiting for data."""

    def __init__(self, step: int) -> None:
        self.step, self.start, self.data_seconds = step, time.perf_counter(), 0.0

    @contextmanager
    def data(self):
        t0 = time.perf_counter()
        yield
        self.data_seconds += time.perf_counter() - t0

    def lap(self, step: int) -> tuple[float, float, int]:
        now = time.perf_counter()
        elapsed, data, steps = now - self.start, self.data_seconds, step - self.step
        self.step, self.start, self.data_seconds = step, now, 0.0
        return elapsed, data, steps


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]


def _log_interval(
    meter: LossMeter,
    model: nn.Module,
    lrs: dict[str, float],
    accelerator: Accelerator,
    clock: _Clock,
    step: int,
    samples_per_step: int,
    run_dir: Path,
) -> dict[str, float]:
    """Reduce the interval's losses (and routing statistics) over processes; stop if any was non-finite."""
    means, first_bad = meter.reduce(accelerator)
    routing = {}
    if hasattr(model, "routing_stats"):
        routing = routing_scalars(model.routing_stats(reset=True), accelerator, _descriptor_names(model))
    if first_bad >= 0:
        last = last_good_checkpoint(run_dir)
        terms = ", ".join(f"{k}={v:.4g}" for k, v in means.items())
        message = (f"non-finite loss or gradient at step {first_bad} ({terms}); stopped at step {step} without "
                   f"saving. Last good checkpoint: {last if last else 'none (no checkpoint was written yet)'}. "
                   "Check the data statistics, lower train.lr, or raise train.warmup_steps.")
        logger.error(message)
        raise TrainingDiverged(message)
    elapsed, data_seconds, steps = clock.lap(step)
    values = {("train/grad_norm" if k == "grad_norm" else f"loss/{k}"): v for k, v in means.items()}
    values.update({f"lr/{name}": lr for name, lr in lrs.items()})  # the rates the last step used
    if steps > 0 and elapsed > 0:
        values["perf/steps_per_s"] = steps / elapsed
        values["perf/samples_per_s"] = steps * samples_per_step / elapsed
        values["perf/data_wait_fraction"] = data_seconds / elapsed
    values.update(routing)
    return values


def _refuse_nonfinite(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, run_dir: Path
) -> None:
    """Stop before saving weights or optimizer state that hold NaN/inf (call on every rank: it reduces a flag).

    A step's loss is checked before its update, so update N can explode the weights while loss N looked fine;
    without this check step N would be saved and named the last good checkpoint.
    """
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer {n}": b for n, b in model.named_buffers()})
    bad = nonfinite_names(tensors) + nonfinite_names(optimizer)
    flag = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), reduction="sum")
    if flag.item() == 0:
        return
    last = last_good_checkpoint(run_dir)
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    message = (f"non-finite weights or optimizer state after step {step} ({shown or 'on another process'}); "
               f"stopped without saving. Last good checkpoint: {last if last else 'none (none was written yet)'}. "
               "Lower train.lr, set train.grad_clip, or raise train.warmup_steps.")
    logger.error(message)
    raise TrainingDiverged(message)


def _descriptor_names(model: nn.Module) -> dict[str, str]:
    """Action-space descriptor key -> embodiment name(s), to label routing statistics by robot."""
    registry, config = getattr(model, "registry", None), getattr(model, "config", None)
    if registry is None or config is None:
        return {}
    from vla.action.moe import DescriptorGroups

    names: dict[str, list[str]] = {}
    for emb in registry:
        mask = emb.action_mask(config.data.unified_action_dim).float()[None]
        names.setdefault(DescriptorGroups.of(mask).keys[0], []).append(emb.name)
    return {key: "+".join(n) for key, n in names.items()}


def _hparams(cfg: VLAConfig) -> dict[str, Any]:
    """The config flattened to TensorBoard-storable hyper-parameters ("train.lr": 1e-4, tuples as strings)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(cfg, "")
    return out


def _write_config(cfg: VLAConfig, run_dir: Path) -> None:
    tmp = run_dir / f".{CONFIG_NAME}.tmp"
    cfg.to_json(tmp)
    tmp.replace(run_dir / CONFIG_NAME)


@contextmanager
def _log_to_file(accelerator: Accelerator, run_dir: Path):
    """Send this package's log records to `run_dir/train.log` (main process) for the duration of a run."""
    if not accelerator.is_main_process:
        yield
        return
    if not logging.getLogger().handlers:  # run as a script: show our INFO lines, others' warnings
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("vla")
    level = package.level
    package.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()

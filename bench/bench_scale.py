#!/usr/bin/env python
"""Data-parallel and fully sharded training on CPU processes: throughput of 1 vs 2 processes, and the worker
that proves the sharded path (train, sharded checkpoint, kill, exact resume, consolidation) without a GPU.

    python bench/bench_scale.py                       # bench: 1 vs 2 processes, DDP and FSDP2, as JSON rows
    python -m torch.distributed.run --nproc_per_node 2 bench/bench_scale.py worker --mode fsdp --out DIR ...

The worker trains the `debug` preset (layers as,hb,nm,d) on generated batches that are a pure function of
(step, rank), so an interrupted run can continue bit for bit. `--mode fsdp` shards it with
`vla.training.distributed.shard_policy` (FSDP2, gloo) and writes `step-<N>/` sharded checkpoints every
`--save-every` steps (atomically: a temporary folder renamed once every rank wrote its shards); `--kill-at N`
makes rank 0 SIGKILL the whole process group during step N+1, after step N's checkpoint is published. `--mode ddp`
trains the same model under DistributedDataParallel (no checkpoints). Both print one JSON line with the figures.

Communication share: the time the step's collectives take when run alone (DDP: one all-reduce of every gradient;
FSDP: two all-gathers of the weights, forward and backward, plus one reduce-scatter of the gradients), timed
after training with the same process group, divided by the measured step time. Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEP_PREFIX, TMP = "step-", ".tmp-"


def _config(args: argparse.Namespace):
    from vla.config import get_preset

    cfg = get_preset("debug")
    cfg.data.image_size = args.image_size
    cfg.data.batch_size = args.batch_size
    cfg.train.steps = args.steps
    cfg.train.lr = 1e-3
    cfg.train.warmup_steps = 1
    return cfg.validate()


def _newest(out: Path) -> Path | None:
    steps = sorted(p for p in out.glob(f"{STEP_PREFIX}*") if p.is_dir())
    return steps[-1] if steps else None


def worker(args: argparse.Namespace) -> dict:
    """One process of a `torch.distributed.run` launch (see the module docstring); returns its figures."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vla.data.embodiments import default_registry
    from vla.policy import VLAPolicy
    from vla.training.checkpoint import capture_rng, restore_rng
    from vla.training.distributed import load_sharded, shard_policy
    from vla.training.optim import make_optimizer, make_scheduler
    from vla.training.synthetic import synthetic_batch, synthetic_normalizer

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config(args)
    registry = default_registry()
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    policy = VLAPolicy(cfg, registry, synthetic_normalizer(cfg, registry))
    numel = sum(p.numel() for p in policy.parameters())
    if args.mode == "fsdp":
        units = shard_policy(policy)
        model = policy
    else:
        units = []
        model = DistributedDataParallel(policy, find_unused_parameters=True)
    optimizer = make_optimizer(policy, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    torch.manual_seed(args.seed + 1 + rank)  # each rank draws its own noise from here on

    out = Path(args.out)
    step = 0
    if args.resume and args.mode == "fsdp" and (ckpt := _newest(out)) is not None:
        meta = load_sharded(ckpt, policy, optimizer, scheduler)
        if meta["world_size"] != world:
            raise SystemExit(f"{ckpt} was written by {meta['world_size']} processes, this run has {world}")
        step = int(meta["step"])
        restore_rng(json.loads((ckpt / f"rank_{rank}.json").read_text()))

    model.train()
    times = []
    while step < args.steps:
        if args.kill_at and step == args.kill_at and rank == 0:
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the launcher and every rank, mid-run
        batch = synthetic_batch(cfg, registry, cfg.data.batch_size, seed=args.seed * 100003 + step * world + rank)
        t0 = time.perf_counter()
        losses = model(batch)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        times.append(time.perf_counter() - t0)
        step += 1
        if args.mode == "fsdp" and args.save_every and (step % args.save_every == 0 or step == args.steps):
            _save(out, step, policy, optimizer, scheduler, capture_rng(), rank)

    comm = _collective_seconds(numel, world, args.mode) if args.measure_comm and world > 1 else 0.0
    timed = times[args.warmup:] or times
    step_s = sum(timed) / max(len(timed), 1)
    figures = {"mode": args.mode, "world_size": world, "rank": rank, "steps": len(times), "units": len(units),
               "parameters": numel, "step_s": step_s, "samples_per_s": world * cfg.data.batch_size / step_s,
               "comm_s": comm, "comm_share": comm / step_s if step_s > 0 else 0.0,
               "loss": float(losses["loss"].detach()) if times else None}
    dist.barrier()
    dist.destroy_process_group()
    return figures


def _save(out: Path, step: int, policy, optimizer, scheduler, rng: dict, rank: int) -> Path:
    """A sharded checkpoint published atomically: every rank writes into a temporary folder, rank 0 renames it."""
    import torch.distributed as dist

    from vla.training.distributed import save_sharded

    final = out / f"{STEP_PREFIX}{step:06d}"
    tmp = out / f"{TMP}{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded(tmp, policy, optimizer, scheduler, {"step": step})
    (tmp / f"rank_{rank}.json").write_text(json.dumps(rng))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _collective_seconds(numel: int, world: int, mode: str, repeats: int = 5) -> float:
    """Seconds of one step's collectives alone over float32 buffers of the model's size (see the docstring)."""
    import torch
    import torch.distributed as dist

    full = torch.zeros(numel)
    shard = torch.zeros(-(-numel // world))
    gathered = torch.zeros(shard.numel() * world)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if mode == "fsdp":
            for _ in range(2):
                dist.all_gather_into_tensor(gathered, shard)
            dist.reduce_scatter_tensor(shard, gathered)
        else:
            dist.all_reduce(full)
    return (time.perf_counter() - t0) / repeats


def launch(nproc: int, worker_args: list[str], *, env: dict | None = None, timeout: float = 900) -> dict:
    """Run the worker under `torch.distributed.run` with `nproc` CPU processes; rank 0's figures."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "worker", *worker_args]
    run_env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return next(x for x in lines if x.get("rank") == 0)


def run(quick: bool) -> list[dict]:
    """bench/run.py entry: samples/s and communication share of 1 vs 2 CPU processes under DDP and FSDP2."""
    import tempfile

    steps = "6" if quick else "20"
    rows = []
    for mode in ("ddp", "fsdp"):
        figures = {}
        for nproc in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                figures[nproc] = launch(nproc, ["--mode", mode, "--steps", steps, "--save-every", "0", "--out", tmp,
                                                "--measure-comm"])
        one, two = figures[1], figures[2]
        rows.append({
            "benchmark": f"scale {mode} CPU",
            "metric": "samples/s, 2 processes / 1 process",
            "value": round(two["samples_per_s"] / one["samples_per_s"], 3),
            "goal": "report (2 cores shared with other work)",
            "met": True,
            "figures": {"samples_per_s_1": round(one["samples_per_s"], 2),
                        "samples_per_s_2": round(two["samples_per_s"], 2),
                        "step_s_1": round(one["step_s"], 4), "step_s_2": round(two["step_s"], 4),
                        "comm_share_2": round(two["comm_share"], 3), "parameters": one["parameters"],
                        "fsdp_units": two["units"]},
            "notes": f"debug preset (as,hb,nm,d), batch 4 per process, gloo, {steps} steps, OMP_NUM_THREADS=1",
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="one process of a torch.distributed.run launch")
    w.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
    w.add_argument("--out", required=True)
    w.add_argument("--steps", type=int, default=6)
    w.add_argument("--save-every", type=int, default=2)
    w.add_argument("--kill-at", type=int, default=0)
    w.add_argument("--resume", action="store_true")
    w.add_argument("--batch-size", type=int, default=4)
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    w.add_argument("--measure-comm", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "worker":
        print(json.dumps(worker(args)), flush=True)
    else:
        print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()

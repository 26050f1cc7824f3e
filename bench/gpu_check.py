#!/usr/bin/env python
"""One command for a borrowed CUDA machine: the large presets at their real size, trained in bf16 for a few steps.

    PYTHONPATH=. python bench/gpu_check.py                      # CUDA: `mode` and `himoe-paligemma`, full size
    PYTHONPATH=. python bench/gpu_check.py --budget-s 300       # stop starting new work after 5 minutes
    PYTHONPATH=. python bench/gpu_check.py --toy                # CPU: the same code at toy size (a test runs it)

For each preset it builds the policy with random weights (no download: the PaliGemma backbone comes from
`PaliGemmaConfig()`, the 3B layout, with a tokenizer trained in-process; `mode` uses its timm ResNet-50 with a
trained word embedding in place of MiniLM), trains `--steps` AdamW steps under bf16 autocast on generated batches
(`vla.training.synthetic`) and reports step time, samples/s, peak memory, model FLOPs utilisation (FLOPs of one
step counted by torch's FlopCounterMode, over the GPU's dense bf16 peak), and the expert-cache speed-up of the
action head's sampling at batch 1 and 64. With 2+ GPUs it repeats `himoe-paligemma` under DDP and FSDP2
(`vla.training.distributed.shard_policy`) through torch.distributed.run. It prints a JSON report (also written
to `--json`) and a markdown table.

It imports `vla` from the source tree and nothing of lerobot or the simulators, and runs with transformers 4.57
and 5.x, so a stock CUDA PyTorch environment (torch, transformers, accelerate, timm, einops, safetensors, peft,
diffusers) is enough.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FORBIDDEN = ("lerobot", "libero", "robosuite", "mujoco")
PRESETS = ("mode", "himoe-paligemma")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0, "B200": 2250.0, "GH200": 989.0}
"""Dense bf16 peak (TFLOP/s) by a substring of the device name; unknown devices report no MFU."""
WORDS = ("pick up the bowl and place it on the plate open the top drawer of the cabinet lift the red cube "
         "push the plate to the front of the stove put both boxes in the basket").split()


# ---- building -------------------------------------------------------------------------------------------------


def _gemma_tokenizer_class():
    """GemmaTokenizerFast (transformers 4.x); transformers 5 folded the fast class into GemmaTokenizer."""
    import transformers

    return getattr(transformers, "GemmaTokenizerFast", None) or transformers.GemmaTokenizer


def _tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return _gemma_tokenizer_class()(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def paligemma_files(out: Path, toy: bool) -> Path:
    """`out/backbone/` with a PaliGemma config (3B layout, or toy) and processor: what `checkpoint_dir` reads."""
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "image_token_index": image_token}
    if toy:
        size, patch = 32, 8
        config = PaliGemmaConfig(
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": size, "patch_size": patch,
                           "projection_dim": 32, "num_image_tokens": (size // patch) ** 2, "vision_use_head": False},
            text_config={"model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 32,
                         "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512},
            projection_dim=32, hidden_size=32, **ids)
    else:
        config = PaliGemmaConfig(**ids)  # SigLIP-So400m/14 at 224 px + Gemma-2B: PaliGemma-3B
        size, patch = config.vision_config.image_size, config.vision_config.patch_size
    image_processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    image_processor.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    target = out / "backbone"
    config.save_pretrained(target)
    processor.save_pretrained(target)
    return out


def preset_config(name: str, toy: bool, batch_size: int):
    from vla.config import get_preset

    cfg = get_preset(name)
    cfg.data.batch_size = batch_size
    cfg.train.ema_decay = 0.0
    if cfg.backbone.kind == "compact":
        cfg.backbone.text_model = "embedding"  # MiniLM needs its own wheel; the word embedding needs nothing
    if toy:
        a = cfg.action
        cfg.action = dataclasses.replace(a, width=32, num_heads=2, ffn_dim=64, expert_ffn_dim=0, hb_expert_ffn_dim=0,
                                         hb_num_experts=min(a.hb_num_experts, 4), hb_top_k=min(a.hb_top_k, 2),
                                         layers=",".join(a.layer_kinds[:: max(1, a.depth // 6)]))
        cfg.data.image_size = 32
        cfg.data.unified_action_dim = cfg.data.unified_state_dim = 16
        cfg.objective.num_inference_steps = 3
        if cfg.backbone.kind == "compact":
            cfg.backbone = dataclasses.replace(cfg.backbone, vision_model="resnet10t", width=32, tokens_per_image=4)
        else:
            cfg.backbone = dataclasses.replace(cfg.backbone, dtype="float32", gradient_checkpointing=False)
    return cfg.validate()


def build(name: str, toy: bool, batch_size: int, workdir: Path, device: torch.device):
    from vla.data.embodiments import default_registry
    from vla.policy import VLAPolicy
    from vla.training.synthetic import synthetic_normalizer

    cfg = preset_config(name, toy, batch_size)
    registry = default_registry()
    files = paligemma_files(workdir / name, toy) if cfg.backbone.kind == "hf_vlm" else None
    torch.manual_seed(0)
    policy = VLAPolicy(cfg, registry, synthetic_normalizer(cfg, registry), checkpoint_dir=files)
    return policy.to(device), cfg, registry


# ---- measuring ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def train_steps(model: torch.nn.Module, policy, cfg, registry, steps: int, device: torch.device,
                deadline: float) -> dict[str, Any]:
    """`steps` AdamW steps under bf16 autocast (the first one is warm-up, left out of the timing)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vla.training.optim import make_optimizer
    from vla.training.synthetic import synthetic_batch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    optimizer = make_optimizer(policy, cfg.train)
    batches = [synthetic_batch(cfg, registry, cfg.data.batch_size, seed=i * 101 + rank, device=device)
               for i in range(2)]
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(batch) -> torch.Tensor:
        with autocast:
            loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    counter = FlopCounterMode(display=False)
    with counter:
        loss = step(batches[0])
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        if times and time.monotonic() > deadline:
            break
        _sync(device)
        t0 = time.perf_counter()
        loss = step(batches[i % len(batches)])
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    peak = _peak_flops(device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"steps": len(times), "step_s": step_s, "samples_per_s": world * cfg.data.batch_size / step_s,
            "loss": float(loss.detach().float()), "peak_memory_gb": _peak_memory_gb(device),
            "flops_per_step": flops, "mfu": (flops / step_s / peak) if peak else None}


def cache_speedup(policy, cfg, registry, device: torch.device, batch: int, repeats: int, rounds: int = 2
                  ) -> dict[str, float]:
    """Action-head sampling time with the expert cache off / on, for one prefix of `batch` samples."""
    from vla.constants import ACTION_MASK, OBS_STATE, STATE_MASK
    from vla.training.synthetic import synthetic_batch

    policy.eval()
    data = synthetic_batch(cfg, registry, batch, seed=7, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        prefix = policy.encode(data)
        args = (prefix, data[OBS_STATE], data[STATE_MASK], data[ACTION_MASK])
        ms = {}
        for use in (False, True) * rounds:  # interleaved, the last round is the one kept
            policy.head.sample(*args, use_expert_cache=use)  # warm-up (and the cache's one-off fusion)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                policy.head.sample(*args, use_expert_cache=use)
            _sync(device)
            ms["cached" if use else "uncached"] = (time.perf_counter() - t0) / repeats * 1e3
    policy.train()
    return {"uncached_ms": ms["uncached"], "cached_ms": ms["cached"], "speedup": ms["uncached"] / ms["cached"]}


def check_preset(name: str, args: argparse.Namespace, device: torch.device, workdir: Path, deadline: float,
                 parallel: str = "none") -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    policy, cfg, registry = build(name, args.toy, args.batch_size, workdir, device)
    model = policy
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    elif parallel == "fsdp":
        from vla.training.distributed import shard_policy

        shard_policy(policy, mixed_precision=torch.bfloat16)
    result = {"preset": name, "parallel": parallel, "device": _device_name(device),
              "parameters": sum(p.numel() for p in policy.parameters()), "build_s": time.perf_counter() - t0,
              "batch_size": cfg.data.batch_size}
    result.update(train_steps(model, policy, cfg, registry, args.steps, device, deadline))
    if parallel == "none":
        repeats = 1 if args.toy else 5
        result["expert_cache_speedup"] = {str(b): cache_speedup(policy, cfg, registry, device, b, repeats,
                                                                rounds=1 if args.toy else 2) for b in (1, 64)}
    del model, policy
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def distributed_worker(args: argparse.Namespace) -> None:
    """One rank of the DDP/FSDP repeat (launched by `main` through torch.distributed.run)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    with tempfile.TemporaryDirectory() as tmp:
        result = check_preset(args.distributed_preset, args, device, Path(tmp), time.monotonic() + args.budget_s,
                              parallel=args.parallel)
    if dist.get_rank() == 0:
        Path(args.json).write_text(json.dumps(result))
    dist.destroy_process_group()


def repeat_distributed(args: argparse.Namespace, parallel: str, gpus: int, budget_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(Path(__file__).resolve()), "--worker", "--parallel", parallel, "--distributed-preset",
               "himoe-paligemma", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--budget-s", str(budget_s), "--json", str(out)] + (["--toy"] if args.toy else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=budget_s + 300)
        if proc.returncode != 0:
            return {"preset": "himoe-paligemma", "parallel": parallel, "error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


# ---- report ---------------------------------------------------------------------------------------------------


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| preset | parallel | device | params (M) | step (s) | samples/s | peak mem (GiB) | MFU | "
             "cache x b1 | cache x b64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['parallel']} | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        cache = r.get("expert_cache_speedup", {})
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        lines.append(
            f"| {r['preset']} | {r['parallel']} | {r['device']} | {r['parameters'] / 1e6:.1f} | {r['step_s']:.3f} | "
            f"{r['samples_per_s']:.1f} | {r['peak_memory_gb']:.2f} | {mfu} | "
            f"{cache.get('1', {}).get('speedup', float('nan')):.2f} | "
            f"{cache.get('64', {}).get('speedup', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="toy sizes (CPU): the same code path in seconds")
    parser.add_argument("--steps", type=int, default=10, help="timed bf16 training steps per preset")
    parser.add_argument("--batch-size", type=int, default=0, help="samples per step (default 2 toy, 16 full)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget: no new step or run starts after it (default fits 10 minutes)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--no-distributed", action="store_true", help="skip the DDP/FSDP repeat on 2+ GPUs")
    parser.add_argument("--json", default="", help="also write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--distributed-preset", default="himoe-paligemma", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.toy else 16)
    if args.worker:
        distributed_worker(args)
        return 0

    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cuda") if torch.cuda.is_available() and not args.toy else torch.device("cpu")
    if device.type == "cpu" and not args.toy:
        print("gpu_check: no CUDA device; running --toy sizes on the CPU", file=sys.stderr)
        args.toy = True
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
            if runs and time.monotonic() > deadline:
                runs.append({"preset": name, "parallel": "none", "error": "skipped: --budget-s reached"})
                continue
            try:
                runs.append(check_preset(name, args, device, Path(tmp), deadline))
            except torch.cuda.OutOfMemoryError as e:
                runs.append({"preset": name, "parallel": "none", "error": f"out of memory: {e}"})
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2 and not args.no_distributed:
        for parallel in ("ddp", "fsdp"):
            left = deadline - time.monotonic()
            if left <= 30:
                runs.append({"preset": "himoe-paligemma", "parallel": parallel, "error": "skipped: --budget-s reached"})
                continue
            runs.append(repeat_distributed(args, parallel, gpus, left))
    report = {"torch": torch.__version__, "transformers": _version("transformers"), "device": _device_name(device),
              "gpus": gpus, "toy": args.toy, "wall_s": time.monotonic() - start, "runs": runs,
              "imported_forbidden": sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))}
    text = json.dumps(report, indent=1)
    print(text)
    print(markdown(runs))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if any("error" in r and not r["error"].startswith("skipped") for r in runs) else 0


def _version(name: str) -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(name)
    return "?"


if __name__ == "__main__":
    sys.exit(main())

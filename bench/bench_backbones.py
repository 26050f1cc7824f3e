"""Compact backbone on this CPU: which timm encoder is fast enough, and does it still learn?

Three measurements, side by side in one run (two cameras, the `tiny-cpu` prefix width and token count):
1. speed: ms per forward at batch 1 (inference: one chunk needs one backbone pass) and ms per forward+backward
   at batch 32 (one training step's backbone share), for several timm encoders, at 128 px and (full run) 96 px;
   channels-last vs the default memory format for the preset's encoder.
2. text cache: frozen MiniLM instruction features, uncached vs cached, for a batch of 32 instructions.
3. learning probe: each encoder + an MLP read-out of its image tokens trained from scratch for a fixed number of
   steps on a synthetic two-camera localisation task (where is the red square, with a blue distractor, on a plain
   table): held-out error relative to predicting the mean (1.0 = learned nothing). Same steps, same data, same
   seed for every encoder.

    .venv/bin/python bench/run.py --only backbones [--quick]
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from vla.backbones import make_backbone
from vla.config import BackboneConfig, get_preset

CAMERAS = ("base", "wrist")
CANDIDATES = ("resnet18", "resnet10t", "regnetx_002", "regnety_002", "lcnet_100", "mobilenetv4_conv_small")
INFERENCE_BUDGET_MS = 25.0
"""Half of the 50 ms a chunk may take at the issue's goal of 20 chunks/s: the action head needs the other half."""


def _min_ms(fn, reps: int) -> float:
    """Least CPU time of `reps` calls, in ms, after one warm-up call.

    CPU time of this process (`time.process_time`, all its threads) rather than wall time: the machine is shared,
    and another job's load stretches wall time but not the work done here. With one thread and an idle core the
    two agree.
    """
    fn()  # warm-up (allocations, oneDNN kernel selection)
    best = math.inf
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def _backbone(cfg: BackboneConfig, size: int):
    torch.manual_seed(0)
    return make_backbone(cfg, CAMERAS, size)


def _speed(cfg: BackboneConfig, size: int, reps: int) -> dict:
    bb = _backbone(cfg, size)
    mask1, mask32 = torch.ones(1, 2, dtype=torch.bool), torch.ones(32, 2, dtype=torch.bool)
    x1, x32 = torch.rand(1, 2, 3, size, size), torch.rand(32, 2, 3, size, size)
    tasks1, tasks32 = ["pick up the bowl"], ["pick up the bowl"] * 32
    bb.eval()
    with torch.no_grad():
        fwd1 = _min_ms(lambda: bb(x1, mask1, tasks1), reps * 5)
    bb.train()

    def step():
        bb.zero_grad(set_to_none=True)
        bb(x32, mask32, tasks32).tokens.square().mean().backward()

    train32 = _min_ms(step, reps)
    params = sum(p.numel() for p in bb.vision.parameters()) / 1e6
    return {"b1_forward_ms": fwd1, "b32_fwd_bwd_ms": train32, "vision_params_M": params}


# ---- learning probe --------------------------------------------------------------------------------------------


def _scene(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n two-camera scenes: a red square at a random place (target, in [-1, 1]^2) and a blue distractor.

    The base camera sees the table from above; the wrist camera sees it mirrored and shifted, so the encoder must
    read both views, not memorise one pixel layout.
    """
    table = torch.rand(n, 2, 3, 1, 1, generator=gen) * 0.3 + 0.35  # a plain table of a random colour
    images = table + 0.03 * torch.randn(n, 2, 3, size, size, generator=gen)
    target = torch.rand(n, 2, generator=gen) * 1.6 - 0.8
    distractor = torch.rand(n, 2, generator=gen) * 1.6 - 0.8
    half = max(2, size // 16)
    for cam in range(2):
        for pos, colour in ((distractor, (0.1, 0.2, 0.9)), (target, (0.9, 0.1, 0.1))):
            xy = pos if cam == 0 else torch.stack([-pos[:, 0], pos[:, 1] * 0.8 + 0.1], dim=1)
            px = ((xy + 1) / 2 * (size - 1)).round().long()
            for i in range(n):
                x, y = px[i].tolist()
                images[i, cam, :, max(0, y - half): y + half, max(0, x - half): x + half] = torch.tensor(
                    colour)[:, None, None]
    return images.clamp(0, 1), target


class _Readout(nn.Module):
    """An MLP on the flattened image tokens: measures what the encoder's tokens hold about where things are.

    (A single learned attention query, the action transformer's way of reading, learned nothing in 200 steps with
    any encoder here: learning where to attend comes later than learning what the tokens say.)
    """

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(num_tokens * width, 256), nn.GELU(), nn.Linear(256, 2))

    def forward(self, prefix) -> torch.Tensor:
        return self.mlp(prefix.tokens[:, : self.num_tokens])


def _probe(cfg: BackboneConfig, size: int, steps: int, batch: int) -> dict:
    bb = _backbone(cfg, size)
    head = _Readout(len(CAMERAS) * cfg.tokens_per_image, cfg.width)
    opt = torch.optim.AdamW([*bb.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    val_x, val_y = _scene(64, size, torch.Generator().manual_seed(1))
    tasks = ["locate the red square"]
    start = time.process_time()
    bb.train()
    for _ in range(steps):
        x, y = _scene(batch, size, gen)
        prefix = bb(x, torch.ones(batch, 2, dtype=torch.bool), tasks * batch)
        loss = nn.functional.mse_loss(head(prefix), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.process_time() - start
    bb.eval()
    with torch.no_grad():
        pred = head(bb(val_x, torch.ones(64, 2, dtype=torch.bool), tasks * 64))
    rel = (nn.functional.mse_loss(pred, val_y) / val_y.var(0, unbiased=False).mean()).item()
    return {"relative_error": rel, "train_seconds": seconds}


def run(quick: bool = False) -> list[dict]:
    base = dataclasses.replace(get_preset("tiny-cpu").backbone, text_model="embedding")
    threads = torch.get_num_threads()
    # quick: the preset's encoder and the previous default only (resnet18 alone costs minutes on a busy machine)
    candidates = tuple(dict.fromkeys((base.vision_model, "resnet10t"))) if quick else CANDIDATES
    sizes = (128,) if quick else (128, 96)
    reps = 1 if quick else 2
    results: list[dict] = []

    speeds: dict[tuple[str, int], dict] = {}
    for size in sizes:
        for name in candidates:
            speeds[name, size] = s = _speed(dataclasses.replace(base, vision_model=name), size, reps)
            results.append({
                "benchmark": f"compact backbone {name} @ {size}px",
                "metric": "ms per forward, batch 1, 2 cameras",
                "value": round(s["b1_forward_ms"], 1),
                "goal": f"<= {INFERENCE_BUDGET_MS:g}",
                "met": s["b1_forward_ms"] <= INFERENCE_BUDGET_MS,
                "figures": {k: round(v, 2) for k, v in s.items()},
                "notes": f"CPU ms, {threads} thread(s); b32 = forward+backward at batch 32 (64 images)",
            })

    default = base.vision_model
    plain = _speed(dataclasses.replace(base, channels_last=False), 128, reps)
    results.append({
        "benchmark": f"channels_last {default} @ 128px",
        "metric": "train step speed-up (default / channels_last, b32 fwd+bwd)",
        "value": round(plain["b32_fwd_bwd_ms"] / speeds[default, 128]["b32_fwd_bwd_ms"], 2),
        "goal": ">= 1",
        "met": plain["b32_fwd_bwd_ms"] >= speeds[default, 128]["b32_fwd_bwd_ms"],
        "figures": {"default_b32_ms": round(plain["b32_fwd_bwd_ms"], 1),
                    "channels_last_b32_ms": round(speeds[default, 128]["b32_fwd_bwd_ms"], 1),
                    "default_b1_ms": round(plain["b1_forward_ms"], 1),
                    "channels_last_b1_ms": round(speeds[default, 128]["b1_forward_ms"], 1)},
        "notes": "same encoder, same inputs, measured back to back",
    })

    bb = _backbone(dataclasses.replace(base, text_model="minilm"), 128)
    tasks = [f"pick up object {i} and place it in the basket" for i in range(32)]

    def uncached():
        bb.text._cache.clear()
        bb.text(tasks)

    cold = _min_ms(uncached, reps * 2)
    warm = _min_ms(lambda: bb.text(tasks), reps * 10)
    results.append({
        "benchmark": "MiniLM instruction cache",
        "metric": "uncached / cached ms, 32 instructions",
        "value": round(cold / warm, 1),
        "goal": "",
        "met": None,
        "figures": {"uncached_ms": round(cold, 2), "cached_ms": round(warm, 3)},
        "notes": "cached = projection of stored frozen features only; no goal: a lookup of stored features is "
                 "cheaper than a transformer forward by construction, the ratio only says by how much",
    })

    steps, batch = (30, 8) if quick else (200, 8)
    for name in candidates:
        p = _probe(dataclasses.replace(base, vision_model=name), 128, steps, batch)
        results.append({
            "benchmark": f"learning probe {name} @ 128px",
            "metric": f"held-out error / variance after {steps} steps (batch {batch})",
            "value": round(p["relative_error"], 3),
            "goal": "< 0.5",
            "met": p["relative_error"] < 0.5,
            "figures": {"train_cpu_seconds": round(p["train_seconds"], 1),
                        "b32_fwd_bwd_ms": round(speeds[name, 128]["b32_fwd_bwd_ms"], 1)},
            "notes": "synthetic 2-camera localisation with a distractor; 1.0 = predicts the mean; CPU seconds",
        })
    return results

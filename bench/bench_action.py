"""Action head costs, measured side by side in one run (2 torch threads unless VLA_BENCH_THREADS says otherwise).

1. Expert cache at the MoDE shape (width 1024, expert FFN 4096, 12 `nm` layers, 4 experts top-2, EDM + DPM-Solver
   10 steps, chunk 10, batch 1, 40 prefix tokens): the full denoising loop with the cache vs the module's own
   general routed forward (which computes only the selected experts), and vs a dense head of equal ACTIVE
   parameters (12 `d` layers with FFN 2 x 4096).
2. Train step (forward + backward + AdamW) of the HiMoE pattern (as x2, hb x4, d x6, hb x4, as x2; 32 hb experts
   top-4 + 1 shared at 1/5 of the FFN width, 3 as experts top-1 at full width) vs the same depth all dense: every
   layer has the same active FFN width.
3. Mixture of Horizons train-step overhead vs a single horizon of the same chunk: the action head alone, and the
   whole tiny-cpu policy step (compact backbone + head); at the preset's chunk 10 (horizons 3,6,10) and at the
   advertised chunk 20 (horizons 5,10,15,20), the latter also against the unchanged chunk-10 preset.

Timings alternate between the variants and report medians, so a load spike on the shared machine hits all of
them alike.

    .venv/bin/python bench/run.py --only action [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from vla.action import ActionHead
from vla.backbones.prefix import Prefix
from vla.config import ActionConfig, HorizonConfig, ObjectiveConfig, get_preset

A = S = 24  # unified action / state dims
THREADS = int(os.environ.get("VLA_BENCH_THREADS", "2"))
"""torch threads while timing. On a machine shared with other jobs, 2 threads turn every parallel op into a wait
for a second time slice (10-20 ms even for a tiny layer norm); VLA_BENCH_THREADS=1 measures the arithmetic."""


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, block: int = 1
                   ) -> dict[str, float]:
    """Median wall time (ms) of each function, measured in alternation: `repeats` turns, each calling every
    function `block` times in a row (block > 1 measures back-to-back calls, as a control loop makes them, while
    machine drift still hits every function alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def inputs(b: int, p: int, prefix_width: int, chunk: int, layers: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, A, dtype=torch.bool)
    mask[:, :7] = True
    return {
        "prefix": Prefix(torch.randn(b, p, prefix_width, generator=g), torch.ones(b, p, dtype=torch.bool),
                         [torch.randn(b, p, prefix_width, generator=g) for _ in range(layers)] if layers else None),
        "state": torch.randn(b, S, generator=g),
        "state_mask": mask.clone(),
        "action_mask": mask,
        "actions": torch.randn(b, chunk, A, generator=g) * mask[:, None],
        "action_is_pad": torch.zeros(b, chunk, dtype=torch.bool),
        "noise": torch.randn(b, chunk, A, generator=g),
    }


def make_head(cfg: ActionConfig, objective: ObjectiveConfig, prefix_width: int, prefix_layers: int | None = None
              ) -> ActionHead:
    torch.manual_seed(0)
    return ActionHead(cfg, objective, prefix_width=prefix_width, prefix_layers=prefix_layers, action_dim=A,
                      state_dim=S)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- 1. expert cache ---------------------------------------------------------------------------------------------


def bench_expert_cache(quick: bool) -> list[dict]:
    mode = get_preset("mode")
    width, expert, depth, repeats = (256, 1024, 4, 3) if quick else (1024, 4096, 12, 5)
    moe_cfg = dataclasses.replace(mode.action, width=width, ffn_dim=expert, expert_ffn_dim=expert,
                                  layers=",".join(["nm"] * depth), track_routing=False)
    active = moe_cfg.nm_top_k * expert
    dense_cfg = dataclasses.replace(moe_cfg, layers=",".join(["d"] * depth), ffn_dim=active)
    objective = mode.objective  # EDM, DPM-Solver, 10 steps
    x = inputs(1, 40, width, moe_cfg.chunk_size)
    args = (x["prefix"], x["state"], x["state_mask"], x["action_mask"])

    moe = make_head(moe_cfg, objective, width).eval()
    dense = make_head(dense_cfg, objective, width).eval()
    dense_loop = {"dense": lambda: dense.sample(*args, noise=x["noise"])}
    timings, figures = _time_moe_sampling(moe, x, repeats, extra=dense_loop)
    figures["dense_params_M"] = round(param_count(dense) / 1e6, 1)

    shape = (f"width {width}, expert FFN {expert}, {depth} nm layers, 4 experts top-2, EDM DPM-Solver "
             f"{objective.num_inference_steps} steps, chunk {moe_cfg.chunk_size}, batch 1, 40 prefix tokens")
    figures = {"uncached_ms": round(timings["uncached"], 1), "cached_ms": round(timings["cached"], 1),
               "dense_active_ms": round(timings["dense"], 1), **figures}
    speedup = timings["uncached"] / timings["cached"]
    vs_dense = timings["cached"] / timings["dense"]
    note = ("batch 1 is weight-bandwidth bound: both paths stream the same 2 active experts per layer, so the "
            "cache only removes router + sort/gather overhead and attention is untouched" if speedup < 2 else "")
    return [
        {"benchmark": "expert cache", "metric": "uncached / cached denoising loop", "value": round(speedup, 3),
         "goal": ">= 2", "met": speedup >= 2, "figures": figures, "notes": f"{shape}. {note}".strip()},
        {"benchmark": "expert cache", "metric": "cached / dense head of equal active params",
         "value": round(vs_dense, 3), "goal": "<= 1.1", "met": vs_dense <= 1.1, "figures": figures, "notes": shape},
    ]


def bench_expert_cache_tiny(quick: bool) -> list[dict]:
    """The same comparison for the tiny-cpu head (as + nm layers), where per-op overhead, not weight bandwidth,
    dominates a batch-1 forward."""
    tiny = get_preset("tiny-cpu")
    cfg = dataclasses.replace(tiny.action, track_routing=False)
    x = inputs(1, 2 * tiny.backbone.tokens_per_image + 16, tiny.backbone.width, cfg.chunk_size)
    timings, figures = _time_moe_sampling(make_head(cfg, tiny.objective, tiny.backbone.width).eval(), x,
                                          3 if quick else 15)
    speedup = timings["uncached"] / timings["cached"]
    return [{"benchmark": "expert cache", "metric": "uncached / cached denoising loop (tiny-cpu head)",
             "value": round(speedup, 3), "goal": ">= 2", "met": speedup >= 2,
             "figures": {"uncached_ms": round(timings["uncached"], 1), "cached_ms": round(timings["cached"], 1),
                         **figures},
             "notes": f"layers {cfg.layers}, width {cfg.width}, flow Euler {tiny.objective.num_inference_steps} "
                      f"steps, batch 1"}]


def _time_moe_sampling(moe: ActionHead, x: dict, repeats: int, extra: dict | None = None
                       ) -> tuple[dict[str, float], dict]:
    """Median sampling times of the routed path, the cached path (and `extra` variants), in alternation."""
    args = (x["prefix"], x["state"], x["state_mask"], x["action_mask"])
    timings = interleaved_ms({
        "uncached": lambda: moe.sample(*args, noise=x["noise"], use_expert_cache=False),
        "cached": lambda: moe.sample(*args, noise=x["noise"], use_expert_cache=True),
        **(extra or {}),
    }, repeats)
    exact = (moe.sample(*args, noise=x["noise"], use_expert_cache=True).actions
             - moe.sample(*args, noise=x["noise"], use_expert_cache=False).actions).abs().max().item()
    return timings, {"max_abs_diff": exact, "cache_entries": len(moe.expert_cache),
                     "moe_params_M": round(param_count(moe) / 1e6, 1)}


# ---- 2. HiMoE train step -----------------------------------------------------------------------------------------


def train_step(head: ActionHead, x: dict, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        losses = head.compute_loss(x["prefix"], x["state"], x["state_mask"], x["actions"], x["action_mask"],
                                   x["action_is_pad"])
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()

    return step


def bench_himoe_train_step(quick: bool) -> list[dict]:
    himoe = get_preset("himoe-paligemma")
    width, ffn, batch, repeats = (256, 1280, 2, 3) if quick else (512, 2560, 16, 7)
    hb_expert = ffn // (himoe.action.hb_top_k + himoe.action.hb_num_shared)
    moe_cfg = dataclasses.replace(himoe.action, width=width, num_heads=8, ffn_dim=ffn, expert_ffn_dim=ffn,
                                  hb_expert_ffn_dim=hb_expert, track_routing=False)
    dense_cfg = dataclasses.replace(moe_cfg, layers=",".join(["d"] * moe_cfg.depth))
    x = inputs(batch, 40, width, moe_cfg.chunk_size, layers=6)
    heads = {"himoe": make_head(moe_cfg, himoe.objective, width, 6).train(),
             "dense": make_head(dense_cfg, himoe.objective, width, 6).train()}
    opts = {k: torch.optim.AdamW(h.parameters(), lr=1e-4, foreach=True) for k, h in heads.items()}
    timings = interleaved_ms({k: train_step(h, x, opts[k]) for k, h in heads.items()}, repeats,
                             warmup=1 if quick else 2)
    forward_backward = interleaved_ms({
        k: (lambda h=h: h.compute_loss(x["prefix"], x["state"], x["state_mask"], x["actions"], x["action_mask"],
                                       x["action_is_pad"])["loss"].backward())
        for k, h in heads.items()}, repeats)
    ratio = timings["himoe"] / timings["dense"]
    figures = {"himoe_step_ms": round(timings["himoe"], 1), "dense_step_ms": round(timings["dense"], 1),
               "himoe_fwd_bwd_ms": round(forward_backward["himoe"], 1),
               "dense_fwd_bwd_ms": round(forward_backward["dense"], 1),
               "himoe_params_M": round(param_count(heads["himoe"]) / 1e6, 1),
               "dense_params_M": round(param_count(heads["dense"]) / 1e6, 1)}
    return [{"benchmark": "HiMoE train step", "metric": "HiMoE pattern / dense of equal active width",
             "value": round(ratio, 3), "goal": "paper: 1.07", "met": None, "figures": figures,
             "notes": f"18 layers, width {width}, active FFN {ffn} per layer (hb: 4 x {hb_expert} + 1 shared), "
                      f"batch {batch}, chunk 10, 40 prefix tokens (layerwise); step = fwd + bwd + AdamW, whose "
                      f"cost grows with the total (not active) parameters"}]


# ---- 3. Mixture of Horizons overhead -----------------------------------------------------------------------------


MOH_SETUPS = ((10, (3, 6, 10)), (20, (5, 10, 15, 20)))
"""(chunk, horizons) measured: the preset's chunk read at three horizons, and the configuration the README and the
`moh` learning arm advertise (chunk 20 at horizons 5,10,15,20), whose extra cost is larger."""


def moh_label(chunk: int, horizons: tuple[int, ...]) -> str:
    """The benchmark name of one setup; the chunk-10 setup keeps the name its earlier rows were recorded under."""
    if (chunk, horizons) == MOH_SETUPS[0]:
        return "Mixture of Horizons"
    return f"Mixture of Horizons, chunk {chunk} at horizons {','.join(map(str, horizons))}"


def bench_moh_overhead(quick: bool, chunk: int = 10, horizons: tuple[int, ...] = (3, 6, 10)) -> list[dict]:
    tiny = get_preset("tiny-cpu")
    batch, repeats = (8, 3) if quick else (32, 7)
    single_cfg = dataclasses.replace(tiny.action, chunk_size=chunk, track_routing=False)
    moh_cfg = dataclasses.replace(single_cfg, moh=HorizonConfig(horizons=horizons))
    width = tiny.backbone.width
    x = inputs(batch, 2 * tiny.backbone.tokens_per_image + 16, width, chunk)
    heads = {"single": make_head(single_cfg, tiny.objective, width).train(),
             "moh": make_head(moh_cfg, tiny.objective, width).train()}
    opts = {k: torch.optim.AdamW(h.parameters(), lr=1e-4, foreach=True) for k, h in heads.items()}
    timings = interleaved_ms({k: train_step(h, x, opts[k]) for k, h in heads.items()}, repeats,
                             warmup=1 if quick else 2)
    head_ratio = timings["moh"] / timings["single"] - 1
    tokens = (2 + chunk, 2 + sum(horizons))
    results = [{
        "benchmark": moh_label(chunk, horizons),
        "metric": "train-step overhead vs single horizon (action head only)",
        "value": round(head_ratio, 3), "goal": "<= 0.15", "met": head_ratio <= 0.15,
        "figures": {"single_ms": round(timings["single"], 1), "moh_ms": round(timings["moh"], 1),
                    "own_tokens_single": tokens[0], "own_tokens_moh": tokens[1]},
        "notes": f"tiny-cpu head, chunk {chunk}, horizons {horizons}, batch {batch}: {tokens[1]} instead of "
                 f"{tokens[0]} own tokens in one pass; the {x['prefix'].tokens.shape[1]} prefix tokens are projected "
                 "once for all",
    }]
    results.append(_policy_moh_overhead(quick, chunk, horizons))
    return results


def _policy_moh_overhead(quick: bool, chunk: int, horizons: tuple[int, ...]) -> dict:
    """The same comparison for a whole tiny-cpu policy train step (backbone forward/backward included). When the
    chunk is not the preset's, the preset itself is timed in the same turns (`preset_ms`): what a user pays for
    switching the preset to this Mixture-of-Horizons configuration."""
    from vla import constants as K
    from vla.policy import VLAPolicy

    batch, repeats = (2, 2) if quick else (32, 5)
    cfg = get_preset("tiny-cpu")
    cfg.action.track_routing = False
    size, cams = cfg.data.image_size, cfg.data.cameras
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, A, dtype=torch.bool)
    mask[:, :7] = True
    data = {K.image_key(c): torch.rand(batch, 3, size, size, generator=g) for c in cams}
    data |= {K.OBS_IMAGE_MASK: torch.ones(batch, len(cams), dtype=torch.bool),
             K.TASK: ["put the bowl on the plate"] * batch,
             K.OBS_STATE: torch.randn(batch, S, generator=g), K.STATE_MASK: mask.clone(), K.ACTION_MASK: mask}
    actions = torch.randn(batch, max(chunk, cfg.action.chunk_size), A, generator=g) * mask[:, None]
    variants = [("single", chunk, ()), ("moh", chunk, horizons)]
    if chunk != cfg.action.chunk_size:
        variants.append(("preset", cfg.action.chunk_size, ()))
    steps = {}
    for name, c_len, hs in variants:
        c = dataclasses.replace(cfg, action=dataclasses.replace(cfg.action, chunk_size=c_len,
                                                                moh=HorizonConfig(horizons=hs)))
        torch.manual_seed(0)
        policy = VLAPolicy(c).train()
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4, foreach=True)
        batch_c = {**data, K.ACTION: actions[:, :c_len], K.ACTION_IS_PAD: torch.zeros(batch, c_len, dtype=torch.bool)}

        def step(policy=policy, opt=opt, batch_c=batch_c) -> None:
            loss = policy(batch_c)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    timings = interleaved_ms(steps, repeats)
    ratio = timings["moh"] / timings["single"] - 1
    figures = {"single_ms": round(timings["single"], 1), "moh_ms": round(timings["moh"], 1)}
    notes = f"tiny-cpu policy (compact backbone, 2 x {size} px cameras), chunk {chunk}, horizons {horizons}, batch {batch}"
    if "preset" in timings:
        figures |= {"preset_chunk10_ms": round(timings["preset"], 1),
                    "moh_over_preset": round(timings["moh"] / timings["preset"] - 1, 3)}
        notes += f"; preset_chunk10_ms: the unchanged preset (chunk {cfg.action.chunk_size}, one horizon) in the same turns"
    return {"benchmark": moh_label(chunk, horizons), "metric": "train-step overhead vs single horizon (whole policy)",
            "value": round(ratio, 3), "goal": "<= 0.15", "met": ratio <= 0.15, "figures": figures, "notes": notes}


def run(quick: bool) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        moh = [row for chunk, horizons in MOH_SETUPS for row in bench_moh_overhead(quick, chunk, horizons)]
        return bench_expert_cache(quick) + bench_expert_cache_tiny(quick) + bench_himoe_train_step(quick) + moh
    finally:
        torch.set_num_threads(threads)

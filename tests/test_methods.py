"""Reference-faithful recipes: each formula of the HiMoE, MoDE and Mixture-of-Horizons options pinned against a value
computed by hand (explicit loops or closed-form numbers on small tensors), never against vla's own code; the
expert cache stays exact for every option that keeps routing token-independent; the presets select the reference
options and their docstrings say which recipe they follow."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_action import PW, A, S, loss_args, make_batch, sample_args

from vla.action import ActionHead
from vla.action.horizons import MixtureOfHorizons, relative_execute
from vla.action.moe import Router, SampleRoutedMoE, action_space_token_loss, selected_balance_loss
from vla.action.objectives import EDMDiffusion
from vla.config import PRESETS, ActionConfig, ConfigError, HorizonConfig, ObjectiveConfig, VLAConfig, get_preset

REPO = Path(__file__).resolve().parents[1]


def head(layers: str, objective: ObjectiveConfig | None = None, chunk: int = 4, **over) -> ActionHead:
    torch.manual_seed(0)
    cfg = ActionConfig(**({"chunk_size": chunk, "n_action_steps": 2, "width": 32, "num_heads": 2, "ffn_dim": 64,
                           "layers": layers, "hb_num_experts": 4, "hb_top_k": 2} | over))
    return ActionHead(cfg, objective or ObjectiveConfig(num_inference_steps=4), prefix_width=PW, prefix_layers=None,
                      action_dim=A, state_dim=S)


def records_of(model: ActionHead, batch: dict, **kw) -> tuple[dict, list]:
    """compute_loss and the router records of its forward."""
    seen = []
    forward = model.transformer.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out.records)
        return out

    model.transformer.forward = spy
    try:
        losses = model.compute_loss(*loss_args(batch), **kw)
    finally:
        del model.transformer.forward
    return losses, seen[0]


def switch_by_hand(probs: torch.Tensor, index: torch.Tensor, groups: int) -> float:
    """E * sum_e f_e P_e per group (f: fraction of the group's assignments, P: mean probability), group mean."""
    n, e = probs.shape
    rows = n // groups
    total = 0.0
    for g in range(groups):
        p = probs[g * rows:(g + 1) * rows].double()
        idx = index[g * rows:(g + 1) * rows]
        counts = [0] * e
        for row in idx.tolist():
            for j in row:
                counts[j] += 1
        f = [c / (rows * idx.shape[1]) for c in counts]
        total += e * sum(f[j] * float(p[:, j].mean()) for j in range(e))
    return total / groups


# ---- 1. HiMoE: regularisers summed over layers, MoDE balance averaged ------------------------------------------


def test_himoe_reference_sums_hb_and_as_losses_over_layers_and_mode_averages_its_balance():
    model = head("as,as,hb,hb,nm,nm", loss_layer_reduction="reference")
    batch = make_batch(b=6, h=4)
    losses, records = records_of(model, batch)
    hb = [switch_by_hand(r.routing.probs.detach(), r.routing.index, 6) for r in records if r.kind == "hb"]
    nm = [switch_by_hand(r.routing.probs.detach(), r.routing.index, 1) for r in records if r.kind == "nm"]
    assert len(hb) == 2 and len(nm) == 2
    assert float(losses["hb_balance"]) == pytest.approx(hb[0] + hb[1], rel=1e-5)  # HiMoE: one term per layer
    assert float(losses["nm_balance"]) == pytest.approx((nm[0] + nm[1]) / 2, rel=1e-5)  # MoDE: layer mean

    mean = head("as,as,hb,hb,nm,nm")  # today's reduction, the default: every kind averaged
    mean_losses, _ = records_of(mean, batch)
    assert float(mean_losses["hb_balance"]) == pytest.approx((hb[0] + hb[1]) / 2, rel=1e-5)
    assert float(mean_losses["as_reg"]) == pytest.approx(float(losses["as_reg"]) / 2, rel=1e-5)
    cfg = model.cfg
    expected = (losses["action_loss"] + cfg.hb_balance_weight * losses["hb_balance"]
                + cfg.nm_balance_weight * losses["nm_balance"] + cfg.as_reg_weight * losses["as_reg"])
    torch.testing.assert_close(losses["loss"], expected)


def test_token_level_as_reg_equals_the_reference_infonce_over_every_token():
    torch.manual_seed(0)
    b, t, e, tau = 5, 3, 3, 0.1
    probs = torch.rand(b, e).softmax(-1)
    descriptor = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    # by hand: expand to B*T tokens and apply the reference formula literally
    tok_p = probs.repeat_interleave(t, 0)
    tok_d = descriptor.repeat_interleave(t, 0)
    n = b * t
    losses = []
    for i in range(n):
        num = den = 0.0
        for j in range(n):
            s = math.exp(float(F.cosine_similarity(tok_p[i], tok_p[j], dim=0)) / tau)
            den += s
            if j != i and bool((tok_d[i] == tok_d[j]).all()):
                num += s
        losses.append(-math.log(num / (den + 1e-8) + 1e-8))
    expected = sum(losses) / n
    assert float(action_space_token_loss(probs, descriptor, tau, tokens=t)) == pytest.approx(expected, rel=1e-5)


def test_himoe_token_as_reg_counts_the_layer_tokens():
    model = head("as,d", as_reg_form="token", loss_layer_reduction="reference")
    batch = make_batch(b=6, h=4)
    losses, records = records_of(model, batch)
    (rec,) = records
    assert rec.tokens == 2 + 4  # state, noise and 4 action tokens
    expected = float(action_space_token_loss(rec.routing.probs, batch["action_mask"].float(), 0.1, rec.tokens))
    assert float(losses["as_reg"]) == pytest.approx(expected, rel=1e-6)


# ---- 2. MoDE: router, multinomial selection, load balance, noise embedding, shift, sigma density, DDIM ---------


def test_mode_selected_balance_by_hand():
    index = torch.tensor([[0, 1], [0, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    # P = [0.65, 0.2, 0.15, 0], f = [1, 0.5, 0.5, 0]  ->  4 * (0.65 + 0.1 + 0.075) = 3.3
    assert float(selected_balance_loss(weights, index, 4)) == pytest.approx(3.3, rel=1e-6)


def test_multinomial_selection_follows_the_router_probabilities_in_training_and_is_argmax_at_inference():
    torch.manual_seed(0)
    router = Router(1, 4, top_k=1, selection="multinomial")
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [-1.0]]))
    x = torch.ones(40000, 1)
    probs = torch.tensor([0.0, 1.0, 2.0, -1.0]).softmax(0)
    router.train()
    freq = torch.bincount(router(x).index[:, 0], minlength=4).double() / len(x)
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)  # 5 sigma at 40k draws
    router.eval()
    assert (router(x[:10]).index[:, 0] == 2).all()

    # top-2 without replacement: P(e drawn) = p_e + sum_{j != e} p_j p_e / (1 - p_j)
    router2 = Router(1, 4, top_k=2, selection="multinomial")
    router2.load_state_dict(router.state_dict())
    router2.train()
    out = router2(x)
    hit = torch.zeros(4, dtype=torch.float64)
    hit.index_add_(0, out.index.flatten(), torch.ones(out.index.numel(), dtype=torch.float64))
    p = probs.double()
    expected = torch.stack([p[e] + sum(p[j] * p[e] / (1 - p[j]) for j in range(4) if j != e) for e in range(4)])
    torch.testing.assert_close(hit / len(x), expected, atol=0.012, rtol=0)
    assert (out.index[:, 0] != out.index[:, 1]).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(len(x)))  # renormalised over the two drawn
    router2.eval()
    assert sorted(router2(x[:1]).index[0].tolist()) == [1, 2]


def test_multinomial_nm_layer_draws_per_token_in_training_only():
    torch.manual_seed(0)
    layer = SampleRoutedMoE("nm", 0, width=8, hidden=8, num_experts=4, top_k=2, route_dim=8, jitter=0.0,
                            router="mlp", selection="multinomial")
    ctx = type("Ctx", (), {"cond": torch.zeros(2, 8), "descriptor": torch.ones(2, 3)})()
    x = torch.randn(2, 50, 8)
    _, rec = layer(x, ctx)
    assert rec.routing.index.shape == (100, 2)  # one draw per token
    assert len({tuple(sorted(r)) for r in rec.routing.index.tolist()}) > 1  # zero router: all pairs equally likely
    assert int(rec.counts.sum()) == 2 * 50 * 2
    layer.eval()
    _, rec = layer(x, ctx)
    assert rec.routing.index.shape == (2, 2)  # inference: one top-k decision per sample


def test_mlp_router_has_two_layers_with_biases():
    router = Router(6, 4, top_k=2, kind="mlp")
    shapes = {name: tuple(p.shape) for name, p in router.named_parameters()}
    assert shapes == {"mlp.0.weight": (12, 6), "mlp.0.bias": (12,), "mlp.2.weight": (4, 12), "mlp.2.bias": (4,)}
    x = torch.randn(3, 6)
    by_hand = F.linear(F.gelu(F.linear(x, router.mlp[0].weight, router.mlp[0].bias)), router.mlp[2].weight,
                       router.mlp[2].bias)
    torch.testing.assert_close(router(x).logits, by_hand)


def test_linear_noise_embedding_and_one_shared_shift():
    model = head("nm,nm,d", noise_embedding="linear", noise_shift="shared",
                 objective=ObjectiveConfig(kind="edm", num_inference_steps=4))
    tr = model.transformer
    sigma = torch.tensor([0.5, 3.0])
    level = sigma.log() / 4  # c_noise, what EDM feeds the net
    noise = tr.noise_conditioning(level)
    lin1, lin2 = tr.noise_mlp
    by_hand = (level[:, None] * lin1.weight[:, 0] + lin1.bias) @ lin2.weight.T
    torch.testing.assert_close(noise.embedding, by_hand)
    assert lin2.bias is None
    assert all(torch.equal(s[:, 0], noise.embedding) for s in noise.shifts)
    assert all(block.noise_proj is None for block in tr.blocks)


def test_loglogistic_sigma_density_matches_its_truncated_cdf():
    cfg = ObjectiveConfig(kind="edm", sigma_min=0.001, sigma_max=80.0, sigma_data=0.5, sigma_density="loglogistic")
    torch.manual_seed(0)
    sigma = EDMDiffusion(cfg).sample_time(50000, torch.device("cpu")).double()
    assert float(sigma.min()) >= 0.001 and float(sigma.max()) <= 80.0

    def cdf(s: float) -> float:  # logistic in log sigma, location log 0.5, scale 0.5, truncated
        g = lambda v: 1 / (1 + math.exp(-(math.log(v) - math.log(0.5)) / 0.5))  # noqa: E731
        return (g(s) - g(0.001)) / (g(80.0) - g(0.001))

    for s in (0.05, 0.2, 0.5, 1.0, 3.0):
        assert float((sigma <= s).double().mean()) == pytest.approx(cdf(s), abs=0.01)


def test_exponential_schedule_and_first_order_ddim_step_by_hand():
    cfg = ObjectiveConfig(kind="edm", sampler="ddim", num_inference_steps=5, sigma_min=0.001, sigma_max=80.0,
                          sigma_data=0.5, sigma_schedule="exponential")
    objective = EDMDiffusion(cfg)
    sched = objective.scheduler(5)
    expected = [math.exp(math.log(80.0) + i * (math.log(0.001) - math.log(80.0)) / 4) for i in range(5)] + [0.0]
    torch.testing.assert_close(sched.sigmas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4) * 80.0
    sd = 0.5
    for i, t in enumerate(sched.timesteps):
        out = torch.randn_like(x)  # the net's raw output F
        s, s_next = expected[i], expected[i + 1]
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        denoised = c_skip * x + c_out * out
        by_hand = (s_next / s) * x + (1 - s_next / s) * denoised  # DDIM = DPM-Solver-1 (MoDE's sample_ddim)
        x_in, _ = objective.model_input(sched, x, t, i)
        torch.testing.assert_close(x_in, x / math.sqrt(s**2 + sd**2))  # c_in
        x_next = sched.step(out, t, x).prev_sample
        torch.testing.assert_close(x_next, by_hand, rtol=1e-4, atol=1e-4)
        x = x_next


def test_ddim_needs_edm():
    with pytest.raises(ConfigError, match="objective.sampler='ddim'"):
        ObjectiveConfig(kind="flow", sampler="ddim").validate()


# ---- 3. Mixture of Horizons: gate noise, segment balance, relative dynamic rule --------------------------------


def test_gate_noise_is_learnable_and_only_in_training():
    torch.manual_seed(0)
    moh = MixtureOfHorizons(HorizonConfig(horizons=(2, 4), gate_noise=True), chunk_size=4, width=8)
    hidden, pred = torch.randn(3, 6, 8), torch.randn(3, 6, 2)
    logits = moh.gate(hidden).squeeze(-1)

    def fused_by_hand(lg: torch.Tensor) -> torch.Tensor:
        grid = torch.full((3, 2, 4), float("-inf"))
        grid[:, 0, :2], grid[:, 1, :] = lg[:, :2], lg[:, 2:]
        return grid.softmax(dim=1)

    moh.eval()
    torch.testing.assert_close(moh.fuse(hidden, pred).weights, fused_by_hand(logits))
    torch.testing.assert_close(moh.fuse(hidden, pred).weights, moh.fuse(hidden, pred).weights)
    moh.train()
    torch.manual_seed(1)
    noisy = moh.fuse(hidden, pred).weights
    torch.manual_seed(1)
    std = F.softplus(moh.gate_noise(hidden).squeeze(-1)) + 0.01
    torch.testing.assert_close(noisy, fused_by_hand(logits + torch.randn(3, 6) * std))
    assert not torch.allclose(noisy, fused_by_hand(logits))
    (moh.fuse(hidden, pred).weights[:, 0, :2] ** 2).sum().backward()
    assert moh.gate_noise.weight.grad is not None and moh.gate_noise.weight.grad.abs().sum() > 0


def test_segment_cv_balance_by_hand():
    moh = MixtureOfHorizons(HorizonConfig(horizons=(2, 4, 6), balance_form="segment_cv"), chunk_size=6, width=8)
    w = torch.zeros(2, 3, 6)
    w[:, 0, :2], w[:, 1, :2], w[:, 2, :2] = 0.5, 0.3, 0.2  # segment [0, 2): three active horizons
    w[0, 1, 2:4], w[0, 2, 2:4] = 0.9, 0.1                   # segment [2, 4): two active horizons
    w[1, 1, 2:4], w[1, 2, 2:4] = 0.5, 0.5
    w[:, 2, 4:] = 1.0                                        # segment [4, 6): one horizon, no term
    m1 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    cv1 = float(((m1 - m1.mean()) ** 2).sum() / 2 / m1.mean() ** 2)  # unbiased variance / mean^2
    m2 = torch.tensor([0.7, 0.3], dtype=torch.float64)
    cv2 = float(((m2 - m2.mean()) ** 2).sum() / 1 / m2.mean() ** 2)
    assert float(moh.balance_loss(w)) == pytest.approx((cv1 + cv2) / 2, rel=1e-5)


def test_relative_dynamic_threshold_on_a_constructed_profile():
    cfg = HorizonConfig(horizons=(2, 4, 6, 8), dynamic=True, dynamic_rule="relative", scale_ratio=1.5,
                        min_replan_steps=2, min_active_horizons=1)
    coverage = torch.arange(8)[None, :] < torch.tensor([2, 4, 6, 8])[:, None]  # steps 6, 7: one horizon
    d = torch.tensor([
        [1.0, 1.0, 1.2, 1.4, 1.6, 1.0, 0.1, 0.1],  # threshold 1.5: steps 2, 3 pass, 4 fails -> 2 + 2 = 4
        [2.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0],  # threshold 1.5: 2..5 pass, step 6 has one horizon -> 6
        [1.0, 1.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # strict "<": 1.5 fails at once -> min_replan_steps = 2
    ])
    assert relative_execute(d, cfg, coverage).tolist() == [4, 6, 2]
    capped = HorizonConfig(**{**cfg.__dict__, "max_execute": 5})
    assert relative_execute(d, capped, coverage).tolist() == [4, 5, 2]


def test_relative_rule_disagreement_is_the_gate_weighted_one_step_l1():
    model = head("d,d", chunk=4, moh=HorizonConfig(horizons=(2, 4), dynamic=True, dynamic_rule="relative",
                                                   min_replan_steps=1, min_active_horizons=0))
    model.eval()
    batch = make_batch(b=2, h=4)
    torch.manual_seed(0)
    noise = torch.randn(2, 4, A)
    out = model.sample(*sample_args(batch), noise=noise)
    # by hand: flow Euler with steps 1, .75, .5, .25 -> 0; per step sum_k w_k * |dt| * sum_a |v_k - v|
    mask = batch["action_mask"].float()[:, None, :]
    x, total = noise.clone(), torch.zeros(2, 4)
    cond = model.transformer.condition(batch["prefix"], batch["state"], batch["state_mask"], batch["action_mask"])
    for t in (1.0, 0.75, 0.5, 0.25):
        o = model.transformer(x, torch.full((2,), t), cond, model.horizons.layout)
        fusion = model.horizons.fuse(o.hidden, o.pred)
        v_h = fusion.per_horizon
        total += (fusion.weights * (0.25 * ((v_h - fusion.actions[:, None]).abs() * mask[:, None]).sum(-1))).sum(1)
        x = x - 0.25 * fusion.actions
    torch.testing.assert_close(out.disagreement, total, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.actions, x * mask, rtol=1e-4, atol=1e-5)


# ---- 4. expert caching stays exact for every token-independent option ------------------------------------------


@pytest.mark.parametrize("options", [
    {"nm_router": "mlp", "nm_selection": "multinomial"},
    {"noise_shift": "shared", "noise_embedding": "linear"},
    {"norm": "rmsnorm", "expert_activation": "swiglu", "dense_activation": "geglu"},
    {"time_fusion": "action_mlp", "noise_conditioned_attention": False, "expert_activation": "geglu"},
    {"ffn_residual": "normed", "attention_bias": True, "qk_norm": True},
    {"nm_router": "mlp", "nm_selection": "multinomial", "noise_shift": "shared", "noise_embedding": "linear",
     "norm": "rmsnorm", "expert_activation": "swiglu", "nm_balance_form": "mode", "ffn_residual": "normed",
     "attention_bias": True, "qk_norm": True},
], ids=["mlp-router", "shared-shift", "glu-rmsnorm", "action-time-mlp", "mode-block", "mode-all"])
@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_expert_cache_is_exact_with_reference_options(options, kind):
    objective = ObjectiveConfig(kind=kind, num_inference_steps=4, sampler="ddim" if kind == "edm" else "euler")
    model = head("as,nm,nm,d", objective=objective, **options)
    batch = make_batch(b=6, h=4)
    losses = model.compute_loss(*loss_args(batch))
    losses["loss"].backward()
    model.eval()
    noise = torch.randn(6, 4, A)
    cached = model.sample(*sample_args(batch), noise=noise, use_expert_cache=True)
    assert len(model.expert_cache) > 0
    routed = model.sample(*sample_args(batch), noise=noise, use_expert_cache=False)
    torch.testing.assert_close(cached.actions, routed.actions, rtol=1e-5, atol=1e-5)


def test_mode_block_continues_from_the_normalised_stream():
    """MoDE's block: x <- x + attn(norm1(x) + c); x <- norm2(x); out = x + FFN(x). With the attention's output
    projection zeroed the block is norm2(x) + MLP(norm2(x)), by hand with RMSNorm's formula."""
    from vla.action.moe import RouteContext

    outs = {}
    for residual in ("pre_norm", "normed"):
        block = head("d", norm="rmsnorm", ffn_residual=residual).transformer.blocks[0]
        with torch.no_grad():
            block.attn.proj.weight.zero_()
            block.norm2.weight.copy_(torch.linspace(0.5, 1.5, 32))
        x = torch.randn(2, 5, 32)
        kv = block.attn.project_prefix(torch.randn(2, 3, PW))
        mask = torch.ones(2, 1, 5, 8, dtype=torch.bool)
        out, _ = block(x, kv, mask, RouteContext(cond=None, descriptor=None), shift=None)
        normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm2.weight
        outs[residual] = (out, x, normed, block.ffn(normed))
    out, x, normed, mlp = outs["normed"]
    torch.testing.assert_close(out, normed + mlp, rtol=1e-5, atol=1e-5)
    out, x, normed, mlp = outs["pre_norm"]
    torch.testing.assert_close(out, x + mlp, rtol=1e-5, atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys_and_bias_is_optional():
    """RMSNorm over each head's queries and keys: scaling the query/key projections (own and prefix tokens) leaves
    the attention unchanged, which it does not without qk_norm; `attention_bias` adds biases to q/k/v only."""
    from vla.action.transformer import Attention

    torch.manual_seed(0)
    x, prefix = torch.randn(2, 5, 32), torch.randn(2, 3, PW)
    mask = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    for qk_norm in (True, False):
        attn = Attention(32, 2, PW, 0.0, bias=True, qk_norm=qk_norm)
        assert attn.qkv.bias is not None and attn.prefix_kv.bias is not None and attn.proj.bias is None
        before = attn(x, attn.project_prefix(prefix), mask)
        with torch.no_grad():
            attn.qkv.weight[:64] *= 7.0  # queries and keys
            attn.qkv.bias[:64] *= 7.0
            attn.prefix_kv.weight[:32] *= 7.0  # prefix keys
            attn.prefix_kv.bias[:32] *= 7.0
        after = attn(x, attn.project_prefix(prefix), mask)
        assert torch.allclose(before, after, atol=1e-5) == qk_norm
    assert Attention(32, 2, PW, 0.0).qkv.bias is None


def test_action_time_fusion_drops_the_noise_token():
    model = head("as,hb,d", time_fusion="action_mlp", noise_conditioned_attention=False)
    tr = model.transformer
    assert tr.noise_token is None and tr.noise_mlp is None and tr.context == 1
    assert model.horizons.layout.num_tokens == 1 + 4
    level = torch.tensor([0.3])
    cond = tr.condition(*[make_batch(b=1, h=4)[k] for k in ("prefix", "state", "state_mask", "action_mask")])
    x = torch.zeros(1, 4, A)
    # by hand for a zero chunk: token j = W_out silu(W_in [action_in(0) + pos_j ; sinusoid(t)])
    from vla.action.transformer import sinusoidal_embedding
    a = tr.action_in.bias + tr.action_pos
    phi = sinusoidal_embedding(level, 32).expand(4, -1)
    tok = tr.action_time_out(F.silu(tr.action_time_in(torch.cat([a, phi], -1))))
    seen = {}
    handle = tr.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    tr(x, level, cond, model.horizons.layout)
    handle.remove()
    torch.testing.assert_close(seen["x"][0, 1:], tok)


# ---- 5. presets and config docstrings ----------------------------------------------------------------------------


def test_presets_select_the_reference_options():
    himoe = get_preset("himoe-paligemma").action
    assert not himoe.noise_conditioned_attention
    assert (himoe.loss_layer_reduction, himoe.as_reg_form, himoe.time_fusion, himoe.norm) == \
        ("reference", "token", "action_mlp", "rmsnorm")
    assert (himoe.dense_activation, himoe.expert_activation) == ("geglu", "swiglu")
    mode = get_preset("mode")
    assert (mode.action.nm_router, mode.action.nm_selection, mode.action.noise_shift, mode.action.noise_embedding,
            mode.action.nm_balance_form) == ("mlp", "multinomial", "shared", "linear", "mode")
    assert (mode.action.ffn_residual, mode.action.attention_bias, mode.action.qk_norm) == ("normed", True, True)
    assert (mode.objective.sampler, mode.objective.sigma_schedule, mode.objective.sigma_density) == \
        ("ddim", "exponential", "loglogistic")
    moh = get_preset("moh-pi0").action.moh
    assert moh.horizons == tuple(range(3, 31, 3)) and moh.gate_noise and moh.balance_form == "segment_cv"
    assert (moh.dynamic_rule, moh.scale_ratio, moh.min_replan_steps, moh.min_active_horizons) == \
        ("relative", 1.0, 5, 5)


def test_old_configs_load_with_todays_behaviour():
    data = get_preset("debug").to_dict()
    new = {"nm_router", "nm_selection", "nm_balance_form", "as_reg_form", "loss_layer_reduction", "noise_shift",
           "noise_embedding", "time_fusion", "norm", "dense_activation", "expert_activation", "ffn_residual",
           "attention_bias", "qk_norm"}
    for name in new:
        data["action"].pop(name)
    for name in ("balance_form", "gate_noise", "dynamic_rule", "scale_ratio", "min_replan_steps",
                 "min_active_horizons"):
        data["action"]["moh"].pop(name)
    for name in ("sigma_schedule", "sigma_density", "loglogistic_scale"):
        data["objective"].pop(name)
    cfg = VLAConfig.from_dict(data).validate()
    assert cfg == get_preset("debug")
    assert (cfg.action.loss_layer_reduction, cfg.action.time_fusion, cfg.objective.sigma_schedule) == \
        ("mean", "token", "karras")


def test_a_bad_choice_names_the_field():
    with pytest.raises(ConfigError, match="action.nm_selection"):
        ActionConfig(nm_selection="sometimes").validate()
    with pytest.raises(ConfigError, match="action.moh.dynamic_rule"):
        ActionConfig(moh=HorizonConfig(dynamic_rule="vibes")).validate()
    with pytest.raises(ConfigError, match="objective.sigma_density"):
        ObjectiveConfig(sigma_density="uniform").validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_docstring_names_its_reference_recipe(name):
    doc = PRESETS[name].__doc__ or ""
    assert re.search(r"reference|follows no", doc, re.IGNORECASE), f"preset {name} does not say what it follows"
    if name == "mode":
        assert "DPM" not in doc and "DDIM" in doc and "exponential" in doc


def test_config_docstrings_carry_no_measured_percentages():
    tree = ast.parse((REPO / "vla" / "config.py").read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef)]
    for node in nodes:
        doc = ast.get_docstring(node) or ""
        assert not re.search(r"\d\s*%", doc), f"{getattr(node, 'name', 'module')}: {re.findall(r'.{30}%', doc)}"

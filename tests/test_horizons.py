"""Mixture of Horizons: one packed pass equals separate per-horizon passes, the gate is a distribution over the
covering horizons, every loss term trains something, a single horizon is the plain head, and dynamic execution
runs longer where the horizons agree."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_action import PW, A, S, loss_args, make_batch, sample_args

from vla.action import ActionHead
from vla.action.horizons import HorizonLayout, consensus_execute
from vla.action.transformer import ActionTransformer
from vla.backbones.prefix import Prefix
from vla.config import ActionConfig, HorizonConfig, ObjectiveConfig

H = 4


def build(horizons=(1, 3, 4), layers="as,hb,nm,d", kind="flow", seed=0, **moh) -> ActionHead:
    torch.manual_seed(seed)
    cfg = ActionConfig(chunk_size=H, n_action_steps=2, width=32, num_heads=2, ffn_dim=64, layers=layers,
                       hb_num_experts=4, hb_top_k=2, moh=HorizonConfig(horizons=horizons, **moh))
    return ActionHead(cfg, ObjectiveConfig(kind=kind, num_inference_steps=4), prefix_width=PW, prefix_layers=None,
                      action_dim=A, state_dim=S)


def test_single_horizon_is_the_plain_head():
    plain, single = build(horizons=()), build(horizons=(H,))
    assert plain.state_dict().keys() == single.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), single.state_dict().values(),
                                                 strict=True))
    batch = make_batch(h=H)
    noise, time = torch.randn(6, H, A), torch.rand(6)
    lp = plain.compute_loss(*loss_args(batch), noise=noise, time=time)
    ls = single.compute_loss(*loss_args(batch), noise=noise, time=time)
    assert lp.keys() == ls.keys() and "moh_balance" not in ls
    assert all(torch.equal(lp[k], ls[k]) for k in lp)
    plain.eval(), single.eval()
    torch.testing.assert_close(single.sample(*sample_args(batch), noise=noise).actions,
                               plain.sample(*sample_args(batch), noise=noise).actions, rtol=0, atol=0)


def test_all_horizons_in_one_pass_equal_separate_passes_on_truncated_chunks():
    head = build(horizons=(1, 3, 4))
    batch = make_batch(h=H)
    tr = head.transformer
    cond = tr.condition(batch["prefix"], batch["state"], batch["state_mask"], batch["action_mask"])
    noisy, level = torch.randn(6, H, A), torch.rand(6)
    packed = tr(noisy, level, cond, head.horizons.layout)
    start = 0
    for h in (1, 3, 4):
        alone = tr(noisy[:, :h], level, cond, HorizonLayout.build((h,), H))
        torch.testing.assert_close(packed.pred[:, start: start + h], alone.pred, rtol=1e-5, atol=1e-5)
        start += h


def test_gate_is_a_distribution_over_exactly_the_covering_horizons():
    head = build(horizons=(1, 3, 4))
    with torch.no_grad():
        head.horizons.gate.weight.normal_(std=1.0)  # a gate with opinions
    batch = make_batch(h=H)
    tr = head.transformer
    cond = tr.condition(batch["prefix"], batch["state"], batch["state_mask"], batch["action_mask"])
    out = tr(torch.randn(6, H, A), torch.rand(6), cond, head.horizons.layout)
    weights = head.horizons.fuse(out.hidden, out.pred).weights  # (B, k, H)
    covering = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(weights > 0, covering[None].expand_as(weights))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6, H))
    assert not torch.allclose(weights[0], weights[1])  # per token: the weights follow each token's features


def test_every_moh_loss_term_gets_gradient():
    head = build(horizons=(2, 4))
    losses = head.compute_loss(*loss_args(make_batch(h=H)))
    gate = head.horizons.gate.weight
    body = head.transformer.blocks[0].attn.qkv.weight
    for name in ("moh_mix", "moh_horizons", "moh_balance"):
        g_gate, g_body = torch.autograd.grad(losses[name], (gate, body), retain_graph=True, allow_unused=True)
        if name != "moh_horizons":  # per-horizon losses do not involve the gate
            assert g_gate is not None and g_gate.abs().sum() > 0, name
        assert g_body is not None and g_body.abs().sum() > 0, name
    expected = losses["moh_mix"] + losses["moh_horizons"] + head.cfg.moh.balance_weight * losses["moh_balance"]
    rest = sum(head.cfg.__getattribute__(f"{k}_weight") * losses[k] for k in ("hb_balance", "nm_balance", "as_reg"))
    torch.testing.assert_close(losses["loss"], expected + rest)


def test_horizons_run_in_one_transformer_pass(monkeypatch):
    head = build(horizons=(1, 2, 3, 4))
    calls = []
    original = ActionTransformer.forward
    monkeypatch.setattr(ActionTransformer, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    head.compute_loss(*loss_args(make_batch(h=H)))
    assert len(calls) == 1
    head.eval().sample(*sample_args(make_batch(h=H)))
    assert len(calls) == 1 + 4  # one pass per denoising step


@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_moh_sampling_with_expert_cache_matches_uncached(kind):
    head = build(horizons=(2, 4), layers="as,nm,hb", kind=kind, dynamic=True).eval()
    batch = make_batch(h=H)
    noise = torch.randn(6, H, A)
    cached = head.sample(*sample_args(batch), noise=noise)
    uncached = head.sample(*sample_args(batch), noise=noise, use_expert_cache=False)
    torch.testing.assert_close(cached.actions, uncached.actions, rtol=0, atol=1e-5)
    assert cached.horizon_actions.shape == (6, 2, H, A) and cached.horizon_weights.shape == (6, 2, H)
    assert (cached.horizon_actions[:, 0, 2:] == 0).all()  # horizon 2 predicts no step beyond 2
    assert torch.isinf(cached.disagreement[:, 2:]).all()  # steps 2, 3: a single horizon, no consensus possible
    assert ((cached.num_execute >= 1) & (cached.num_execute <= 2)).all()
    stats = head.routing_stats()["horizons"]
    assert stats["horizons"] == [2, 4] and len(stats["mean_weight"]) == 2
    assert stats["mean_weight"][0][2:] == [0.0, 0.0]


def test_consensus_rule_executes_the_agreeing_prefix_within_bounds():
    d = torch.tensor([[0.01, 0.02, 0.5, 0.01, float("inf")],
                      [0.5, 0.01, 0.01, 0.01, float("inf")],
                      [0.01, 0.01, 0.01, 0.01, float("inf")]])
    cfg = HorizonConfig(horizons=(2, 4, 5), agreement_threshold=0.1, min_execute=1, max_execute=0)
    assert consensus_execute(d, cfg, 5).tolist() == [2, 1, 4]
    assert consensus_execute(d, dataclasses.replace(cfg, min_execute=2, max_execute=3), 5).tolist() == [2, 2, 3]
    assert consensus_execute(d, dataclasses.replace(cfg, agreement_threshold=1.0), 5).tolist() == [4, 4, 4]


def test_without_dynamic_execution_num_execute_is_n_action_steps():
    head = build(horizons=(2, 4), dynamic=False).eval()
    out = head.sample(*sample_args(make_batch(h=H)))
    assert out.num_execute.tolist() == [2] * 6


def test_dynamic_inference_executes_more_actions_on_a_low_noise_task_than_on_a_high_noise_one():
    """One small MoH head learns two tasks told apart by the prefix: a fixed trajectory (low noise) and a chunk
    with a random per-sample offset (high noise). Horizons that see fewer noisy steps are less sure of the offset,
    so they disagree more there, and the consensus rule (threshold 0.1) stops earlier."""
    chunk, b = 8, 32
    torch.manual_seed(0)
    cfg = ActionConfig(chunk_size=chunk, n_action_steps=2, width=32, num_heads=2, ffn_dim=64, layers="d,d",
                       moh=HorizonConfig(horizons=(2, 4, 6, 8), dynamic=True, agreement_threshold=0.1))
    head = ActionHead(cfg, ObjectiveConfig(kind="flow", num_inference_steps=10), prefix_width=4, prefix_layers=None,
                      action_dim=2, state_dim=2)
    state, ones = torch.zeros(b, 2), torch.ones(b, 2, dtype=torch.bool)
    ramp = torch.linspace(-0.5, 0.5, chunk)[None, :, None].expand(b, chunk, 2)

    def task(noisy: torch.Tensor) -> tuple[Prefix, torch.Tensor]:
        flag = noisy.float()[:, None]
        prefix = Prefix(torch.cat([flag, 1 - flag, torch.zeros(b, 2)], -1)[:, None, :], torch.ones(b, 1).bool())
        offset = (torch.rand(b, 1, 1) * 3 - 1.5).expand(b, chunk, 2)
        return prefix, torch.where(noisy[:, None, None], offset, ramp)

    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0, foreach=True)
    for _ in range(300):
        prefix, actions = task(torch.rand(b) < 0.5)
        loss = head.compute_loss(prefix, state, ones, actions, ones, torch.zeros(b, chunk, dtype=torch.bool))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    executed = {}
    for noisy in (False, True):
        prefix, actions = task(torch.full((b,), noisy))
        out = head.sample(prefix, state, ones, ones)
        executed[noisy] = out.num_execute.float().mean().item()
        if not noisy:
            assert (out.actions - actions).abs().mean() < 0.15  # it did learn the fixed trajectory
    assert executed[False] >= executed[True] + 1.0, executed

"""Action transformer: every preset pattern trains, routed dispatch is exact, the expert cache is exact and stays
fresh, auxiliary losses behave, bad configs fail at construction, prefix handling is pi0-style."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vla.action import ActionHead
from vla.action import moe as moe_module
from vla.action.moe import ExpertBank, action_space_contrastive_loss, load_balance_loss
from vla.action.objectives import make_objective
from vla.action.transformer import Attention, TransformerOutput
from vla.backbones.prefix import Prefix
from vla.config import PRESETS, ActionConfig, ConfigError, HorizonConfig, ObjectiveConfig, get_preset

A, S, PW = 6, 5, 24  # unified action dim, state dim, prefix width


def make_batch(b: int = 6, h: int = 4, p: int = 5, layers: int | None = None, seed: int = 0) -> dict:
    """Two embodiments (different action masks), some padded steps and masked prefix tokens."""
    g = torch.Generator().manual_seed(seed)
    action_mask = torch.zeros(b, A, dtype=torch.bool)
    action_mask[: b // 2, :4] = True
    action_mask[b // 2:, :] = True
    prefix_mask = torch.rand(b, p, generator=g) > 0.3
    prefix_mask[:, 0] = True
    action_is_pad = torch.zeros(b, h, dtype=torch.bool)
    action_is_pad[0, -1] = True
    per_layer = [torch.randn(b, p, PW, generator=g) for _ in range(layers)] if layers else None
    return {
        "prefix": Prefix(torch.randn(b, p, PW, generator=g), prefix_mask, per_layer),
        "state": torch.randn(b, S, generator=g),
        "state_mask": torch.ones(b, S, dtype=torch.bool),
        "actions": torch.randn(b, h, A, generator=g) * action_mask[:, None],
        "action_mask": action_mask,
        "action_is_pad": action_is_pad,
    }


def sample_args(batch: dict) -> tuple:
    return batch["prefix"], batch["state"], batch["state_mask"], batch["action_mask"]


def loss_args(batch: dict) -> tuple:
    return (batch["prefix"], batch["state"], batch["state_mask"], batch["actions"], batch["action_mask"],
            batch["action_is_pad"])


def small(cfg: ActionConfig, **over) -> ActionConfig:
    """Shrink a preset's widths and expert counts, keeping its layer pattern and kinds."""
    return dataclasses.replace(
        cfg, width=32, num_heads=2, ffn_dim=64, expert_ffn_dim=32, hb_expert_ffn_dim=16 if cfg.hb_expert_ffn_dim else 0,
        hb_num_experts=min(cfg.hb_num_experts, 6), hb_top_k=min(cfg.hb_top_k, 3), **over,
    )


def build(layers: str = "as,hb,nm,d", kind: str = "flow", prefix_layers: int | None = None, **over) -> ActionHead:
    torch.manual_seed(0)
    kwargs = {"chunk_size": 4, "n_action_steps": 2, "width": 32, "num_heads": 2, "ffn_dim": 64, "layers": layers,
                  "hb_num_experts": 4, "hb_top_k": 2} | over
    cfg = ActionConfig(**kwargs)
    return ActionHead(cfg, ObjectiveConfig(kind=kind, num_inference_steps=4), prefix_width=PW,
                      prefix_layers=prefix_layers, action_dim=A, state_dim=S)


# ---- every preset pattern ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_pattern_trains_and_every_parameter_that_should_learn_gets_a_gradient(preset):
    vla = get_preset(preset)
    action = small(vla.action)
    prefix_layers = 3 if vla.backbone.layerwise else None
    torch.manual_seed(0)
    head = ActionHead(action, vla.objective, prefix_width=PW, prefix_layers=prefix_layers, action_dim=A, state_dim=S)
    assert [b.kind for b in head.transformer.blocks] == vla.action.layer_kinds
    batch = make_batch(b=8, h=action.chunk_size, layers=prefix_layers)
    losses = head.compute_loss(*loss_args(batch))
    assert torch.isfinite(losses["loss"])
    kinds = set(vla.action.layer_kinds)
    assert ("hb_balance" in losses) == ("hb" in kinds)
    assert ("nm_balance" in losses) == ("nm" in kinds)
    assert ("as_reg" in losses) == ("as" in kinds)
    losses["loss"].backward()

    hits = {layer["layer"]: torch.tensor(list(layer["by_embodiment"].values())).sum(0)
            for layer in head.routing_stats(reset=True)["layers"]}
    for name, p in head.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if name.endswith(("experts.w_in", "experts.w_out")):  # only the experts the routers selected learn
            layer = int(name.split(".")[2])
            per_expert = p.grad.flatten(1).abs().sum(1)
            assert torch.equal(per_expert > 0, hits[layer] > 0), f"{name}: grads {per_expert} vs hits {hits[layer]}"
        else:
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    head.eval()
    out = head.sample(*sample_args(batch))
    assert out.actions.shape == (8, action.chunk_size, A)
    assert torch.isfinite(out.actions).all()
    assert (out.actions[~batch["action_mask"][:, None, :].expand_as(out.actions)] == 0).all()


# ---- routed dispatch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per-expert-loop"])
def test_expert_dispatch_equals_per_row_reference_forward_and_backward(grouped, monkeypatch):
    monkeypatch.setattr(moe_module, "_grouped_mm_ok", lambda x: grouped and hasattr(torch, "_grouped_mm"))
    torch.manual_seed(0)
    bank = ExpertBank(num_experts=5, width=8, hidden=12)
    torch.nn.init.normal_(bank.w_in)
    torch.nn.init.normal_(bank.w_out)
    x = torch.randn(17, 8, requires_grad=True)
    index = torch.stack([torch.randperm(5)[:2] for _ in range(17)])
    index[:4] = torch.tensor([3, 1])  # expert 0 may be unused, 3 is crowded
    weights = torch.rand(17, 2).softmax(-1).requires_grad_()

    out = bank(x, index, weights)
    ref = torch.stack([
        sum(weights[n, j] * (bank.w_out[index[n, j]] @ moe_module.gelu(bank.w_in[index[n, j]] @ x[n]))
            for j in range(2))
        for n in range(17)
    ])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (x, weights, bank.w_in, bank.w_out))  # .sum(): an expanded grad
    grads_ref = torch.autograd.grad(ref.sum(), (x, weights, bank.w_in, bank.w_out))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_forward_is_deterministic_on_cpu():
    head = build()
    batch = make_batch()
    noise, time = torch.randn(6, 4, A), torch.rand(6)
    first = head.compute_loss(*loss_args(batch), noise=noise, time=time)
    first["loss"].backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    second = head.compute_loss(*loss_args(batch), noise=noise, time=time)
    second["loss"].backward()
    assert torch.equal(first["loss"], second["loss"])
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, head.parameters(), strict=True))


# ---- expert cache ------------------------------------------------------------------------------------------------


def _spread_routers(head: ActionHead) -> None:
    """Make routing depend strongly on its inputs, so different steps/embodiments pick different experts."""
    with torch.no_grad():
        for block in head.transformer.blocks:
            if hasattr(block.ffn, "router"):
                block.ffn.router.proj.weight.mul_(40.0)


@pytest.mark.parametrize("kind", ["flow", "edm"])
@pytest.mark.parametrize("layers", ["nm,nm", "as,as", "as,hb,nm,d"], ids=["nm", "as", "mixed"])
def test_cached_sampling_equals_uncached(layers, kind):
    head = build(layers, kind, as_num_experts=3, as_top_k=2, nm_num_experts=4, nm_top_k=2)
    _spread_routers(head)
    head.eval()
    batch = make_batch()
    noise = torch.randn(6, 4, A)
    uncached = head.sample(*sample_args(batch), noise=noise, use_expert_cache=False)
    assert len(head.expert_cache) == 0
    cached = head.sample(*sample_args(batch), noise=noise, use_expert_cache=True)
    n_nm, n_as = layers.split(",").count("nm"), layers.split(",").count("as")
    # per denoising step (4) one noise conditioning and one fused MLP per nm layer; per embodiment (2) one per as layer
    assert len(head.expert_cache) == 4 + n_nm * 4 + n_as * 2
    torch.testing.assert_close(cached.actions, uncached.actions, rtol=0, atol=1e-5)
    again = head.sample(*sample_args(batch), noise=noise)  # served entirely from the cache
    torch.testing.assert_close(again.actions, uncached.actions, rtol=0, atol=1e-5)
    stats = head.routing_stats()
    for layer in stats["layers"]:
        assert sorted(layer["by_step"]) == [0, 1, 2, 3]
    if "nm" in layers:
        steps = next(layer for layer in stats["layers"] if layer["kind"] == "nm")["by_step"]
        assert len({tuple(v) for v in steps.values()}) > 1, "noise routing should differ across steps"


def test_cached_sampling_equals_uncached_with_factored_expert_banks():
    """Expert banks stored as low rank + sparse columns (as `merge_experts --rank` writes them) stay cache-exact."""
    head = build("as,hb,nm,d", as_num_experts=3, as_top_k=2, factored_kinds=("as", "hb", "nm"), expert_rank=4,
                 expert_sparse_fraction=0.1)
    with torch.no_grad():
        for block in head.transformer.blocks[:3]:
            assert isinstance(block.ffn.experts, moe_module.FactoredExpertBank)
            for m in (block.ffn.experts.w_in_factors, block.ffn.experts.w_out_factors):
                m.values.normal_(std=0.02)  # a sparse part that is not zero
                m.columns.copy_(torch.stack([torch.randperm(m.v.shape[-1])[:m.columns.shape[1]] for _ in m.u]))
    _spread_routers(head)
    head.eval()
    batch, noise = make_batch(), torch.randn(6, 4, A)
    uncached = head.sample(*sample_args(batch), noise=noise, use_expert_cache=False)
    cached = head.sample(*sample_args(batch), noise=noise, use_expert_cache=True)
    assert len(head.expert_cache) > 0
    torch.testing.assert_close(cached.actions, uncached.actions, rtol=0, atol=1e-5)


def test_cache_is_rebuilt_when_weights_change():
    head = build("as,nm")
    _spread_routers(head)
    head.eval()
    batch = make_batch()
    noise = torch.randn(6, 4, A)
    before = head.sample(*sample_args(batch), noise=noise).actions

    # an optimiser step (in eval mode, so train() does not clear the cache for us)
    head.compute_loss(*loss_args(batch))["loss"].backward()
    torch.optim.SGD(head.parameters(), lr=1.0).step()
    after = head.sample(*sample_args(batch), noise=noise).actions
    reference = head.sample(*sample_args(batch), noise=noise, use_expert_cache=False).actions
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-5)

    # load_state_dict of other weights
    other = build("as,nm")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.eval()
    head.load_state_dict(other.state_dict())
    torch.testing.assert_close(head.sample(*sample_args(batch), noise=noise).actions,
                               other.sample(*sample_args(batch), noise=noise, use_expert_cache=False).actions,
                               rtol=0, atol=1e-5)

    # writes through .data bypass version counters: eval() (as after an EMA swap) clears the cache
    with torch.no_grad():
        for p in head.parameters():
            p.data.copy_(p.data * 1.1)
    head.eval()
    torch.testing.assert_close(head.sample(*sample_args(batch), noise=noise).actions,
                               head.sample(*sample_args(batch), noise=noise, use_expert_cache=False).actions,
                               rtol=0, atol=1e-5)

    # a new Parameter object in place of an old one (no version counter or pointer of the old one changes)
    name, old_param = next((n, p) for n, p in head.named_parameters() if "experts" in n or "w1" in n)
    owner = head.get_submodule(name.rpartition(".")[0])
    setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(old_param.detach() * 0.5))
    torch.testing.assert_close(head.sample(*sample_args(batch), noise=noise).actions,
                               head.sample(*sample_args(batch), noise=noise, use_expert_cache=False).actions,
                               rtol=0, atol=1e-5)


def test_cache_is_not_used_in_training_mode():
    head = build("nm,nm")
    head.train()
    head.sample(*sample_args(make_batch()))
    assert len(head.expert_cache) == 0


# ---- auxiliary losses ------------------------------------------------------------------------------------------


def test_load_balance_loss_is_minimal_for_uniform_and_grows_when_routing_collapses():
    e, n, k = 4, 64, 2
    uniform_probs = torch.full((1, n, e), 1 / e)
    uniform_index = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=-1)[None]
    uniform = load_balance_loss(uniform_probs, uniform_index)
    collapsed = load_balance_loss(torch.eye(e)[torch.zeros(1, n, dtype=torch.long)],
                                  torch.zeros(1, n, k, dtype=torch.long))
    leaning = torch.full((1, n, e), 0.5 / (e - 1))
    leaning[..., 0] = 0.5  # half the probability mass and every assignment on expert 0
    half = load_balance_loss(leaning, torch.zeros(1, n, k, dtype=torch.long))
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    torch.testing.assert_close(collapsed, torch.tensor(float(e)))
    assert uniform < half < collapsed
    # random routing is never below the uniform optimum; padding rows are ignored
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        probs = torch.randn(3, n, e, generator=g).softmax(-1)
        assert load_balance_loss(probs, probs.topk(k, dim=-1).indices) >= 1.0 - 1e-6
    mask = torch.ones(1, n + 8, dtype=torch.bool)
    mask[0, n:] = False
    padded_probs = torch.cat([uniform_probs, torch.eye(e)[torch.zeros(1, 8, dtype=torch.long)]], dim=1)
    padded_index = torch.cat([uniform_index, torch.zeros(1, 8, k, dtype=torch.long)], dim=1)
    torch.testing.assert_close(load_balance_loss(padded_probs, padded_index, mask), torch.tensor(1.0))


def test_action_space_regularizer_separates_embodiments():
    descriptor = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float)
    same_routing = torch.full((4, 3), 1 / 3)
    separated = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    assert action_space_contrastive_loss(separated, descriptor, 0.1) < \
        action_space_contrastive_loss(same_routing, descriptor, 0.1)
    # a single embodiment gives nothing to contrast
    assert action_space_contrastive_loss(same_routing, torch.ones(4, 3), 0.1) == 0


def test_router_z_loss_is_reported_and_weighted_when_enabled():
    head = build("hb,nm", router_z_weight=1e-3)
    losses = head.compute_loss(*loss_args(make_batch()))
    assert losses["router_z"] > 0
    expected = (losses["action_loss"] + 1e-3 * losses["router_z"] + head.cfg.hb_balance_weight * losses["hb_balance"]
                + head.cfg.nm_balance_weight * losses["nm_balance"])
    torch.testing.assert_close(losses["loss"], expected)
    assert "router_z" not in build("hb,nm").compute_loss(*loss_args(make_batch()))


# ---- configuration errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    ({"layers": "d,hb", "hb_num_experts": 2, "hb_top_k": 3}, "hb_top_k"),
    ({"layers": "nm", "nm_num_experts": 4, "nm_top_k": 5}, "nm_top_k"),
    ({"layers": "as,d", "as_num_experts": 3, "as_top_k": 0}, "as_top_k"),
    ({"layers": "d,xx,hb"}, "unknown layer kind"),
    ({"layers": " , "}, "empty"),
    ({"width": 30, "num_heads": 4}, "divisible"),
    ({"router_jitter": 1.5}, "router_jitter"),
    ({"hb_num_shared": -1, "layers": "hb"}, "hb_num_shared"),
    ({"layers": "d,as", "factored_kinds": ("hb",), "expert_rank": 4}, "factored_kinds must name routed kinds"),
    ({"layers": "d,as", "factored_kinds": ("as",), "expert_rank": 32}, r"expert_rank must be in \[1, 31\]"),
    ({"layers": "d,as", "expert_rank": 4}, "must be 0 when factored_kinds is empty"),
    ({"moh": HorizonConfig(horizons=(2, 3))}, "end at"),
    ({"moh": HorizonConfig(horizons=(3, 2, 4))}, "strictly increasing"),
    ({"moh": HorizonConfig(horizons=(2, 4), min_execute=3, max_execute=2)}, "max_execute"),
])
def test_bad_action_config_raises_at_construction(over, message):
    with pytest.raises(ConfigError, match=message):
        build(**{"layers": "d,d", **over})


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix_width": 0}, "prefix_width"),
    ({"prefix_layers": 0}, "prefix_layers"),
    ({"action_dim": 0}, "action_dim"),
])
def test_bad_head_arguments_raise(kwargs, message):
    args = {"prefix_width": PW, "prefix_layers": None, "action_dim": A, "state_dim": S} | kwargs
    with pytest.raises(ValueError, match=message):
        ActionHead(ActionConfig(layers="d"), ObjectiveConfig(), **args)
    with pytest.raises(ConfigError, match="objective.kind"):
        ActionHead(ActionConfig(layers="d"), ObjectiveConfig(kind="ddpm"), prefix_width=PW, prefix_layers=None,
                   action_dim=A, state_dim=S)


def test_wrong_input_shapes_raise_before_any_work():
    head = build("d,d")
    batch = make_batch()
    with pytest.raises(ValueError, match="actions has shape"):
        head.compute_loss(batch["prefix"], batch["state"], batch["state_mask"], batch["actions"][:, :3],
                          batch["action_mask"], batch["action_is_pad"])
    with pytest.raises(ValueError, match="prefix.tokens"):
        head.sample(Prefix(torch.randn(6, 5, PW + 1), batch["prefix"].mask), *sample_args(batch)[1:])
    layerwise = build("d,d", prefix_layers=3)
    with pytest.raises(ValueError, match="per-layer prefix states"):
        layerwise.sample(*sample_args(batch))


# ---- prefix handling ---------------------------------------------------------------------------------------------


def test_masked_prefix_tokens_are_never_attended_to():
    head = build().eval()
    batch = make_batch()
    noise = torch.randn(6, 4, A)
    out = head.sample(*sample_args(batch), noise=noise).actions
    tokens = batch["prefix"].tokens.clone()
    tokens[~batch["prefix"].mask] = 1e3 * torch.randn(int((~batch["prefix"].mask).sum()), PW)
    changed = Prefix(tokens, batch["prefix"].mask)
    torch.testing.assert_close(head.sample(changed, *sample_args(batch)[1:], noise=noise).actions, out)
    tokens[batch["prefix"].mask] += torch.randn(int(batch["prefix"].mask.sum()), PW)  # attended tokens matter
    assert not torch.allclose(head.sample(Prefix(tokens, batch["prefix"].mask), *sample_args(batch)[1:],
                                          noise=noise).actions, out)


def test_layerwise_prefix_maps_action_layer_i_to_prefix_layer_i_times_L_over_depth():
    head = build("d,d,d", prefix_layers=6).eval()  # layers 0, 2, 4 of 6
    assert head.transformer.prefix_index == [0, 2, 4]
    batch = make_batch(layers=6)
    noise = torch.randn(6, 4, A)
    out = head.sample(*sample_args(batch), noise=noise).actions
    for j in range(6):
        layers = list(batch["prefix"].layers)
        layers[j] = layers[j] + torch.randn_like(layers[j])  # (a constant shift would vanish in LayerNorm)
        moved = head.sample(Prefix(batch["prefix"].tokens, batch["prefix"].mask, layers),
                            *sample_args(batch)[1:], noise=noise).actions
        assert torch.allclose(moved, out) == (j not in (0, 2, 4)), f"prefix layer {j}"


def test_prefix_is_projected_once_per_sample_call(monkeypatch):
    head = build("as,nm,d").eval()
    calls = []
    original = Attention.project_prefix
    monkeypatch.setattr(Attention, "project_prefix", lambda self, t: calls.append(1) or original(self, t))
    head.sample(*sample_args(make_batch()))
    assert len(calls) == head.transformer.depth  # once per layer, not once per layer and denoising step


def test_noise_level_reaches_attention_and_noise_routers():
    head = build("nm,d")
    batch = make_batch()
    noise = torch.randn(6, 4, A)
    losses = head.compute_loss(*loss_args(batch), noise=noise, time=torch.full((6,), 0.5))
    losses["loss"].backward()
    for block in head.transformer.blocks:
        assert block.noise_proj.weight.grad.abs().sum() > 0
    assert head.transformer.blocks[0].ffn.router.proj.weight.grad.abs().sum() > 0
    assert head.transformer.noise_mlp[0].weight.grad.abs().sum() > 0


def test_routing_stats_count_samples_by_embodiment_and_steps_and_reset():
    head = build("as,hb,nm,d")
    batch = make_batch()
    head.compute_loss(*loss_args(batch))
    stats = head.routing_stats(reset=True)
    kinds = {layer["kind"]: layer for layer in stats["layers"]}
    assert set(kinds) == {"as", "hb", "nm"}
    assert sorted(kinds["as"]["by_embodiment"]) == ["111100", "111111"]
    assert sum(map(sum, kinds["as"]["by_embodiment"].values())) == 6 * 1  # 6 samples, top-1
    assert sum(map(sum, kinds["nm"]["by_noise"].values())) == 6 * 2  # 6 samples, top-2
    tokens = 2 + 4
    assert sum(map(sum, kinds["hb"]["by_embodiment"].values())) == 6 * tokens * 2
    assert head.routing_stats()["layers"][0]["by_embodiment"] == {}


# ---- objectives --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_training_target_is_what_the_sampler_turns_back_into_the_actions(kind):
    objective = make_objective(ObjectiveConfig(kind=kind))
    actions = torch.randn(5, 4, 3)
    noise = torch.randn_like(actions)
    time = objective.sample_time(5, torch.device("cpu"))
    noisy = objective.noisy_actions(actions, noise, time)
    t = time[:, None, None]
    if kind == "flow":
        assert ((time >= 0.001) & (time <= 1)).all()
        torch.testing.assert_close(noisy.model_input, t * noise + (1 - t) * actions)
        torch.testing.assert_close(noisy.model_input - t * noisy.target, actions)  # x0 = x_t - t * (noise - x0)
        sched = objective.scheduler(10)
        torch.testing.assert_close(sched.sigmas, torch.cat([torch.linspace(1.0, 0.1, 10), torch.zeros(1)]))
    else:
        sched = objective.scheduler(10)
        x_sigma = actions + t * noise
        torch.testing.assert_close(noisy.model_input, sched.precondition_inputs(x_sigma, t))
        torch.testing.assert_close(noisy.level, 0.25 * time.log())
        torch.testing.assert_close(sched.precondition_outputs(x_sigma, noisy.target, t), actions, rtol=1e-4,
                                   atol=1e-4)


class OracleTransformer(torch.nn.Module):
    """Stands in for the action transformer: outputs exactly what denoises to `target` (a Dirac data
    distribution), so the sampling loop must land on `target` whatever the solver."""

    def __init__(self, inner, kind: str, target: torch.Tensor, sigma_data: float) -> None:
        super().__init__()
        self.inner, self.kind, self.target, self.sigma_data = inner, kind, target, sigma_data

    def condition(self, *args):
        return self.inner.condition(*args)

    def forward(self, x_in, level, cond, layout, **kwargs):
        lv = level[:, None, None].double()
        x_in = x_in.double()
        if self.kind == "flow":  # v = (x_t - x0) / t
            pred = (x_in - self.target) / lv
        else:  # x_in = c_in x, level = log(sigma) / 4; want c_skip x + c_out F = target
            sigma, sd = torch.exp(4 * lv), self.sigma_data
            x = x_in * (sigma**2 + sd**2).sqrt()
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
            pred = (self.target - c_skip * x) / c_out
        return TransformerOutput(hidden=torch.zeros(*x_in.shape[:2], 1), pred=pred.float())


@pytest.mark.parametrize("sampler", ["euler", "dpm"])
@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_sampling_loop_lands_on_a_dirac_data_distribution(kind, sampler):
    torch.manual_seed(0)
    head = ActionHead(ActionConfig(chunk_size=4, width=32, num_heads=2, ffn_dim=64, layers="d", n_action_steps=2),
                      ObjectiveConfig(kind=kind, sampler=sampler, num_inference_steps=10), prefix_width=PW,
                      prefix_layers=None, action_dim=A, state_dim=S).eval()
    target = torch.randn(6, 4, A).double()
    head.transformer = OracleTransformer(head.transformer, kind, target, head.objective_cfg.sigma_data)
    batch = make_batch()
    out = head.sample(*sample_args(batch)).actions
    torch.testing.assert_close(out, (target * batch["action_mask"][:, None]).float(), rtol=1e-4, atol=1e-4)


def test_loss_ignores_masked_action_dims_and_is_zero_when_everything_is_padded():
    head = build("as,hb,nm,d")
    batch = make_batch()
    noise, time = torch.randn(6, 4, A), torch.rand(6)
    base = head.compute_loss(*loss_args(batch), noise=noise, time=time)["action_loss"]
    garbage = batch["actions"] + 100.0 * torch.randn(6, 4, A) * ~batch["action_mask"][:, None]
    changed = head.compute_loss(batch["prefix"], batch["state"], batch["state_mask"], garbage, batch["action_mask"],
                                batch["action_is_pad"], noise=noise, time=time)["action_loss"]
    torch.testing.assert_close(changed, base)
    all_pad = torch.ones(6, 4, dtype=torch.bool)
    padded = head.compute_loss(batch["prefix"], batch["state"], batch["state_mask"], batch["actions"],
                               batch["action_mask"], all_pad, noise=noise, time=time)
    assert padded["action_loss"] == 0 and torch.isfinite(padded["loss"])

"""Post-training tools: expert merging/compression (vla.tools.merge_experts) and the routing report
(vla.tools.routing_report), including every command of docs/tools.md run on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla.action.moe import FactoredExpertBank, FactoredLinear
from vla.config import get_preset
from vla.constants import ACTION, ACTION_IS_PAD, ACTION_MASK, OBS_STATE, STATE_MASK
from vla.data.normalize import Normalizer
from vla.data.transforms import Processor, collate_frames
from vla.policy import VLAPolicy
from vla.tools.calibration import collect_routing, routed_layers
from vla.tools.merge_experts import main as merge_main
from vla.tools.merge_experts import merge_policy
from vla.tools.merging import (
    compress_matrix,
    group_experts,
    match_neurons,
    merge_group,
    permute_neurons,
    remap_router_rows,
)
from vla.tools.routing_report import distil_router, mutual_information, separation
from vla.tools.tree import DecisionTree

REPO = Path(__file__).resolve().parents[1]
EMBODIMENTS = {"libero_panda": (8, 7), "robosuite_ur5e_osc": (8, 4)}  # name -> (state dim, action dim)


def tiny_config():
    """The debug preset (as, hb, nm, d) at a size that runs in well under a second per chunk."""
    cfg = get_preset("debug")
    cfg.action = dataclasses.replace(cfg.action, width=32, ffn_dim=64)
    cfg.backbone = dataclasses.replace(cfg.backbone, width=32)
    cfg.data = dataclasses.replace(cfg.data, image_size=32)
    cfg.objective = dataclasses.replace(cfg.objective, num_inference_steps=3)
    return cfg.validate()


def normalizer() -> Normalizer:
    rng = np.random.default_rng(0)
    return Normalizer.from_arrays({name: {"state": [rng.normal(size=(64, s))], "action": [rng.uniform(-1, 1, (64, a))]}
                                   for name, (s, a) in EMBODIMENTS.items()})


def batches(policy: VLAPolicy, n: int, embodiments=("libero_panda",), b: int = 4) -> list[dict]:
    """n batches of b samples through the data loader's Processor, cycling through `embodiments`."""
    proc = Processor(policy.config.data, policy.registry, policy.normalizer)
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        frames = []
        for j in range(b):
            name = embodiments[(i * b + j) % len(embodiments)]
            s, a = EMBODIMENTS[name]
            images = {cam: rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for cam in ("base", "wrist")}
            frame = proc.frame(images, rng.normal(size=s).astype(np.float32), f"task {j % 2}", name)
            chunk = torch.as_tensor(rng.uniform(-1, 1, (policy.config.action.chunk_size, a)), dtype=torch.float32)
            frame[ACTION] = proc.actions_to_model(chunk, name)
            frame[ACTION_IS_PAD] = torch.zeros(policy.config.action.chunk_size, dtype=torch.bool)
            frames.append(frame)
        out.append(collate_frames(frames))
    return out


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return VLAPolicy(tiny_config(), normalizer=normalizer()).eval()


@pytest.fixture(scope="module")
def calibration(policy):
    return collect_routing(policy, batches(policy, 4), max_samples=16)


def chunk(policy: VLAPolicy, batch: dict, noise: torch.Tensor, cache: bool) -> torch.Tensor:
    prefix = policy.encode(batch)
    return policy.head.sample(prefix, batch[OBS_STATE], batch[STATE_MASK], batch[ACTION_MASK], noise=noise,
                              use_expert_cache=cache).actions


# ---- merging ---------------------------------------------------------------------------------------------------


def test_calibration_records_every_router_at_every_step(policy, calibration):
    assert sorted(calibration.layers) == [0, 1, 2]  # as, hb, nm; layer 3 is dense
    steps = policy.config.objective.num_inference_steps
    tokens = 2 + policy.config.action.chunk_size  # state, noise, actions
    for rec, rows in zip(calibration.layers.values(), (16 * steps, 16 * steps * tokens, 16 * steps), strict=True):
        assert rec.rows == rows and rec.counts.sum() == rows * rec.top_k
    assert len(calibration.noise) == steps and calibration.noise[0] == pytest.approx(1.0)


def test_merging_every_expert_into_its_own_group_is_the_identity(policy, calibration):
    merged, reports = merge_policy(policy, calibration, {"as": 3, "hb": 4, "nm": 4})
    assert [r.groups for r in reports] == [[[0], [1], [2]], [[0], [1], [2], [3]], [[0], [1], [2], [3]]]
    before, after = policy.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    batch, noise = batches(policy, 1)[0], torch.randn(4, 4, 16)
    torch.testing.assert_close(chunk(merged, batch, noise, False), chunk(policy, batch, noise, False), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_two_experts_that_are_neuron_permutations_merge_back_to_the_original(activation):
    torch.manual_seed(0)
    hidden, width = 16, 8
    w_in = torch.randn(1, hidden * (1 if activation == "gelu" else 2), width)
    w_out = torch.randn(1, width, hidden)
    perm = torch.randperm(hidden)
    p_in, p_out = permute_neurons(w_in[0], w_out[0], perm, activation)
    bank_in, bank_out = torch.cat([w_in, p_in[None]]), torch.cat([w_out, p_out[None]])
    x = torch.randn(5, width)
    act = (lambda h: torch.nn.functional.gelu(h, approximate="tanh")) if activation == "gelu" else \
        (lambda h: torch.nn.functional.silu(h[:, :hidden]) * h[:, hidden:])
    torch.testing.assert_close(act(x @ p_in.T) @ p_out.T, act(x @ w_in[0].T) @ w_out[0].T)  # same function

    frequency = torch.tensor([0.6, 0.4])
    logits = torch.randn(32, 2)
    (group,) = group_experts(frequency, logits, 1)
    assert group == [0, 1]  # the most used expert is the centre
    inverse = match_neurons(w_in[0], w_out[0], p_in, p_out, activation)
    assert torch.equal(perm[inverse], torch.arange(hidden))
    merged_in, merged_out = merge_group(bank_in, bank_out, group, frequency, activation)
    torch.testing.assert_close(merged_in, w_in[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_out, w_out[0], rtol=0, atol=1e-5)
    naive_in, _ = merge_group(bank_in, bank_out, group, frequency, activation, method="uniform")
    assert (naive_in - w_in[0]).abs().max() > 0.1  # without alignment the average is another function


def test_members_join_the_centre_with_the_most_similar_router_logits():
    torch.manual_seed(0)
    a, b = torch.randn(64), torch.randn(64)
    logits = torch.stack([a, b, a + 0.1 * torch.randn(64), b + 0.1 * torch.randn(64)], dim=1)
    frequency = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert group_experts(frequency, logits, 2) == [[0, 2], [1, 3]]
    assert group_experts(torch.tensor([0.1, 0.2, 0.3, 0.4]), logits, 2) == [[2, 0], [3, 1]]


def test_remapped_router_gives_each_group_its_members_summed_probability():
    torch.manual_seed(0)
    features = torch.randn(6, 10)  # fewer rows than inputs (as a descriptor router sees few embodiments)
    weight = torch.randn(4, 10)
    groups = [[0, 3], [1], [2]]
    new, _ = remap_router_rows(weight, features, groups)
    assert torch.equal(new[1], weight[1]) and torch.equal(new[2], weight[2])
    old_p, new_p = (features @ weight.T).softmax(-1), (features @ new.T).softmax(-1)
    target = torch.stack([old_p[:, g].sum(1) for g in groups], dim=1)
    torch.testing.assert_close(new_p, target, rtol=0, atol=1e-4)


def test_merged_and_compressed_checkpoint_loads_acts_and_stays_cache_exact(policy, calibration, tmp_path):
    merged, reports = merge_policy(policy, calibration, {"as": 2, "hb": 2, "nm": 2}, rank=8, sparse_fraction=0.1)
    merged.save_pretrained(tmp_path / "merged")
    loaded = VLAPolicy.from_pretrained(tmp_path / "merged")
    a = loaded.config.action
    assert (a.as_num_experts, a.hb_num_experts, a.nm_num_experts, a.nm_top_k, a.hb_top_k) == (2, 2, 2, 2, 2)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in policy.parameters())
    assert all(r.compressed_params < r.expert_params[1] for r in reports)
    batch, noise = batches(policy, 1)[0], torch.randn(4, 4, 16)
    cached, routed = chunk(loaded, batch, noise, True), chunk(loaded, batch, noise, False)
    assert len(loaded.head.expert_cache) > 0 and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, routed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(routed, chunk(policy, batch, noise, False), atol=1e-4)  # it is another model
    banks = [ffn.experts for ffn in routed_layers(loaded).values()]
    assert all(isinstance(bank, FactoredExpertBank) for bank in banks)  # the loaded model holds the factors
    stored = sum(t.numel() for bank in banks for t in (*bank.parameters(), *bank.buffers()))
    assert stored == sum(r.compressed_params for r in reports)


# ---- the factored expert bank ------------------------------------------------------------------------------------


def random_factored_bank(activation: str = "gelu") -> FactoredExpertBank:
    """4 experts of width 16, hidden 24, rank 3, 20 % sparse columns, every factor random (columns per expert)."""
    torch.manual_seed(0)
    bank = FactoredExpertBank(4, 16, 24, activation, rank=3, sparse_fraction=0.2)
    with torch.no_grad():
        for m in (bank.w_in_factors, bank.w_out_factors):
            for t in (m.u, m.v, m.values):
                t.normal_(std=0.3)
            n, keep = m.v.shape[-1], m.columns.shape[1]
            m.columns.copy_(torch.stack([torch.randperm(n)[:keep] for _ in range(4)]))
    return bank


def test_factored_bank_reconstruction_is_low_rank_plus_scattered_columns_exactly():
    bank = random_factored_bank("swiglu")
    assert bank.w_in.shape == (4, 48, 16) and bank.w_out.shape == (4, 16, 24)  # ExpertBank's shapes
    for dense, m in ((bank.w_in, bank.w_in_factors), (bank.w_out, bank.w_out_factors)):
        assert m.columns.dtype == torch.long and m.columns.shape == (4, math.ceil(0.2 * m.v.shape[-1]))
        with torch.no_grad():
            for e in range(4):
                want = m.u[e] @ m.v[e]
                want[:, m.columns[e]] += m.values[e]
                assert torch.equal(dense[e], want)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_factored_bank_fused_experts_equal_its_routed_forward(activation):
    """The expert cache's path: a FusedMLP computing on the factors (no dense copy) against the routed forward."""
    bank = random_factored_bank(activation)
    x = torch.randn(7, 16)
    experts, weights = torch.tensor([3, 1]), torch.tensor([0.7, 0.3])
    fused = bank.fuse(experts, weights)
    assert all(isinstance(w, FactoredLinear) for w in (*fused.w_in, *fused.w_out))
    routed = bank(x, experts.expand(7, 2), weights.expand(7, 2))
    torch.testing.assert_close(fused(x), routed, rtol=0, atol=1e-5)


def densified(policy: VLAPolicy) -> VLAPolicy:
    """The same policy with every factored expert bank replaced by an ExpertBank holding its dense reconstruction."""
    config = dataclasses.replace(policy.config, action=dataclasses.replace(
        policy.config.action, factored_kinds=(), expert_rank=0, expert_sparse_fraction=0.0))
    state = {k: v for k, v in policy.state_dict().items() if "_factors." not in k}
    names = {id(m): n for n, m in policy.named_modules()}
    for ffn in routed_layers(policy).values():
        prefix = names[id(ffn.experts)]
        state[f"{prefix}.w_in"], state[f"{prefix}.w_out"] = ffn.experts.w_in.detach(), ffn.experts.w_out.detach()
    dense = VLAPolicy(config, registry=policy.registry, normalizer=policy.normalizer)
    dense.load_state_dict(state, strict=True)
    return dense.eval()


def test_rank_merge_saves_the_factors_in_a_smaller_file_that_acts_like_the_dense_reconstruction(policy, calibration,
                                                                                                  tmp_path):
    groups = {"as": 2, "hb": 2, "nm": 2}
    merge_policy(policy, calibration, groups)[0].save_pretrained(tmp_path / "dense")
    merged, _ = merge_policy(policy, calibration, groups, rank=8, sparse_fraction=0.1)
    merged.save_pretrained(tmp_path / "factored")
    files = {name: tmp_path / name / "model.safetensors" for name in ("dense", "factored")}
    assert files["factored"].stat().st_size < files["dense"].stat().st_size

    saved = load_file(str(files["factored"]))
    experts = sorted(k for k in saved if ".experts." in k)
    assert not any(k.endswith((".w_in", ".w_out")) for k in experts)  # no dense expert matrix is stored
    width, hidden = 32, 64
    for name, (m, n) in {"w_in": (hidden, width), "w_out": (width, hidden)}.items():
        keep = math.ceil(0.1 * n)
        for layer in range(3):  # as, hb, nm: 2 merged experts each
            key = f"head.transformer.blocks.{layer}.ffn.experts.{name}_factors"
            assert saved[f"{key}.u"].shape == (2, m, 8) and saved[f"{key}.v"].shape == (2, 8, n)
            assert saved[f"{key}.values"].shape == (2, m, keep) and saved[f"{key}.columns"].shape == (2, keep)
            assert saved[f"{key}.columns"].dtype == torch.int64

    loaded = VLAPolicy.from_pretrained(tmp_path / "factored")
    a = loaded.config.action
    assert (a.factored_kinds, a.expert_rank, a.expert_sparse_fraction) == (("as", "hb", "nm"), 8, 0.1)
    dense = densified(loaded)
    batch, noise = batches(policy, 1)[0], torch.randn(4, 4, 16)
    for cache in (False, True):
        torch.testing.assert_close(chunk(loaded, batch, noise, cache), chunk(dense, batch, noise, cache), rtol=0,
                                   atol=1e-5)


def test_the_reconstruction_keeps_each_matrix_s_largest_residual_columns():
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    c = compress_matrix(w, rank=3, sparse_fraction=0.25)
    assert c.columns.shape == (5,) and c.u.shape == (12, 3) and c.v.shape == (3, 20)
    residual = w.double() - (c.u @ c.v).double()
    assert set(c.columns.tolist()) == set(residual.norm(dim=0).topk(5).indices.tolist())
    torch.testing.assert_close(c.dense[:, c.columns], w[:, c.columns], rtol=0, atol=1e-5)  # kept columns exact
    assert c.params == 3 * (12 + 20) + 5 * 12 + 5


def test_merging_a_factored_checkpoint_again_keeps_the_kinds_it_leaves_factored(policy, calibration):
    factored, _ = merge_policy(policy, calibration, {"as": 2, "hb": 2, "nm": 2}, rank=8, sparse_fraction=0.1)
    again = collect_routing(factored, batches(factored, 2), max_samples=8)
    with pytest.raises(ValueError, match=re.escape("kinds ['hb', 'nm'] stay factored at rank 8")):
        merge_policy(factored, again, {"as": 1}, rank=4, sparse_fraction=0.1)
    merged, _ = merge_policy(factored, again, {"as": 1})  # as becomes a dense bank of one expert
    assert merged.config.action.factored_kinds == ("hb", "nm")
    layers = routed_layers(merged)
    assert not isinstance(layers[0].experts, FactoredExpertBank)
    assert all(isinstance(layers[i].experts, FactoredExpertBank) for i in (1, 2))
    before, after = factored.state_dict(), merged.state_dict()
    kept = [k for k in before if ".blocks.1.ffn." in k or ".blocks.2.ffn." in k]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)  # the unmerged factored layers are copied


# ---- the routing report ----------------------------------------------------------------------------------------


def test_tree_reproduces_a_known_rule_on_constructed_inputs():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(0, 2, 400), rng.integers(0, 2, 400), rng.uniform(0, 1, 400)]).astype(float)
    y = np.where(x[:, 1] == 1, np.where(x[:, 2] <= 0.4, 0, 1), 2)  # the rule; feature 0 is a distractor
    tree = DecisionTree(2, ["a", "b", "noise"], ["e0", "e1", "e2"]).fit(x, y)
    assert (tree.predict(x) == y).all()
    assert tree.root.feature == 1 and tree.depth() == 2
    assert abs(tree.root.right.threshold - 0.4) < 0.02 and tree.root.right.feature == 2
    assert "if b <= 0.5:" in tree.to_text()
    assert DecisionTree(1, ["a", "b", "noise"], ["e0", "e1", "e2"]).fit(x, y).depth() == 1  # the depth limit


def test_distilled_tree_reproduces_an_action_space_router_with_a_known_rule(tmp_path):
    """An `as` router set by hand to pick expert 0 when action slot 3 is used (the Panda's rotation, which the
    UR5e lacks) and expert 1 otherwise: the distilled tree splits on that slot and agrees everywhere."""
    torch.manual_seed(0)
    policy = VLAPolicy(tiny_config(), normalizer=normalizer()).eval()
    router = policy.head.transformer.blocks[0].ffn.router
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0, 3] = 5.0
        router.proj.weight[1, 0] = 2.0
    cal = collect_routing(policy, batches(policy, 2, embodiments=("libero_panda", "robosuite_ur5e_osc")), 8)
    tree, agreement = distil_router(cal, cal.layers[0], max_depth=3)
    assert agreement == 1.0
    assert tree.feature_names[tree.root.feature] == "action slot 3 used"
    assert tree.class_names[tree.root.left.label] == "expert 1" and tree.class_names[tree.root.right.label] == \
        "expert 0"
    assert tree.draw(tmp_path / "tree.png").stat().st_size > 1000


def test_mutual_information_is_zero_for_independent_and_one_for_decided_routing():
    assert mutual_information(np.full((3, 4), 5.0)) == (0.0, 0.0)
    mi, nmi = mutual_information(np.diag([10.0, 10.0, 10.0, 10.0]))
    assert mi == pytest.approx(2.0) and nmi == pytest.approx(1.0)


def test_separation_tells_a_lumped_routing_from_a_spread_one():
    lumped = np.array([[10.0, 0, 0]] * 4 + [[0, 10.0, 0]])  # 4 of 5 embodiments on expert 0, one on expert 1
    assert mutual_information(lumped)[1] == pytest.approx(1.0)  # decided by the embodiment...
    # ...but it carries H(0.8, 0.2) = 0.722 bits of the log2(3) a 3-expert layer could
    assert separation(lumped) == pytest.approx(0.7219 / np.log2(3), abs=1e-4)
    spread = np.array([[10.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    assert separation(spread) > separation(lumped)
    assert separation(np.eye(3) * 7) == pytest.approx(1.0)
    assert separation(np.full((5, 3), 4.0)) == 0.0 and separation(np.array([[3.0, 0], [5.0, 0]])) == 0.0


# ---- the command lines -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory, write_lerobot_dataset):
    root = tmp_path_factory.mktemp("tools")
    data = write_lerobot_dataset(root / "panda_data", robot_type="libero_panda", action_dim=7, state_dim=8,
                                 cameras=("agentview", "wrist"), episodes=(12, 12))
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.data.mixture = str(data)
    VLAPolicy(cfg, normalizer=normalizer()).save_pretrained(root / "ckpt")
    return root / "ckpt", data


@pytest.mark.parametrize("args, message", [
    (["--groups", "9"], "as: 9 groups is outside [1, 3]"),
    (["--groups", "zz=2"], "kind 'zz' has no layer"),
    (["--groups", "2", "--rank", "40"], "--rank 40 must be in [1, 31]"),
    (["--groups", "2", "--calib", "no/such/dir/x"], "neither a mixture file nor a dataset"),
])
def test_bad_merge_arguments_fail_with_one_clear_error_before_writing(checkpoint_and_data, tmp_path, args, message):
    ckpt, _ = checkpoint_and_data
    with pytest.raises(SystemExit, match=re.escape(message)):
        merge_main(["--policy", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def doc_commands() -> list[str]:
    """The `python -m vla.tools...` commands of docs/tools.md (continuation lines joined)."""
    text = (REPO / "docs" / "tools.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip().startswith("python -m vla.tools.")]


def reduced_doc_commands(ckpt: Path, data: Path, tmp_path: Path) -> list[list[str]]:
    """docs/tools.md's commands pointed at the tiny checkpoint and dataset, at a reduced size (argv after
    `python`)."""
    commands = doc_commands()
    assert len(commands) == 4
    out = []
    for command in commands:
        command = (command.replace("checkpoints/bench-learning/tiny-cpu/last", str(ckpt))
                   .replace("datasets/mixtures/libero_object_task0.yaml", str(data))
                   .replace("checkpoints/", f"{tmp_path}/checkpoints/").replace("reports/", f"{tmp_path}/reports/")
                   .replace("--rank 64", "--rank 8"))
        out.append([*shlex.split(command)[1:], "--samples", "8", "--batch-size", "4"])
    return out


def check_doc_outputs(tmp_path: Path, merged_names=("tiny-cpu-k2", "tiny-cpu-k2-r64", "tiny-cpu-k2-uniform")) -> None:
    for name in merged_names:
        merged = VLAPolicy.from_pretrained(tmp_path / "checkpoints" / name)
        assert (tmp_path / "checkpoints" / name / "merge_report.json").is_file()
        assert merged.config.action.nm_num_experts == 2
    report = tmp_path / "reports" / "tiny-cpu-routing"
    assert {"report.md", "report.json", "layer0_as_usage.png", "layer1_hb_usage.png", "layer0_as_tree.png",
            "layer2_nm_tree.png"} <= {p.name for p in report.iterdir()}
    assert "agrees on" in (report / "report.md").read_text()


def test_every_command_in_docs_tools_runs_on_a_tiny_checkpoint(checkpoint_and_data, tmp_path):
    """The first merge and the report in process, through the entry points the `python -m` lines call (each CLI
    is ~5 s here, dominated by opening the dataset); every command as a subprocess is the slow test below."""
    from vla.tools import merge_experts, routing_report

    mains = {"vla.tools.merge_experts": merge_experts.main, "vla.tools.routing_report": routing_report.main}
    commands = reduced_doc_commands(*checkpoint_and_data, tmp_path)
    for argv in (commands[0], commands[-1]):
        assert argv[0] == "-m"
        mains[argv[1]](argv[2:])
    check_doc_outputs(tmp_path, merged_names=("tiny-cpu-k2",))


@pytest.mark.slow
def test_every_command_in_docs_tools_runs_as_a_subprocess(checkpoint_and_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MUJOCO_GL": "egl"}
    for argv in reduced_doc_commands(*checkpoint_and_data, tmp_path):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"
    check_doc_outputs(tmp_path)

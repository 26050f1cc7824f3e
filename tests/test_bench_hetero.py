"""bench/bench_hetero.py: what each arm runs (the commands a user types) and how its rows read finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_bench_run import load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_hetero.py"


@pytest.fixture
def hetero(monkeypatch, tmp_path):
    module = load_bench(BENCH, monkeypatch)
    calls: list[list[str]] = []
    monkeypatch.setattr(module.BL, "stage", lambda cmd, log: calls.append(cmd))
    plan = module.make_plan(quick=True)
    plan.work, plan.data, plan.figures = tmp_path / "work", tmp_path / "data", tmp_path / "routing"
    return module, plan, calls


def flag(cmd: list[str], name: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def test_pretraining_evaluates_every_embodiment_and_reports_the_routers(hetero):
    module, plan, calls = hetero
    module.pretrain(plan, "himoe")
    train, *evals, report = calls
    mixture = yaml.safe_load(Path(flag(train, "--data.mixture")).read_text())
    assert {Path(e["dataset"]).parent for e in mixture["datasets"]} == {plan.data}
    assert Path(mixture["embodiments_file"]).is_file()
    assert flag(train, "--action.layers") == "as,hb,hb,hb,hb,as"
    assert [Path(flag(c, "--out")).name for c in evals] == [f"eval-{e}" for e in module.pretrain_embodiments()]
    assert len(evals) == 5 and "eval/libero.py" in evals[0] and all("eval/robosuite.py" in c for c in evals[1:])
    assert report[report.index("-m") + 1] == "vla.tools.routing_report"
    calls.clear()
    module.pretrain(plan, "dense")
    assert not any("vla.tools.routing_report" in c for c in calls)  # nothing routed


def test_fine_tuning_starts_from_the_pretrained_run_on_the_new_robots_demos(hetero, monkeypatch):
    module, plan, calls = hetero
    with pytest.raises(RuntimeError, match="run the pre-mode arm first"):
        module.fine_tune(plan, "mode")
    monkeypatch.setattr(module, "read_last", lambda run_dir: "step-000008")
    module.fine_tune(plan, "mode")
    trains = [c for c in calls if "train.py" in c]
    assert [(flag(c, "--train.run_name"), flag(c, "--train.freeze_routers")) for c in trains] == [
        ("ft-mode-10", "false"), ("ft-mode-10-frozen", "true"), ("ft-mode-25", "false"), ("ft-mode-25-frozen", "true")]
    for c in trains:
        assert flag(c, "--train.init_from").endswith("pre-mode/last")
        assert flag(c, "--config").endswith("pre-mode/config.json")
    ten = yaml.safe_load(Path(flag(trains[0], "--data.mixture")).read_text())["datasets"]
    assert [Path(e["dataset"]).name for e in ten] == ["robosuite_kinova3_lift_stack_10"]
    assert [e["embodiment"] for e in ten] == [module.NEW_ROBOT]
    evals = [c for c in calls if "eval/robosuite.py" in c]
    assert len(evals) == 4 and all(flag(c, "--robot") == "kinova3_osc_pose" for c in evals)
    assert module.fine_tunes("dense") == [(10, False), (25, False)]  # no routers to freeze


def write_eval(path: Path, successes: int, episodes: int) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"summary": {"successes": successes, "episodes": episodes}}))


def test_new_robot_rows_give_the_difference_from_scratch_with_its_standard_error(hetero):
    module, plan, _ = hetero
    robot = module.NEW_ROBOT
    for demos, (ft, scratch) in {10: (30, 20), 25: (26, 25)}.items():
        write_eval(plan.work / f"ft-dense-{demos}" / f"eval-{robot}", ft, 50)
        write_eval(plan.work / f"scratch-dense-{demos}" / f"eval-{robot}", scratch, 50)
    rows = module.new_robot_rows(plan, "dense", "ft")
    ten, twenty_five = (r["figures"] for r in rows)
    assert ten["difference"] == pytest.approx(0.2) and twenty_five["difference"] == pytest.approx(0.02)
    se = ((0.6 * 0.4 / 50) + (0.4 * 0.6 / 50)) ** 0.5
    assert ten["se_difference"] == pytest.approx(round(se, 3))
    assert ten["within_noise"] is False and twenty_five["within_noise"] is True
    assert module.parse_arms("data,ft-dense") == ["data", "ft-dense"]
    with pytest.raises(SystemExit, match="unknown arm"):
        module.parse_arms("pre-sawyer")


def test_the_seeds_arm_repeats_the_ten_demo_runs_at_other_seeds_and_pools_them(hetero, monkeypatch):
    module, plan, calls = hetero
    with pytest.raises(RuntimeError, match="run the pre-himoe arm first"):
        module.repeat_seeds(plan, "himoe")
    monkeypatch.setattr(module, "read_last", lambda run_dir: "step-000008")
    module.repeat_seeds(plan, "himoe")
    trains = [c for c in calls if "train.py" in c]
    seeds = (0, *module.REPEAT_SEEDS)
    assert [(flag(c, "--train.run_name"), flag(c, "--train.seed"), flag(c, "--data.seed")) for c in trains] == [
        (module.seed_run_name(kind, "himoe", s), str(s), str(s)) for s in seeds for kind in ("ft", "scratch")]
    assert module.seed_run_name("ft", "himoe", 0) == "ft-himoe-10"  # the ft arm's run, reused at seed 0
    ft, scratch = trains[2], trains[3]
    assert flag(ft, "--train.init_from").endswith("pre-himoe/last") and flag(ft, "--train.freeze_routers") == "false"
    assert "--train.init_from" not in scratch and flag(scratch, "--action.layers") == "as,hb,hb,hb,hb,as"
    assert {flag(c, "--data.mixture") for c in trains} == {str(plan.work / "new_robot_10.yaml")}
    assert [flag(c, "--out") for c in calls if "eval/robosuite.py" in c] == [
        str(plan.work / flag(c, "--train.run_name") / f"eval-{module.NEW_ROBOT}") for c in trains]

    robot = module.NEW_ROBOT
    for s, (ft_wins, scratch_wins) in zip(seeds, [(20, 10), (15, 10), (25, 10)], strict=True):
        write_eval(plan.work / module.seed_run_name("ft", "dense", s) / f"eval-{robot}", ft_wins, 50)
        write_eval(plan.work / module.seed_run_name("scratch", "dense", s) / f"eval-{robot}", scratch_wins, 50)
    (row,) = module.seeds_rows(plan, "dense")
    figures = row["figures"]
    assert row["value"] == pytest.approx(0.2) and figures["ft_per_seed"] == [0.4, 0.3, 0.5]
    assert figures["scratch_success"] == 0.2 and figures["episodes_each"] == 150
    assert figures["se_difference_episodes"] == pytest.approx(round((0.4 * 0.6 / 150 + 0.2 * 0.8 / 150) ** 0.5, 3))
    assert figures["se_difference_seeds"] == pytest.approx(round(0.1 / 3 ** 0.5, 3))  # per-seed 0.2, 0.1, 0.3
    assert figures["within_noise"] is False
    assert "seeds-dense" in module.arm_names() and module.parse_arms("seeds-mode") == ["seeds-mode"]


def test_the_as_study_varies_only_the_as_reg_weight_and_reads_the_as_layers(hetero, monkeypatch):
    module, plan, calls = hetero
    module.as_study(plan)
    trains = [c for c in calls if "train.py" in c]
    reports = [c for c in calls if "vla.tools.routing_report" in c]
    assert [float(flag(c, "--action.as_reg_weight")) for c in trains] == list(module.AS_REG_WEIGHTS)
    assert {flag(c, "--preset") for c in trains} == {"tiny-cpu"} and len(set(map(tuple, trains))) == len(trains)
    assert [Path(flag(c, "--out")) for c in reports] == [
        plan.work / module.as_study_run(w) / "routing" for w in module.AS_REG_WEIGHTS]

    def layer(index, kind, embodiment):
        return {"layer": index, "kind": kind, "specialisation": {
            "embodiment": {"separation": embodiment}, "action space": {"separation": embodiment},
            "step": {"separation": 0.5}}}

    for i, weight in enumerate(module.AS_REG_WEIGHTS):
        out = plan.work / module.as_study_run(weight) / "routing"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"layers": [
            layer(0, "as", 0.2 * i), layer(1, "nm", 0.9), layer(5, "as", 0.4 * i)]}))
    monkeypatch.setattr(module.BL, "scalars", lambda run_dir: {
        "loss/action_loss": [(s, 1.0 / s) for s in range(1, 11)], "loss/as_reg": [(1, 3.43), (10, 1.5)]})
    monkeypatch.setattr(module, "router_gradients", lambda run_dir, mixture: {"layer0_as_reg_over_action": 0.5})
    rows = module.as_study_rows(plan)
    assert [r["value"] for r in rows] == pytest.approx([0.0, 0.3, 0.6])  # mean of the two as layers, nm ignored
    assert rows[1]["figures"]["layer5_as_embodiment"] == 0.4 and "layer1_nm_embodiment" not in rows[1]["figures"]
    assert rows[0]["figures"]["final_action_loss"] == 0.1 and rows[0]["figures"]["as_reg_last"] == 1.5


def test_training_figures_keep_the_action_loss_apart_from_the_weighted_router_losses(hetero, monkeypatch):
    module, plan, _ = hetero
    monkeypatch.setattr(module.BL, "scalars", lambda run_dir: {
        "loss/loss": [(s, 0.5) for s in range(1, 21)], "loss/action_loss": [(s, 0.2) for s in range(1, 21)],
        "perf/steps_per_s": [(10, 1.0), (20, 1.2), (30, 1.1)]})
    monkeypatch.setattr(module.BL, "head_parameters", lambda run_dir: (8.7, 5.55))
    figures = module.training_figures(plan.work / "pre-tiny-cpu")
    assert figures["final_loss"] == 0.5 and figures["final_action_loss"] == 0.2  # heads compare on the second
    assert figures["steps"] == 20 and figures["train_steps_per_s"] == 1.1


def test_router_gradients_weigh_as_reg_against_the_action_loss_on_a_real_policy(write_lerobot_dataset, tmp_path,
                                                                                  monkeypatch):
    """On a two-robot mixture the weighted AS-Reg moves the `as` router: ten times the weight, ten times the ratio
    (same batches, same noise: the action loss's gradient does not depend on the weight)."""
    import dataclasses

    import torch
    from test_tools import normalizer, tiny_config

    from vla.policy import VLAPolicy

    module = load_bench(BENCH, monkeypatch)
    robots = {"libero_panda": 7, "robosuite_ur5e_osc": 4}
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"datasets": [
        {"dataset": str(write_lerobot_dataset(tmp_path / name, robot_type=name, action_dim=dim, state_dim=8,
                                              episodes=(8, 8))),
         "weight": 1.0, "embodiment": name, "cameras": {"agentview": "base", "wrist": "wrist"}}
        for name, dim in robots.items()]}))
    ratios = []
    for weight in (1.0, 10.0):
        cfg = tiny_config()
        cfg.action = dataclasses.replace(cfg.action, as_reg_weight=weight)
        torch.manual_seed(0)
        VLAPolicy(cfg, normalizer=normalizer()).save_pretrained(tmp_path / f"run-{weight}" / "last")
        torch.manual_seed(1)
        ratios.append(module.router_gradients(tmp_path / f"run-{weight}", mixture, batches=2))
    as_layers = [i for i, kind in enumerate(cfg.action.layer_kinds) if kind == "as"]
    assert set(ratios[0]) == {f"layer{i}_as_reg_over_action" for i in as_layers} and as_layers
    for key, low in ratios[0].items():
        assert 0 < low < float("inf") and ratios[1][key] == pytest.approx(10 * low, rel=0.02)


@pytest.mark.slow
def test_the_quick_pipeline_pretrains_fine_tunes_and_reports_for_real(monkeypatch, tmp_path):
    """`bench_hetero.py --quick` at its smallest: real generators, training, per-robot evaluations, routing report."""
    module = load_bench(BENCH, monkeypatch)
    plan = module.make_plan(quick=True)
    plan.work, plan.data, plan.figures = tmp_path / "work", tmp_path / "data", tmp_path / "routing"
    rows = module.compare(plan, ["data", "pre-tiny-cpu", "scratch-tiny-cpu", "ft-tiny-cpu"])
    assert not [r for r in rows if r["value"] == "error"], rows
    data = [r for r in rows if r["benchmark"].startswith("hetero data")]
    assert len(data) == len(module.GENERATORS) and all(r["figures"]["episodes"] >= 1 for r in data)
    pooled, routing, *new_robot = rows[len(data):]
    assert pooled["benchmark"] == "hetero pretrain: tiny-cpu" and 0.0 <= pooled["value"] <= 1.0
    assert {f"{e}_episodes" for e in module.pretrain_embodiments()} <= set(pooled["figures"])
    assert routing["figures"] and (plan.figures / "tiny-cpu" / "report.md").is_file()
    assert len(list((plan.figures / "tiny-cpu").glob("layer*_usage.png"))) == 6
    fine_tuned = [r for r in new_robot if r["metric"].startswith("fine-tuned")]
    assert len(fine_tuned) == 4 and all("difference" in r["figures"] for r in fine_tuned)

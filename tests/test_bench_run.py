"""bench/run.py bookkeeping: the rows a partial run keeps, modes, failures, module selection; the bench modules'
error paths."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH_RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_bench(path: Path, monkeypatch):
    """Import a bench/ script as run.py does, undoing its sys.modules and sys.path changes after the test."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # bench_learning puts the repository on sys.path
    spec.loader.exec_module(module)
    return module


def row(module: str, benchmark: str, value: float) -> dict:
    return {"module": module, "benchmark": benchmark, "metric": "success", "value": value}


def test_partial_runs_keep_the_rows_they_do_not_replace(tmp_path, monkeypatch):
    run = load_bench(BENCH_RUN, monkeypatch)
    old = [row("bench_learning", "learning: dense", 0.82), row("bench_learning", "learning: mode", 0.5),
           row("bench_policy", "chunk rate", 13.0)]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"date": "before"}, "results": old}))
    new = [row("bench_learning", "learning: mode", 0.68)]

    # bench_learning ran some arms only: its other arms' rows and every other module's rows stay
    kept = run.kept_rows(tmp_path, replaced=set(), new=new)
    assert [(r["benchmark"], r["value"]) for r in kept] == [("learning: dense", 0.82), ("chunk rate", 13.0)]
    assert all(r["date"] == "before" for r in kept)

    # bench_learning ran in full: only the other modules' rows stay
    kept = run.kept_rows(tmp_path, replaced={"bench_learning"}, new=new)
    assert [r["benchmark"] for r in kept] == ["chunk rate"]


def test_bench_learning_is_partial_when_some_arms_are_chosen(monkeypatch):
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    monkeypatch.delenv(module.ARMS_ENV, raising=False)
    assert not module.partial()
    monkeypatch.setenv(module.ARMS_ENV, "dense,mode")
    assert module.partial()
    monkeypatch.setenv(module.ARMS_ENV, ",".join(module.ARMS))
    assert not module.partial()


def test_lerobot_log_of_a_resumed_run_keeps_the_later_record_of_each_step(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from vla.training.layout import point_last_to

    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    ckpt = tmp_path / "step-000050"
    ckpt.mkdir()
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(5)}, str(ckpt / "model.safetensors"))
    point_last_to(tmp_path, ckpt)
    # steps 25 and 50 were logged, the run stopped before its next checkpoint, and resumed from step 25
    records = [(25, 0.5, 0.2), (50, 0.4, 0.2), (50, 0.3, 0.25), (75, 0.2, 0.25)]
    (tmp_path / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": loss, "steps_per_s": rate}) + "\n" for s, loss, rate in records))

    losses, rates, params_m = module.lerobot_training_log(tmp_path)
    assert losses == [(25, 0.5), (50, 0.3), (75, 0.2)]
    assert rates == [0.2, 0.25, 0.25]
    assert params_m == 17 / 1e6


# ---- modes, failures and module selection ------------------------------------------------------------------------


def test_a_quick_run_never_replaces_or_removes_a_full_row(tmp_path, monkeypatch):
    run = load_bench(BENCH_RUN, monkeypatch)
    old = [{**row("bench_policy", "chunk rate", 19.8), "mode": "full", "date": "d1"},
           {**row("bench_policy", "chunk rate 96px", 18.8), "mode": "full", "date": "d1"},
           {**row("bench_data", "loader", 300.0), "mode": "quick", "date": "d0"}]
    new = [{**row("bench_policy", "chunk rate", 7.0), "mode": "quick"},
           {**row("bench_data", "loader", 350.0), "mode": "quick"},
           {**row("bench_data", "new metric", 1.0), "mode": "quick"}]
    rows, dropped = run.merge(old, new, replaced={"bench_policy", "bench_data"}, quick=True)
    by_key = {r["benchmark"]: (r["value"], r["mode"]) for r in rows}
    assert by_key == {"chunk rate": (19.8, "full"), "chunk rate 96px": (18.8, "full"),
                      "loader": (350.0, "quick"), "new metric": (1.0, "quick")}
    assert [r["value"] for r in dropped] == [7.0]

    # a full run replaces quick and full rows of the modules it ran
    rows, dropped = run.merge(old, [{**row("bench_policy", "chunk rate", 20.5), "mode": "full"}],
                              replaced={"bench_policy"}, quick=False)
    assert {r["benchmark"]: r["value"] for r in rows} == {"chunk rate": 20.5, "loader": 300.0} and not dropped


def test_quick_rows_are_marked_in_the_table_whatever_the_mode_of_the_last_run(monkeypatch):
    run = load_bench(BENCH_RUN, monkeypatch)
    meta = {"date": "2026-12-01 10:00", "machine": "x86_64", "threads": 2, "torch": "2", "quick": False}
    rows = [{**row("bench_data", "loader", 300.0), "mode": "quick", "date": "2026-11-25 22:52"},
            {**row("bench_policy", "chunk rate", 19.8), "mode": "full", "date": "2026-12-01 10:00"}]
    lines = {line.split(" | ")[0].strip("| "): line for line in run.to_markdown(rows, meta).splitlines()
             if line.startswith("| ") and "---" not in line}
    assert "| **quick** |" in lines["loader"] and "(measured 2026-11-25 22:52)" in lines["loader"]
    assert "| full |" in lines["chunk rate"] and "quick" not in lines["chunk rate"]
    assert "1 row(s) marked **quick**" in run.to_markdown(rows, meta)


def write_benches(where: Path, **bodies: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (where / f"bench_{name}.py").write_text(f"def run(quick):\n    {body}\n")


def test_a_failed_measurement_fails_the_run_loudly_and_the_page_shows_it(tmp_path, monkeypatch, capsys):
    run = load_bench(BENCH_RUN, monkeypatch)
    benches = tmp_path / "bench"
    ok = 'return [{"benchmark": "ok", "metric": "m", "value": 1.0, "goal": "", "met": None}]'
    write_benches(benches, ok=ok,
                  arm='return [{"benchmark": "learning: x", "metric": "m", "value": "error", "error": "boom"}]',
                  raises='raise RuntimeError("simulator broke")')
    monkeypatch.setattr(run, "HERE", benches)
    with pytest.raises(SystemExit) as e:
        run.main(["--out", str(tmp_path / "out")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "BENCHMARKS FAILED" in err and "boom" in err and "simulator broke" in err
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert {r["benchmark"]: r["mode"] for r in results} == {"ok": "full", "learning: x": "full", "bench_raises": "full"}
    assert "FAILED: RuntimeError: simulator broke" in (tmp_path / "out" / "results.md").read_text()

    write_benches(benches, arm=ok, raises=ok)  # every measurement succeeds: exit 0
    run.main(["--out", str(tmp_path / "out")])


def test_only_and_skip_choose_modules_and_keep_the_other_rows(tmp_path, monkeypatch):
    run = load_bench(BENCH_RUN, monkeypatch)
    benches = tmp_path / "bench"
    write_benches(benches, **{name: f'return [{{"benchmark": "{name}", "metric": "m", "value": {value}}}]'
                              for name, value in (("a", 1.0), ("b", 2.0), ("c", 3.0))})
    monkeypatch.setattr(run, "HERE", benches)
    assert [p.stem for p in run.discover(None, "b,c")] == ["bench_a"]
    assert [p.stem for p in run.discover("bench_b")] == ["bench_b"]
    with pytest.raises(SystemExit, match="no benchmark named"):
        run.discover("nope")

    out = tmp_path / "out"
    run.main(["--out", str(out)])
    write_benches(benches, b='return [{"benchmark": "b", "metric": "m", "value": 20.0}]')
    run.main(["--out", str(out), "--only", "b"])
    assert {r["benchmark"]: r["value"] for r in json.loads((out / "results.json").read_text())["results"]} == {
        "a": 1.0, "b": 20.0, "c": 3.0}
    write_benches(benches, a='return [{"benchmark": "a", "metric": "m", "value": 10.0}]')
    run.main(["--out", str(out), "--skip", "b,c", "--quick"])
    rows = {r["benchmark"]: (r["value"], r["mode"]) for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows == {"a": (1.0, "full"), "b": (20.0, "full"), "c": (3.0, "full")}  # the quick a is not recorded


def test_a_failing_learning_arm_is_an_error_row(monkeypatch, tmp_path):
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    monkeypatch.setattr(module, "ensure_data", lambda plan, ur5e: None)

    def train_and_evaluate(plan, arm):
        raise RuntimeError("`train.py --preset ...` failed (exit 1)")

    monkeypatch.setattr(module, "train_and_evaluate", train_and_evaluate)
    rows = module.compare(module.make_plan(quick=True), ["dense"])
    run = load_bench(BENCH_RUN, monkeypatch)
    assert run.failed_rows(rows) == rows and "failed (exit 1)" in rows[0]["error"]


def test_bench_sim_fails_when_the_policy_does_not_build(monkeypatch):
    """The time split must time the policy it names, never a random stand-in."""
    monkeypatch.syspath_prepend(str(BENCH_RUN.parent))
    module = load_bench(BENCH_RUN.parent / "bench_sim.py", monkeypatch)

    def broken(*args, **kwargs):
        raise ImportError("no compact backbone")

    monkeypatch.setattr(module, "tiny_cpu_policy", broken)
    monkeypatch.setattr(module, "evaluate_libero", lambda *a, **k: pytest.fail("ran episodes without the policy"))
    with pytest.raises(ImportError, match="no compact backbone"):
        module.run(quick=True)


def test_no_goal_is_one_that_cannot_be_missed():
    """'report' is not a goal: a row has a goal it could miss, or none (bench/results.json as committed)."""
    results = json.loads((BENCH_RUN.parent / "results.json").read_text())["results"]
    assert not [r["benchmark"] for r in results if r.get("goal") == "report"]
    assert all(r.get("mode") in ("full", "quick") for r in results), "every recorded row names its mode"


def test_bench_learning_quick_plans_a_reduced_run_and_its_flags_reach_the_plan(monkeypatch):
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    plan = module.make_plan(quick=True)
    assert plan.work == BENCH_RUN.parent / "_work" / "learning_quick" and plan.demos == 2 and plan.workers == 1
    flags = dict(zip(plan.train_args[::2], plan.train_args[1::2], strict=True))
    assert flags["--train.steps"] == "16" and flags["--data.batch_size"] == "4"
    assert plan.eval_args[:2] == ["--episodes", "1"] and "--max-steps" in plan.eval_args
    full = module.make_plan(quick=False)
    assert full.eval_args == ["--episodes", "50"] and full.demos == 50 and not full.train_args

    seen = {}

    def compare(plan, arms):
        seen.update(plan=plan, arms=arms)
        return [{"benchmark": "learning: dense", "value": 0.5}]

    monkeypatch.setattr(module, "compare", compare)
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "--quick", "--arms", "dense,moh", "--steps", "3",
                                      "--episodes", "2"])
    module.main()
    assert seen["arms"] == ["dense", "moh"]
    assert seen["plan"].train_args[:2] == ["--train.steps", "3"] and seen["plan"].eval_args[:2] == ["--episodes", "2"]
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "--arms", "dense,nope"])
    with pytest.raises(SystemExit, match="unknown arm"):
        module.main()


def test_the_lerobot_comparison_row_is_an_arm_the_bench_trains(monkeypatch):
    """The tiny-cpu figure on lerobot's 2400-step schedule comes from an arm of its own, at full size only."""
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    arm = module.ARMS["tiny-cpu-2400"]
    full = module.arm_train_args(module.make_plan(quick=False), arm)
    assert full[full.index("--train.steps") + 1] == str(module.LEROBOT_STEPS)
    quick = module.arm_train_args(module.make_plan(quick=True), arm)
    assert quick.count("--train.steps") == 1 and quick[quick.index("--train.steps") + 1] == "16"
    assert "--train.steps" not in module.arm_train_args(module.make_plan(quick=False), module.ARMS["tiny-cpu"])


@pytest.mark.parametrize(("validation_successes", "headline"), [
    ({5: 30, 3: 28, 10: 41}, ("eval-steps10", "objective.num_inference_steps=10")),
    ({5: 30, 3: 30, 10: 30}, ("eval", None)),  # a tie keeps the arm's own setting
])
def test_the_headline_setting_is_chosen_on_validation_episodes_only(monkeypatch, tmp_path, validation_successes,
                                                                     headline):
    """The tiny-cpu arm's flow-step candidates run on validation episodes first; the official init states are
    evaluated once, at the candidate with the best validation success."""
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    calls: list[list[str]] = []

    def stage(cmd, log):
        calls.append(cmd)
        if "--init-states" in cmd:
            steps = int(next(c for c in cmd if c.startswith("objective.num_inference_steps=")).rsplit("=", 1)[1])
            fake_eval(Path(cmd[cmd.index("--out") + 1]), validation_successes[steps], 50)

    monkeypatch.setattr(module, "stage", stage)
    plan = module.make_plan(quick=True)
    plan.work = tmp_path
    module.train_and_evaluate(plan, module.ARMS["tiny-cpu"])
    evals = [c for c in calls if "eval/libero.py" in c]
    *tuned, official = evals
    assert len(tuned) == len(module.FLOW_STEPS) > 1
    for cmd, steps in zip(tuned, module.FLOW_STEPS, strict=True):
        assert cmd[cmd.index("--init-states") + 1] == "validation"
        assert f"objective.num_inference_steps={steps}" in cmd
        assert cmd[cmd.index("--out") + 1].endswith(f"val-steps{steps}")
    out, setting = headline
    assert "--init-states" not in official  # the headline: official init states
    assert official[official.index("--out") + 1] == str(tmp_path / "tiny-cpu" / out)
    assert [c for c in official if c.startswith("objective.")] == ([setting] if setting else [])


def test_an_arm_s_own_setting_is_its_first_candidate(monkeypatch):
    """Every tuned arm lists its own setting first, so a tie (or the first candidate winning) reports `eval/`, the
    evaluation the arm runs without tuning; a better candidate replaces that setting, it is not added to it."""
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    tuned = [arm for arm in module.ARMS.values() if arm.tune]
    assert {arm.name for arm in tuned} >= {"tiny-cpu", "tiny-cpu-2400", "moh", "moh-ref"}
    for arm in tuned:
        own = arm.evals[0][1]
        assert not own or own == arm.tune[0][1], arm.name
        assert module.official_evals(arm, 0) == arm.evals
        out, flags = module.official_evals(arm, 1)[0]
        assert out == "eval-" + arm.tune[1][0].removeprefix("val-") and flags == arm.tune[1][1]
        assert module.official_evals(arm, 1)[1:] == arm.evals[1:]


def fake_eval(out: Path, successes: int, episodes: int, sha256: str = "aaa", **protocol) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"policy": {"checkpoint": None, "sha256": sha256}}))
    (out / "results.json").write_text(json.dumps({
        "complete": True, "policy": {"checkpoint": None, "sha256": sha256}, "summary": {"successes": successes, "episodes": episodes,
                                      "success_rate": successes / episodes, "actions_per_query": 5.0},
        "protocol": {"suite": "libero_object", "tasks": [0], "episodes_per_task": episodes, "image_size": 128,
                     "replan_steps": 5, "seed": 7, **protocol}}))


def test_served_libero_repeats_the_in_process_protocol_through_the_server(monkeypatch, tmp_path):
    module = load_bench(BENCH_RUN.parent / "bench_serve.py", monkeypatch)
    assert module.served_libero(tmp_path) is None  # no trained arm: nothing measured
    (tmp_path / "last").mkdir()
    fake_eval(tmp_path / "eval", 40, 50, image_size=96)

    class Server:
        def __init__(self, checkpoint, max_batch, threads):
            self.port, self.stopped = 1234, False
            assert checkpoint == tmp_path / "last"

        def stop(self):
            self.stopped = True

    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        fake_eval(tmp_path / "eval-served", 36, 50)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(module, "_Server", Server)
    monkeypatch.setattr(module.subprocess, "run", run)
    row = module.served_libero(tmp_path)
    (cmd,) = commands
    assert cmd[cmd.index("--remote") + 1] == "ws://127.0.0.1:1234"
    assert cmd[cmd.index("--image-size") + 1] == "96" and cmd[cmd.index("--replan-steps") + 1] == "5"
    assert row["figures"]["difference"] == pytest.approx(-0.08) and row["met"] is True
    module.served_libero(tmp_path)
    assert len(commands) == 1  # a finished served evaluation is read again, not re-run
    fake_eval(tmp_path / "eval", 30, 50, sha256="bbb", image_size=96)  # the arm was trained again
    module.served_libero(tmp_path)
    assert len(commands) == 2 and "--overwrite" in commands[-1]  # the old served run is not reported beside it


def test_merged_variants_are_scored_with_the_arms_own_protocol(monkeypatch, tmp_path):
    module = load_bench(BENCH_RUN.parent / "bench_merge.py", monkeypatch)
    assert "K=1 uniform" in module.libero_variants()
    monkeypatch.setenv(module.LIBERO_ENV, "none")
    assert module.libero_variants() == set()

    class Policy:
        def save_pretrained(self, out):
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")

    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        fake_eval(tmp_path / "merged" / "eval", 30, 50)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(module.subprocess, "run", run)
    fake_eval(tmp_path / "eval", 42, 50, image_size=96)
    local = json.loads((tmp_path / "eval" / "results.json").read_text())
    summary = module.libero_success(Policy(), tmp_path / "merged", local["protocol"], "aaa")
    (cmd,) = commands
    assert cmd[cmd.index("--policy") + 1] == str(tmp_path / "merged")
    assert cmd[cmd.index("--image-size") + 1] == "96"
    module.libero_success(Policy(), tmp_path / "merged", local["protocol"], "aaa")
    assert len(commands) == 1  # the same source checkpoint: read again
    module.libero_success(Policy(), tmp_path / "merged", local["protocol"], "bbb")
    assert len(commands) == 2  # merged from a retrained arm: merged and evaluated again
    row = module.libero_row("tiny-cpu", "K=1 mcsmoe", summary, local["summary"])
    assert row["value"] == 0.6 and row["figures"]["difference"] == pytest.approx(-0.24)


def test_a_reference_arm_leaves_alone_the_options_of_layer_kinds_its_reference_lacks(monkeypatch):
    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    mode, moh = ["nm"] * 12, ["d"] * 18
    assert module.follows_reference("action.nm_router", mode) and not module.follows_reference("action.as_reg_weight",
                                                                                                mode)
    assert module.follows_reference("action.expert_ffn_dim", mode) and not module.follows_reference(
        "action.expert_ffn_dim", moh)
    assert module.follows_reference("action.norm", moh) and module.follows_reference("objective.kind", moh)
    flags = module.ARMS["moh-ref"].overrides
    assert "--action.expert_ffn_dim" not in flags and "--action.as_reg_weight" not in flags
    assert "--action.as_reg_weight" not in module.ARMS["mode-ref"].overrides


@pytest.mark.parametrize(("arm_name", "preset", "old_arm"), [("himoe-ref", "himoe-paligemma", "himoe"),
                                                           ("mode-ref", "mode", "mode"),
                                                           ("moh-ref", "moh-pi0", "moh")])
def test_a_reference_arm_is_its_preset_at_tiny_cpu_size(monkeypatch, arm_name, preset, old_arm):
    """Every action and objective option of the reference preset reaches the arm's config; only the size is
    tiny-cpu's (width, heads, the old arm's layer pattern, FFN widths at the preset's ratio to the width)."""
    from vla.config import apply_overrides, field_types, get_preset

    module = load_bench(BENCH_RUN.parent / "bench_learning.py", monkeypatch)
    flags = module.ARMS[arm_name].overrides
    overrides = dict(zip((f.removeprefix("--") for f in flags[::2]), flags[1::2], strict=True))
    cfg = apply_overrides(get_preset("tiny-cpu"), overrides)
    old = apply_overrides(get_preset("tiny-cpu"), dict(zip(
        (f.removeprefix("--") for f in module.ARMS[old_arm].overrides[::2]), module.ARMS[old_arm].overrides[1::2],
        strict=True)))
    ref, tiny = get_preset(preset), get_preset("tiny-cpu")
    assert cfg.action.layers == old.action.layers  # the comparison with the earlier arm changes the options only
    assert (cfg.action.width, cfg.action.num_heads) == (tiny.action.width, tiny.action.num_heads)
    assert cfg.backbone == tiny.backbone and cfg.train == tiny.train and cfg.data == tiny.data
    if arm_name == "moh-ref":  # the moh arm's horizons: the reference's 10 are out of this CPU's reach
        assert (cfg.action.chunk_size, cfg.action.moh.horizons) == (old.action.chunk_size, old.action.moh.horizons)
    for name in field_types():
        section, _, leaf = name.partition(".")
        if section not in ("action", "objective") or leaf in ("width", "num_heads", "layers"):
            continue
        mine, theirs = module._dotted(cfg, name), module._dotted(ref, name)
        if not module.follows_reference(name, ref.action.layer_kinds):  # a kind the reference has no layer of
            assert mine == module._dotted(tiny, name), name
            continue
        if arm_name == "moh-ref" and name in module.MOH_REF_SIZE:  # sized down for this CPU, as documented
            assert mine == module.MOH_REF_SIZE[name], name
        elif leaf.endswith("ffn_dim"):
            assert mine * ref.action.width == theirs * tiny.action.width, name  # 4096 at 1024 -> 1024 at 256
        else:
            assert mine == theirs, name


def test_merge_rows_of_arms_without_a_checkpoint_here_are_kept(monkeypatch, tmp_path):
    """A machine that has only some arms' checkpoints re-measures those and keeps the others' rows (with their
    dates): bench_merge says it ran only part of itself, as bench/run.py's partial runs expect."""
    monkeypatch.syspath_prepend(str(BENCH_RUN.parent))
    module = load_bench(BENCH_RUN.parent / "bench_merge.py", monkeypatch)
    monkeypatch.setattr(module, "REPO", tmp_path)
    assert module.partial()  # no checkpoint at all
    for arm in module.ARMS:
        (tmp_path / "checkpoints" / "bench-learning" / arm / "last").mkdir(parents=True)
    assert not module.partial()
    (tmp_path / "checkpoints" / "bench-learning" / module.ARMS[0] / "last").rmdir()
    assert module.partial()


def test_merge_measures_only_the_arms_chosen_and_keeps_the_others(monkeypatch, tmp_path):
    """`VLA_MERGE_ARMS` picks arms (one merge bench need not redo every checkpoint's simulations); choosing some makes
    the run partial, and an unknown arm stops it before any work."""
    monkeypatch.syspath_prepend(str(BENCH_RUN.parent))
    module = load_bench(BENCH_RUN.parent / "bench_merge.py", monkeypatch)
    monkeypatch.setattr(module, "REPO", tmp_path)
    for arm in module.ARMS:
        (tmp_path / "checkpoints" / "bench-learning" / arm / "last").mkdir(parents=True)
    monkeypatch.delenv(module.ARMS_ENV, raising=False)
    assert module.chosen_arms() == module.ARMS and not module.partial()
    monkeypatch.setenv(module.ARMS_ENV, "tiny-cpu-2400, himoe-ref")
    assert module.chosen_arms() == ("tiny-cpu-2400", "himoe-ref") and module.partial()
    measured = []
    monkeypatch.setattr(module, "resolve_checkpoint", lambda last: last)
    policy = SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(mixture="mixture.yaml")))
    monkeypatch.setattr(module.VLAPolicy, "from_pretrained", lambda ckpt: policy)
    monkeypatch.setattr(module, "measure_checkpoint", lambda name, *a, **k: measured.append(name) or [])
    module.run(quick=False)
    assert measured == ["tiny-cpu-2400", "himoe-ref"]
    monkeypatch.setenv(module.ARMS_ENV, "tiny")
    with pytest.raises(SystemExit, match="unknown arm"):
        module.chosen_arms()

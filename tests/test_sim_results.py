"""Shared evaluation outputs and the worker pool: crash-safe logs, resume checks, plots, videos, real processes."""

from __future__ import annotations

import json
import os
import signal
import time

import imageio.v2 as imageio
import numpy as np
import pytest
from fixtures.orphans import assert_workers_die_with_parent

from vla.sim import results as R
from vla.sim.policies import RandomPolicy, as_action, as_chunk, episode_seed, load_policy
from vla.sim.runner import WorkerStartError, run_jobs, threads_per_worker


def test_episode_log_survives_a_torn_last_line(tmp_path):
    log = R.EpisodeLog(tmp_path / "episodes.jsonl")
    log.append({"key": "0/0", "success": True, "value": np.float32(0.5)})
    log.append({"key": "0/1", "success": False})
    log.close()
    with open(log.path, "a") as f:  # a kill in the middle of a write
        f.write('{"key": "0/2", "succ')
    assert [r["key"] for r in R.EpisodeLog(log.path).read()] == ["0/0", "0/1"]
    resumed = R.EpisodeLog(log.path)
    resumed.append({"key": "0/2", "success": True})  # the torn line is cut, not glued to the new record
    resumed.close()
    assert [r["key"] for r in R.EpisodeLog(log.path).read()] == ["0/0", "0/1", "0/2"]
    assert R.EpisodeLog(log.path).read()[0]["value"] == 0.5


def test_episode_log_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        R.EpisodeLog(path).read()


def test_start_run_refuses_to_mix_runs(tmp_path):
    info = {"protocol": {"suite": "libero_object", "max_steps": 280}}
    log = R.start_run(tmp_path, info, resume=False, overwrite=False)
    log.append({"key": "0/0"})
    log.close()
    with pytest.raises(FileExistsError, match="--resume"):
        R.start_run(tmp_path, info, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="max_steps: 280 -> 100"):
        R.start_run(tmp_path, {"protocol": {"suite": "libero_object", "max_steps": 100}}, resume=True, overwrite=False)
    changed = {**info, "policy": {"checkpoint": "/ckpt", "sha256": "other"}}
    with pytest.raises(ValueError, match="the evaluated policy differs"):
        R.start_run(tmp_path, changed, resume=True, overwrite=False)
    assert [r["key"] for r in R.start_run(tmp_path, info, resume=True, overwrite=False).read()] == ["0/0"]
    assert R.start_run(tmp_path, info, resume=False, overwrite=True).read() == []


def test_checkpoint_hash_ignores_its_eval_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    before = R.hash_directory(tmp_path)
    (tmp_path / "eval" / "libero_object").mkdir(parents=True)
    (tmp_path / "eval" / "libero_object" / "results.json").write_text("{}")
    assert R.hash_directory(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert R.hash_directory(tmp_path) != before
    identity = R.policy_identity(str(tmp_path))
    assert identity["checkpoint"] == str(tmp_path.resolve()) and len(identity["sha256"]) == 64
    assert R.policy_identity("random")["object"] == "random"


def test_plot_video_and_table_are_real_files(tmp_path):
    png = R.bar_chart(tmp_path / "plot.png", ["task 0", "task 1"], [0.5, 1.0], title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames = [np.full((33, 47, 3), i * 20, dtype=np.uint8) for i in range(6)]  # odd sides are padded
    video = R.write_video(tmp_path / "v.mp4", frames, fps=4)
    read = imageio.mimread(video)
    assert len(read) == 6 and read[0].shape == (34, 48, 3)
    assert abs(int(read[5].mean()) - 100) <= 3
    table = R.markdown_table(["a", "b"], [["x|y", 0.25]])
    assert table.splitlines()[2] == "| x\\|y | 0.25 |"


def test_policy_helpers():
    assert as_action(np.ones((1, 7)), 7).shape == (7,)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        as_action(np.ones(6), 7)
    with pytest.raises(ValueError, match="non-finite"):
        as_action(np.full(7, np.nan), 7)
    assert as_chunk(np.zeros((1, 4, 7)), 7).shape == (4, 7)
    assert episode_seed(7, 0, 1) == episode_seed(7, 0, 1) != episode_seed(7, 1, 0)
    policy = RandomPolicy(7, chunk=3)
    asked = []
    for _ in range(6):
        asked.append(policy.needs_observation())
        action = policy.select_action({})
        assert action.shape == (7,) and action[-1] in (-1.0, 1.0)
    assert asked == [True, False, False, True, False, False]
    assert isinstance(load_policy("random"), RandomPolicy)
    with pytest.raises(FileNotFoundError):
        load_policy("/nonexistent/checkpoint")


# ---- the worker pool, with real processes ----------------------------------------------------------------------


class EchoWorker:
    """Picklable worker factory: records which process ran each job; `crash` kills the process on that job."""

    def __init__(self, crash: int | None = None, fail_start: bool = False):
        self.crash, self.fail_start = crash, fail_start

    def __call__(self):
        if self.fail_start:
            raise RuntimeError("no simulator here")
        crash = self.crash

        def run(job):
            if job["i"] == crash:
                os.kill(os.getpid(), signal.SIGKILL)
            return {"key": job["key"], "i": job["i"], "pid": os.getpid(), "error": None}

        return run


def _lost(job, message):
    return {"key": job["key"], "i": job["i"], "pid": None, "error": message}


class SleepWorker:
    """Picklable worker factory whose episodes take a minute."""

    def __call__(self):
        def run(job):
            time.sleep(60)
            return {"key": job["key"], "i": job["i"], "pid": os.getpid(), "error": None}

        return run


def test_pool_workers_exit_when_the_evaluation_is_killed():
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_sim_results import SleepWorker\n"
        "from vla.sim.runner import run_jobs\n"
        "run_jobs([{'key': str(i), 'i': i} for i in range(6)], SleepWorker(), num_workers=2,"
        " on_record=print, on_lost=lambda job, message: None)\n"
    )
    assert_workers_die_with_parent(script)


def test_pool_runs_every_job_once_in_two_processes_and_survives_a_dead_worker():
    jobs = [{"key": str(i), "i": i} for i in range(8)]
    records = []
    run_jobs(jobs, EchoWorker(crash=3), num_workers=2, on_record=records.append, on_lost=_lost)
    assert sorted(r["i"] for r in records) == list(range(8))
    by_i = {r["i"]: r for r in records}
    assert "exit code -9" in by_i[3]["error"]
    pids = {r["pid"] for r in records if r["pid"] is not None}
    assert os.getpid() not in pids and len(pids) >= 2  # real worker processes (a replacement after the kill)


class ThreadsWorker:
    """Picklable worker factory that loads torch when it builds (as a policy does) and reports its thread count."""

    def __call__(self):
        import torch

        def run(job):
            return {"key": job["key"], "i": job["i"], "threads": torch.get_num_threads(), "error": None}

        return run


def test_threads_per_worker_splits_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))  # a 6-core machine
    assert [threads_per_worker(n) for n in (1, 2, 3, 4, 8)] == [6, 3, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_per_worker(2) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored, the cores are split
    assert threads_per_worker(2) == 3


def test_pool_workers_take_their_share_of_threads(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # left alone, torch would start one thread per core
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs 2+ cores to tell a shared core count from torch's default")
    parent_threads = torch.get_num_threads()
    records = []
    run_jobs([{"key": str(i), "i": i} for i in range(2)], ThreadsWorker(), num_workers=2,
             on_record=records.append, on_lost=_lost)
    share = threads_per_worker(2)  # pinned by the test above
    assert share < cores and [r["threads"] for r in records] == [share, share]
    assert torch.get_num_threads() == parent_threads  # the caller keeps its own threads


def test_pool_in_process_and_start_errors():
    records = []
    run_jobs([{"key": "a", "i": 0}], EchoWorker(), num_workers=1, on_record=records.append, on_lost=_lost)
    assert records[0]["pid"] == os.getpid()
    with pytest.raises(WorkerStartError, match="no simulator here"):
        run_jobs([{"key": "a", "i": 0}, {"key": "b", "i": 1}], EchoWorker(fail_start=True), num_workers=2,
                 on_record=records.append, on_lost=_lost)


def test_results_json_roundtrip_of_numpy(tmp_path):
    R.write_json(tmp_path / "r.json", {"a": np.int64(3), "b": np.arange(2), "c": (1, 2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 3, "b": [0, 1], "c": [1, 2]}

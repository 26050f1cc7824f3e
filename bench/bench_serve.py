"""Serving cost: round-trip latency through `vla.serve` vs in-process `predict_action_chunk`, 1 and 4 clients.

The `tiny-cpu` preset (untrained: speed does not depend on the weights) is saved with save_pretrained and served by
a real `python -m vla.serve` process on 127.0.0.1, driven by clients speaking openpi's protocol (`vla.serve.client`,
the same frames `openpi-client` sends: two 224 px uint8 cameras, the 8-dim state, a prompt). Measured:

- in-process median ms of one `predict_action_chunk` (batch 1) in the bench process;
- one client: median round-trip ms and the overhead over in-process (serialisation, websocket, validation, queue);
- four concurrent clients: requests/s and median round-trip, once with batching off (`--max-batch 1`: requests
  run one after the other) and once on (`--max-batch 8`: simultaneous requests share a forward pass); the ratio
  of the two request rates is the batching gain.

Every loop is bounded (a fixed number of requests, a timeout per request); the server binds to loopback only.

And the same trained policy scored both ways: when the `tiny-cpu` arm of bench/bench_learning.py has been trained
and evaluated (`checkpoints/bench-learning/tiny-cpu/`), its checkpoint is served and `eval/libero.py --remote`
runs the arm's evaluation again through the server (same suite, task, episodes, render size and replanning, read
from the in-process results.json) into `eval-served/` (resumable). The row gives both success rates and their
difference with its standard error; the goal is agreement within two standard errors. Without that arm the row is
left as it was (`partial()`).

    .venv/bin/python bench/run.py --only serve [--quick]
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1
CLIENTS = 4
IMAGE = 224


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_tiny_cpu(path: Path):
    from vla.config import get_preset
    from vla.data.normalize import Normalizer
    from vla.policy import VLAPolicy

    rng = np.random.default_rng(0)
    normalizer = Normalizer.from_arrays({"libero_panda": {"state": [rng.normal(size=(256, 8))],
                                                          "action": [rng.uniform(-1, 1, size=(256, 7))]}})
    torch.manual_seed(0)
    policy = VLAPolicy(get_preset("tiny-cpu"), normalizer=normalizer).eval()
    policy.save_pretrained(path)
    return policy


def _wire_obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32),
            "prompt": "pick up the alphabet soup and place it in the basket"}


def _vla_obs(seed: int) -> dict:
    o = _wire_obs(seed)
    return {"observation.images.base": o["observation/image"], "observation.images.wrist": o["observation/wrist_image"],
            "observation.state": o["observation/state"], "task": o["prompt"], "embodiment": "libero_panda"}


class _Server:
    def __init__(self, checkpoint: Path, max_batch: int, threads: int = THREADS) -> None:
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vla.serve", "--policy", str(checkpoint), "--port", str(self.port),
             "--max-batch", str(max_batch)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the policy server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _round_trips(uri: str, n: int, seed: int, out: list[float]) -> None:
    from vla.serve.client import OpenpiClient

    client = OpenpiClient(uri, timeout_s=120)
    try:
        client.infer(_wire_obs(seed))  # warm-up (connection, first forward pass)
        for i in range(n):
            obs = _wire_obs(seed * 1000 + i)
            t0 = time.perf_counter()
            answer = client.infer(obs)
            out.append((time.perf_counter() - t0) * 1e3)
            if answer["actions"].ndim != 2:
                raise RuntimeError(f"bad answer shape {answer['actions'].shape}")
    finally:
        client.close()


def _concurrent(uri: str, clients: int, n: int) -> tuple[float, float]:
    """(requests/s, median round-trip ms) of `clients` threads each sending `n` requests back to back."""
    samples: list[list[float]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=_round_trips, args=(uri, n, 10 + i, samples[i])) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done = [x for s in samples for x in s]
    if len(done) != clients * n:
        raise RuntimeError(f"only {len(done)} of {clients * n} requests were answered")
    # rate over the measured requests only: each thread's busy time excludes its warm-up
    busy = max(sum(s) for s in samples) / 1e3
    return clients * n / busy, statistics.median(done)


LEARNED_ARM = ROOT / "checkpoints" / "bench-learning" / "tiny-cpu"
_served_measured = True


def partial() -> bool:
    """True when the served-LIBERO row was not measured (no trained arm): bench/run.py keeps the old one."""
    return not _served_measured


def _success_se(successes: int, episodes: int) -> float:
    p = successes / episodes
    return (p * (1 - p) / episodes) ** 0.5


def served_libero(arm_dir: Path = LEARNED_ARM) -> dict | None:
    """Evaluate the trained arm's checkpoint through `vla.serve` with the protocol of its in-process evaluation;
    None when the arm has not been trained and evaluated."""
    import json

    in_process = arm_dir / "eval" / "results.json"
    if not (arm_dir / "last").exists() or not in_process.is_file():
        return None
    local = json.loads(in_process.read_text())
    if not local.get("complete"):
        return None
    proto, summary = local["protocol"], local["summary"]
    out = arm_dir / "eval-served"
    server = _Server(arm_dir / "last", max_batch=8, threads=2)
    try:
        cmd = [sys.executable, "eval/libero.py", "--remote", f"ws://127.0.0.1:{server.port}", "--suite",
               proto["suite"], "--tasks", ",".join(map(str, proto["tasks"])), "--episodes",
               str(proto["episodes_per_task"]), "--image-size", str(proto["image_size"]), "--replan-steps",
               str(proto["replan_steps"]), "--seed", str(proto["seed"]), "--workers", "2", "--videos", "0",
               "--no-progress", "--out", str(out)]
        done, started = out / "results.json", out / "run.json"
        # a served run of another checkpoint (the arm was trained again since) is started over, not reused; the
        # client records the server's checkpoint hash as the run's policy sha256 (vla.serve.client)
        stale = started.is_file() and (json.loads(started.read_text())["policy"].get("sha256")
                                       != local["policy"].get("sha256"))
        if done.is_file() and not stale and json.loads(done.read_text()).get("complete"):
            pass  # measured before: the rows are read again
        else:
            again = ["--overwrite"] if stale else ["--resume"] if started.exists() else []
            log = arm_dir / "bench-served.log"
            with log.open("a") as f:
                code = subprocess.run(cmd + again, cwd=ROOT,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=f,
                                      stderr=subprocess.STDOUT).returncode
            if code != 0:
                raise RuntimeError(f"served LIBERO evaluation failed (exit {code}); see {log}")
    finally:
        server.stop()
    served = json.loads((out / "results.json").read_text())["summary"]
    p_local, p_served = summary["success_rate"], served["success_rate"]
    se = (_success_se(summary["successes"], summary["episodes"]) ** 2
          + _success_se(served["successes"], served["episodes"]) ** 2) ** 0.5
    diff = p_served - p_local
    return {"benchmark": "serve: LIBERO success of one checkpoint", "metric": "through the server (vs in-process)",
            "value": round(p_served, 3), "goal": "within 2 SE of in-process", "met": abs(diff) <= 2 * se,
            "figures": {"in_process_success": round(p_local, 3), "served_success": round(p_served, 3),
                        "difference": round(diff, 3), "se_difference": round(se, 3),
                        "in_process_successes": summary["successes"], "served_successes": served["successes"],
                        "episodes": served["episodes"],
                        "served_actions_per_query": round(served.get("actions_per_query", 0.0), 2)},
            "notes": f"bench-learning tiny-cpu arm: its in-process eval vs `eval/libero.py --remote` against "
                     f"`python -m vla.serve` (max batch 8, 2 env workers), {proto['suite']} task(s) {proto['tasks']}, "
                     f"{proto['image_size']} px, replan {proto['replan_steps']}, seed {proto['seed']}; the policy's "
                     "sampling noise differs between the two runs, so only agreement within noise is expected"}


def run(quick: bool = False) -> list[dict]:
    global _served_measured
    torch.set_num_threads(THREADS)
    n_single, n_each = (5, 3) if quick else (30, 10)
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        ckpt = Path(tmp) / "tiny-cpu"
        policy = _save_tiny_cpu(ckpt)
        with torch.inference_mode():
            policy.predict_action_chunk(_vla_obs(0))
            local = []
            for i in range(n_single):
                obs = _vla_obs(i)
                t0 = time.perf_counter()
                policy.predict_action_chunk(obs)
                local.append((time.perf_counter() - t0) * 1e3)
        local_ms = statistics.median(local)
        del policy

        figures: dict[str, float] = {"in_process_ms": round(local_ms, 1)}
        for max_batch in (1, 8):
            server = _Server(ckpt, max_batch)
            try:
                uri = f"ws://127.0.0.1:{server.port}"
                if max_batch == 8:
                    single: list[float] = []
                    _round_trips(uri, n_single, 1, single)
                    figures["one_client_ms"] = round(statistics.median(single), 1)
                rate, median = _concurrent(uri, CLIENTS, n_each)
                figures[f"four_clients_req_per_s_batch{max_batch}"] = round(rate, 2)
                figures[f"four_clients_ms_batch{max_batch}"] = round(median, 1)
            finally:
                server.stop()
    overhead = figures["one_client_ms"] - local_ms
    gain = figures["four_clients_req_per_s_batch8"] / figures["four_clients_req_per_s_batch1"]
    notes = (f"tiny-cpu untrained, 2 x {IMAGE} px uint8 cameras over openpi's protocol on 127.0.0.1, server and "
             f"clients on the same {os.cpu_count()}-core machine, {THREADS} torch thread(s) each; "
             f"{n_single} single requests, {CLIENTS} clients x {n_each} requests")
    rows = [
        {"benchmark": "serve: one client", "metric": "round-trip overhead over in-process, ms", "value":
            round(overhead, 1), "goal": "", "met": None, "figures": dict(figures), "notes": notes},
        {"benchmark": "serve: 4 concurrent clients", "metric": "requests/s with batching", "value":
            figures["four_clients_req_per_s_batch8"], "goal": "", "met": None, "figures": dict(figures),
         "notes": notes},
        {"benchmark": "serve: batching gain", "metric": "requests/s batch 8 / batch 1, 4 clients", "value":
            round(gain, 2), "goal": "> 1", "met": gain > 1, "figures": dict(figures), "notes": notes},
    ]
    served = None if quick else served_libero()
    _served_measured = served is not None
    return rows + ([served] if served else [])


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

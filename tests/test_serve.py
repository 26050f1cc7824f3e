"""The policy server (`vla.serve`): a real server process on 127.0.0.1 driven by the real `openpi-client` package.

One server (the `debug` preset with random weights, saved with save_pretrained) is started for the module; each bad
message must get its own error and the server must answer a good request right after; a killed client must not
take it down; SIGTERM must stop it cleanly. `eval/libero.py --remote` runs a short episode against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vla.serve import wire
from vla.serve.engine import EngineConfig, InferenceEngine
from vla.serve.observation import ObservationError, ObservationSpec, parse_key_map

openpi_client = pytest.importorskip("openpi_client", reason="`make setup` installs openpi-client (--no-deps)")
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
MAX_MB = 1.0
CHUNK = 8
DOCS = ROOT / "docs" / "serving.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MUJOCO_GL": "egl", "PYTHONPATH": str(ROOT)}


def save_debug_checkpoint(path: Path) -> Path:
    """The `debug` preset with random weights, 8-action chunks (openpi's protocol replans every 5)."""
    import torch

    from vla.config import get_preset
    from vla.data.normalize import Normalizer
    from vla.policy import VLAPolicy

    rng = np.random.default_rng(0)
    norm = Normalizer.from_arrays({"libero_panda": {"state": [rng.normal(size=(64, 8))],
                                                    "action": [rng.uniform(-1, 1, size=(64, 7))]}})
    cfg = get_preset("debug")
    cfg.action = dataclasses.replace(cfg.action, chunk_size=CHUNK, n_action_steps=4)
    torch.manual_seed(0)
    return VLAPolicy(cfg, normalizer=norm).eval().save_pretrained(path)


class Server:
    """A `python -m vla.serve` process; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, checkpoint: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "vla.serve", "--policy", str(checkpoint), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"server did not come up:\n{log.read_text()}")

    @property
    def uri(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_debug_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


def documented_serve_options() -> list[str]:
    """The options of the serve command in docs/serving.md, less --policy and --port (the tests choose those)."""
    line = next(ln for b in doc_blocks() for ln in b.splitlines() if ln.startswith("python -m vla.serve --"))
    args, out, skip = line.split()[3:], [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--policy", "--port"):
            skip = True
        else:
            out.append(a)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The documented serve command, with an API key and a 1 MB message limit (both exercised below)."""
    srv = Server(checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log", *documented_serve_options(),
                 "--api-key", API_KEY, "--max-message-mb", str(MAX_MB))
    yield srv
    srv.stop()


def client(server: Server, api_key: str | None = API_KEY) -> WebsocketClientPolicy:
    return WebsocketClientPolicy("127.0.0.1", server.port, api_key=api_key)


def libero_obs(seed: int = 0, size: int = 224) -> dict:
    """What openpi's LIBERO client sends."""
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "pick up the alphabet soup and place it in the basket",
    }


def assert_good_answer(c: WebsocketClientPolicy, seed: int = 0) -> dict:
    out = c.infer(libero_obs(seed))
    assert out["actions"].shape == (CHUNK, 7) and out["actions"].dtype == np.float32
    assert np.all(np.isfinite(out["actions"]))
    assert out["server_timing"]["infer_ms"] > 0 and out["policy_timing"]["batch_size"] >= 1
    return out


# ---- wire format and validation (no server) ---------------------------------------------------------------------


def test_wire_format_matches_openpi_both_ways():
    obs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.uint8(7), "s": "text", "n": [1, 2]}
    theirs = msgpack_numpy.unpackb(wire.packb(obs))
    np.testing.assert_array_equal(theirs["a"], obs["a"])
    assert theirs["b"] == 7 and theirs["s"] == "text"
    ours = wire.unpackb(msgpack_numpy.packb(obs))
    np.testing.assert_array_equal(ours["a"], obs["a"])
    assert ours["a"].dtype == np.float32 and ours["b"].dtype == np.uint8


@pytest.mark.parametrize("frame, message", [
    (b"\xc1\x00", "not a valid msgpack frame"),
    (wire.msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]}), "needs 8 bytes"),
    (wire.msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}), "not allowed"),
    (wire.msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}), "non-negative"),
])
def test_wire_refuses_malformed_frames(frame, message):
    with pytest.raises(wire.WireError, match=message):
        wire.unpackb(frame)
    with pytest.raises(wire.WireError, match="dtype"):
        wire.packb({"x": np.array([object()])})


def test_observation_spec_names_each_problem():
    spec = ObservationSpec("libero_panda", ("base", "wrist"), 8,
                           parse_key_map("observation/image=observation.images.base,"
                                         "observation/wrist_image=observation.images.wrist,"
                                         "observation/state=observation.state,prompt=task"))
    good = libero_obs()
    out = spec.validate(good)
    assert out["observation.state"].dtype == np.float32 and out["task"] == good["prompt"]
    cases = [
        ({**good, "observation/state": np.zeros(7)}, r"'observation/state' has shape \(7,\)"),
        ({**good, "observation/state": np.full(8, np.inf)}, r"'observation/state' holds 8 NaN/inf"),
        ({k: v for k, v in good.items() if k != "prompt"}, r"missing key\(s\) \['prompt'\]"),
        ({**good, "extra": 1}, "unknown observation key 'extra'"),
        ({**good, "observation.state": np.zeros(8)}, "sent twice"),
        ({**good, "observation/image": np.zeros((4, 4, 3), np.uint8)}, "4x4 pixels"),
        ({**good, "observation/image": np.zeros((32, 32, 3), np.int16)}, "'observation/image' must be uint8"),
        ({**good, "observation/wrist_image": np.full((32, 32, 3), 2.0, np.float32)}, r"values in \[2, 2\]"),
        ({**good, "observation/state": np.zeros((2, 8))}, r"has shape \(2, 8\), expected \(8,\)"),
        ({**good, "embodiment": "aloha"}, "serves embodiment 'libero_panda'"),
    ]
    for obs, message in cases:
        with pytest.raises(ObservationError, match=message):
            spec.validate(obs)
    with pytest.raises(ValueError, match="CLIENT_KEY=VLA_KEY"):
        parse_key_map("observation/image")


def test_engine_batches_simultaneous_requests_and_reports_errors():
    calls = []

    def predict(batch):
        calls.append(len(batch["task"]))
        if "boom" in batch["task"]:
            raise RuntimeError("boom")
        return np.repeat(batch["observation.state"][:, None, :], 3, axis=1)

    engine = InferenceEngine(predict, EngineConfig(max_batch=4, batch_wait_ms=200))
    try:
        obs = [{"observation.state": np.full(2, i, np.float32), "task": str(i), "embodiment": "e"} for i in range(4)]
        futures = [engine.submit(o) for o in obs]
        results = [f.result(timeout=10) for f in futures]
        assert calls == [4] and [r.batch_size for r in results] == [4] * 4
        assert [float(r.actions[0, 0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
        bad = engine.submit({"observation.state": np.zeros(2, np.float32), "task": "boom", "embodiment": "e"})
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=10)
        assert engine.submit(obs[0]).result(timeout=10).batch_size == 1  # still serving
    finally:
        engine.close()


# ---- a real server ----------------------------------------------------------------------------------------------


def test_healthz_metadata_and_actions(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200
    c = client(server)
    meta = c.get_server_metadata()
    assert meta["embodiment"] == "libero_panda" and meta["action_dim"] == 7 and meta["action_horizon"] == CHUNK
    assert meta["obs_keys"]["observation/image"] == "observation.images.base"
    assert len(meta["policy"]["sha256"]) == 64
    first = assert_good_answer(c)
    assert "prev_total_ms" in assert_good_answer(c, 1)["server_timing"]
    # vla's own (LeRobot) keys are accepted too
    lerobot = {"observation.images.base": libero_obs()["observation/image"],
               "observation.images.wrist": libero_obs()["observation/wrist_image"],
               "observation.state": libero_obs()["observation/state"], "task": libero_obs()["prompt"]}
    assert c.infer(lerobot)["actions"].shape == first["actions"].shape


def big_image_obs(side: int) -> dict:
    return {**libero_obs(), "observation/image": np.zeros((side, side, 3), np.uint8)}


@pytest.mark.parametrize("bad, message", [
    ({**libero_obs(), "observation/state": np.zeros(7)}, "'observation/state' has shape (7,), expected (8,)"),
    ({**libero_obs(), "observation/state": np.full(8, np.nan)}, "'observation/state' holds 8 NaN/inf value(s)"),
    ({k: v for k, v in libero_obs().items() if k != "observation/wrist_image"}, "missing key(s)"),
    ({**libero_obs(), "observation/image": np.zeros((224, 224), np.uint8)}, "must be (H, W, C) or (C, H, W)"),
    (big_image_obs(700), "exceeds the server's limit"),  # 1.5 MB frame > --max-message-mb 1
])
def test_each_bad_message_gets_its_error_then_the_next_request_is_answered(server, bad, message):
    c = client(server)
    with pytest.raises(RuntimeError, match="Error in inference server") as err:
        c.infer(bad)
    assert message in str(err.value)
    assert_good_answer(client(server))


def test_a_frame_beyond_twice_the_limit_is_refused_by_the_websocket_layer(server):
    from websockets.exceptions import ConnectionClosedError

    with pytest.raises(ConnectionClosedError) as err:
        client(server).infer(big_image_obs(1000))  # 3 MB > 2 x 1 MB
    assert err.value.rcvd.code == 1009
    assert_good_answer(client(server))


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_refused(server, key):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as err:
        client(server, api_key=key)
    assert err.value.response.status_code == 401
    assert b"Api-Key" in err.value.response.body
    assert_good_answer(client(server))


def test_a_killed_client_does_not_take_the_server_down(server):
    script = (
        "import os, signal, numpy as np\n"
        "from openpi_client.websocket_client_policy import WebsocketClientPolicy\n"
        f"c = WebsocketClientPolicy('127.0.0.1', {server.port}, api_key='{API_KEY}')\n"
        "obs = {'observation/image': np.zeros((224, 224, 3), np.uint8), "
        "'observation/wrist_image': np.zeros((224, 224, 3), np.uint8), 'observation/state': np.zeros(8), "
        "'prompt': 'x'}\n"
        "c._ws.send(c._packer.pack(obs))\n"  # a request in flight, then the client dies without closing
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env(), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert server.proc.poll() is None
    assert_good_answer(client(server))


def test_an_idle_client_does_not_block_others_and_concurrent_clients_are_answered(server):
    idle = client(server)  # connected, never sends
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: [client(server).infer(libero_obs(i))["actions"].shape for _ in range(2)],
                             range(4)))
    assert outs == [[(CHUNK, 7)] * 2] * 4
    assert idle.get_server_metadata()["embodiment"] == "libero_panda"
    assert_good_answer(idle)


def test_cli_rejects_a_missing_checkpoint_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vla.serve", "--policy", str(tmp_path / "nope")], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such checkpoint directory" in proc.stderr


# ---- evaluating a served policy ---------------------------------------------------------------------------------


def run_eval(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**env(), "VLA_SERVE_API_KEY": API_KEY},
                          capture_output=True, text=True, timeout=600, **kw)


def test_eval_remote_refuses_an_unreachable_server_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = run_eval(["eval/libero.py", "--remote", f"ws://127.0.0.1:{free_port()}", "--out", str(out)])
    assert proc.returncode == 2 and "cannot connect to the policy server" in proc.stderr
    assert not out.exists()
    proc = run_eval(["eval/calvin.py", "--remote", f"ws://127.0.0.1:{free_port()}", "--out", str(out)])
    assert proc.returncode == 2 and "cannot connect to the policy server" in proc.stderr


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["openpi"])
def test_eval_libero_remote_runs_an_episode_against_the_server(server, tmp_path, protocol):
    out = tmp_path / "remote"
    proc = run_eval(["eval/libero.py", "--remote", server.uri, "--protocol", protocol, "--suite", "libero_object",
                     "--tasks", "0", "--episodes", "1", "--max-steps", "10", "--fast-reset", "--videos", "0",
                     "--no-failure-videos", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    record = results["tasks"][0]["records"][0]
    assert record["error"] is None and record["steps"] == 10 and record["policy_queries"] == 2
    assert results["policy"]["object"] == "remote" and results["policy"]["remote"] == server.uri
    assert results["policy"]["metadata"]["embodiment"] == "libero_panda"
    client_protocol = results["protocol"]["client_protocol"]
    assert client_protocol == {"name": "openpi", "image_size": 256, "msaa": True, "resize_with_pad": 224,
                               "replan_steps": 5, "seed": 7, "seed_stream": "task"}
    assert results["protocol"]["image_size"] == 256 and results["protocol"]["replan_steps"] == 5


@pytest.mark.slow
def test_load_bounded_clients_and_requests(server):
    """4 clients x 25 requests on loopback, bounded in time: every answer arrives, no error."""
    n_clients, n_requests, errors = 4, 25, []
    start = time.perf_counter()

    def run(i: int) -> int:
        c = client(server)
        done = 0
        for j in range(n_requests):
            try:
                assert c.infer(libero_obs(i * 100 + j))["actions"].shape == (CHUNK, 7)
                done += 1
            except Exception as e:  # noqa: BLE001 - collected and reported
                errors.append(repr(e))
        return done

    with ThreadPoolExecutor(n_clients) as pool:
        done = sum(pool.map(run, range(n_clients)))
    elapsed = time.perf_counter() - start
    assert not errors and done == n_clients * n_requests
    assert elapsed < 300, f"{done} requests took {elapsed:.0f} s"


# ---- documentation ----------------------------------------------------------------------------------------------


def doc_blocks() -> list[str]:
    return re.findall(r"```(?:bash|python)\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_every_docs_command_is_one_this_module_runs():
    """docs/serving.md may only show commands the tests below run (at reduced size)."""
    known = ("python -m vla.serve --", "python -m vla.serve.vla_eval_server", "eval/libero.py --remote",
             "WebsocketClientPolicy", "curl http://127.0.0.1:8000/healthz", "pip install -e '.[serve-eval]'",
             "vla-eval run --no-docker --config docs/vla_eval_libero.yaml")
    blocks = doc_blocks()
    assert blocks
    for block in blocks:
        for line in (ln.strip() for ln in block.splitlines()):
            if line and not line.startswith("#") and not line.startswith(("import", "from", "obs", "out", "print",
                                                                          "client", "}", '"', "'", ")")):
                assert any(k in line for k in known), f"docs/serving.md shows an untested command: {line}"


def test_docs_openpi_client_snippet_runs_against_the_server(server):
    block = next(b for b in doc_blocks() if "WebsocketClientPolicy" in b)
    code = block.replace("port=8000", f"port={server.port}").replace("os.environ.get(\"VLA_SERVE_API_KEY\")",
                                                                     repr(API_KEY))
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), "VLA_SERVE_API_KEY": API_KEY},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(10, 7)" in proc.stdout or f"({CHUNK}, 7)" in proc.stdout


def test_sigterm_stops_the_server_cleanly(server):
    """Last test of the module (it stops the shared server): SIGTERM closes connections and exits with 0."""
    idle = client(server)
    assert_good_answer(idle)
    code = server.stop()
    assert code == 0, server.log.read_text()[-2000:]
    assert "stopped after" in server.log.read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


# ---- the vla-eval front end -------------------------------------------------------------------------------------


class VlaEvalServer:
    """The documented `python -m vla.serve.vla_eval_server` command on a free port."""

    def __init__(self, checkpoint: Path, log: Path) -> None:
        pytest.importorskip("vla_eval", reason="vla-eval is the optional extra `serve-eval`")
        line = next(ln for b in doc_blocks() for ln in b.splitlines()
                    if ln.startswith("python -m vla.serve.vla_eval_server"))
        args = [str(checkpoint) if a.startswith("checkpoints/") else a for a in line.split()[1:]]
        self.port = free_port()
        args[args.index("--port") + 1] = str(self.port)
        self.log = log
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), stdout=log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vla-eval server did not come up:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_vla_eval_client_drives_the_vla_eval_model_server(checkpoint, tmp_path):
    """vla-eval's own client (`vla_eval.connection.Connection`): hello, episode, LIBERO-style observations."""
    import asyncio

    srv = VlaEvalServer(checkpoint, tmp_path / "vla_eval_server.log")
    from vla_eval.connection import Connection

    obs = {"images": {"agentview": np.zeros((224, 224, 3), np.uint8), "wrist": np.zeros((224, 224, 3), np.uint8)},
           "states": np.zeros(8), "task_description": "pick up the alphabet soup and place it in the basket"}

    async def episode() -> tuple[dict, list, str]:
        conn = Connection(f"ws://127.0.0.1:{srv.port}", timeout=60)
        await conn.connect(benchmark="libero")
        await conn.start_episode({"task": {"name": "t"}})
        actions = [await conn.act(obs) for _ in range(3)]
        await conn.start_episode({"task": {"name": "t"}})  # a new episode: the next observation is a query
        try:
            await conn.act({**obs, "states": np.zeros(3)})
            error = ""
        except RuntimeError as e:
            error = str(e)
        actions.append(await conn.act(obs))
        await conn.end_episode({"success": False})
        await conn.close()
        return conn.server_info, actions, error

    try:
        info, actions, error = asyncio.run(asyncio.wait_for(episode(), 120))
    finally:
        srv.stop()
    assert info["model_server"] == "VlaModelServer" and info["observation_params"]["send_state"]
    assert set(info["action_spec"]) == {"position", "rotation", "gripper"}
    assert set(info["observation_spec"]) == {"agentview", "wrist", "state", "language"}
    assert all(np.asarray(a["actions"]).shape == (7,) for a in actions)
    assert "has shape (3,), expected (8,)" in error


@pytest.mark.sim
@pytest.mark.slow
def test_documented_vla_eval_run_no_docker_scores_the_served_checkpoint(checkpoint, tmp_path):
    """The documented `vla-eval run --no-docker` with its LIBERO benchmark, at 1 task x 1 episode x 8 steps."""
    srv = VlaEvalServer(checkpoint, tmp_path / "vla_eval_server.log")
    line = next(ln for b in doc_blocks() for ln in b.splitlines() if ln.startswith("vla-eval run"))
    args = line.replace("ws://127.0.0.1:8001", f"ws://127.0.0.1:{srv.port}")
    exe = Path(sys.executable).with_name("vla-eval")
    cmd = [str(exe), *args.split()[1:], "--output-dir", str(tmp_path / "out"), "--benchmark-field", "max_tasks=1",
           "--benchmark-field", "episodes_per_task=1", "--benchmark-field", "max_steps=8"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    finally:
        srv.stop()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    aggregate = json.loads((tmp_path / "out" / "libero_object_aggregate.json").read_text())
    episode = aggregate["tasks"][0]["episodes"][0]
    assert episode["steps"] == 8 and episode["metrics"]["success"] is False

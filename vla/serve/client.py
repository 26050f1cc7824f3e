"""Any openpi-protocol policy server (openpi's own, or `vla.serve`) as a policy of our evaluation runners.

`RemoteSource(uri)` is a picklable policy source: each evaluation worker calls it and gets its own connection.
Observations are renamed from vla batch keys to the client keys of the embodiment's `obs_keys` (for LIBERO:
openpi's `observation/image`, `observation/wrist_image`, `observation/state`, `prompt`), so a π0 served by openpi
sees exactly the dict its own LIBERO client would send. The API key is read from `$VLA_SERVE_API_KEY`, never
from the command line (the command line is recorded in results.json).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla.constants import EMBODIMENT
from vla.serve.wire import packb, unpackb

logger = logging.getLogger(__name__)

API_KEY_ENV = "VLA_SERVE_API_KEY"


class RemotePolicyError(RuntimeError):
    """The server could not be reached, refused the connection, or answered with an error."""


class OpenpiClient:
    """A blocking openpi-protocol connection: `metadata` on connect, `infer(obs) -> dict`."""

    def __init__(self, uri: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        self.uri = uri
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._ws = connect(uri, compression=None, max_size=None, additional_headers=headers,
                               open_timeout=timeout_s)
            self.metadata = unpackb(self._ws.recv(timeout=timeout_s))
        except InvalidStatus as e:
            raise RemotePolicyError(f"{uri} refused the connection: HTTP {e.response.status_code} "
                                    f"{e.response.body.decode(errors='replace').strip()}") from None
        except (OSError, TimeoutError, WebSocketException) as e:
            raise RemotePolicyError(f"cannot connect to the policy server {uri}: {type(e).__name__}: {e}") from None
        self.timeout_s = timeout_s

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(packb(obs))
            answer = self._ws.recv(timeout=self.timeout_s)
        except ConnectionClosed as e:
            raise RemotePolicyError(f"the policy server {self.uri} closed the connection: {e}") from None
        if isinstance(answer, str):
            raise RemotePolicyError(f"the policy server {self.uri} answered with an error:\n{answer}")
        return unpackb(answer)

    def close(self) -> None:
        self._ws.close()


def wire_observation(obs: dict[str, Any], key_map: dict[str, str]) -> dict[str, Any]:
    """vla observation -> client dict: keys renamed by `key_map` (client -> vla), the embodiment dropped when the
    map names the client's keys (a foreign server does not know our registry names)."""
    inverse = {v: k for k, v in key_map.items()}
    out = {inverse.get(k, k): v for k, v in obs.items() if not (key_map and k == EMBODIMENT)}
    return {k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}


class RemotePolicy:
    """The evaluation policy interface over a connection; `select_action` executes `n_action_steps` per chunk."""

    def __init__(self, client: OpenpiClient, *, key_map: dict[str, str] | None = None,
                 n_action_steps: int | None = None) -> None:
        self.client = client
        self.key_map = key_map
        self.n_action_steps = n_action_steps or int(client.metadata.get("n_action_steps", 5))
        self._queue: deque[np.ndarray] = deque()

    def reset(self) -> None:
        self._queue.clear()

    def needs_observation(self) -> bool:
        return not self._queue

    def _keys(self, obs: dict[str, Any]) -> dict[str, str]:
        if self.key_map is not None:
            return self.key_map
        from vla.data.embodiments import default_registry

        registry, name = default_registry(), obs.get(EMBODIMENT)
        return dict(registry.get(name).obs_keys) if name in registry else {}

    def predict_action_chunk(self, obs: dict[str, Any]) -> np.ndarray:
        answer = self.client.infer(wire_observation(obs, self._keys(obs)))
        if not isinstance(answer, dict) or "actions" not in answer:
            raise RemotePolicyError(f"the policy server answered without 'actions': {sorted(answer or {})}")
        return np.asarray(answer["actions"], dtype=np.float32)

    def select_action(self, obs: dict[str, Any]) -> np.ndarray:
        if not self._queue:
            chunk = self.predict_action_chunk(obs)
            self._queue.extend(chunk[: self.n_action_steps])
        return self._queue.popleft()

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class RemoteSource:
    """Picklable policy source for `evaluate_libero`/`evaluate_calvin`: a server URI (ws://host:port)."""

    uri: str
    n_action_steps: int | None = None
    timeout_s: float = 60.0

    def __call__(self) -> RemotePolicy:
        client = OpenpiClient(self.uri, api_key=os.environ.get(API_KEY_ENV) or None, timeout_s=self.timeout_s)
        return RemotePolicy(client, n_action_steps=self.n_action_steps)

    def identity(self) -> dict[str, Any]:
        """What results.json records: the URI and the server's metadata (connects once, so a wrong URI or key
        fails here, before any simulator starts)."""
        client = OpenpiClient(self.uri, api_key=os.environ.get(API_KEY_ENV) or None, timeout_s=self.timeout_s)
        try:
            metadata = client.metadata
        finally:
            client.close()
        return {"checkpoint": None, "sha256": (metadata.get("policy") or {}).get("sha256")
                if isinstance(metadata.get("policy"), dict) else None,
                "object": "remote", "remote": self.uri, "metadata": _jsonable(metadata)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k.decode() if isinstance(k, bytes) else k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value

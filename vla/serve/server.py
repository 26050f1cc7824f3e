"""A websocket policy server speaking openpi's protocol, so openpi's clients (and ours) drive a vla checkpoint.

Per connection: the server sends the metadata dict (msgpack) first; then every binary client frame is one
observation and is answered with `{"actions": (H, action_dim) float32 in the embodiment's own units,
"policy_timing": {...}, "server_timing": {...}}`. A bad frame is answered with a text frame naming the problem
(or the traceback summary for an unexpected failure) and the connection is closed with code 1011, as openpi does;
the server itself keeps serving. `GET /healthz` answers 200; with an API key every websocket handshake must carry
`Authorization: Api-Key <key>` (openpi's header) or is refused with 401.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vla.serve.engine import InferenceEngine
from vla.serve.observation import ObservationError, ObservationSpec
from vla.serve.wire import WireError, packb, unpackb

logger = logging.getLogger(__name__)

CLOSE_ERROR = 1011
"""Close code after an error frame (websocket 'internal error', openpi's choice)."""
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class ServeConfig:
    """Where and how the server listens.

    Args:
        host: interface to bind; 127.0.0.1 unless the machine is meant to be reachable.
        port: TCP port (0 = any free port; the bound one is logged and in `PolicyServer.port`).
        api_key: when set, handshakes must send `Authorization: Api-Key <api_key>`.
        max_message_mb: largest observation frame answered normally; larger frames get an error (frames beyond
            twice the limit are refused by the websocket layer itself, close code 1009).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_message_mb: float = 16.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be > 0, got {self.max_message_mb}")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class PolicyServer:
    """The websocket front end: validation on the event loop, inference in `engine`'s thread."""

    def __init__(self, spec: ObservationSpec, engine: InferenceEngine, metadata: dict[str, Any],
                 cfg: ServeConfig) -> None:
        self.spec, self.engine, self.cfg = spec, engine, cfg
        self.metadata = {**metadata, "max_message_bytes": cfg.max_message_bytes}
        self.port: int | None = None
        self.connections = 0

    # ---- HTTP side of the handshake ------------------------------------------------------------------------
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.cfg.api_key:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.cfg.api_key}".encode()):
                logger.warning("refused a connection from %s: missing or wrong API key", connection.remote_address)
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send the header 'Authorization: Api-Key <key>'\n")
        return None

    # ---- one connection -----------------------------------------------------------------------------------
    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        peer = ws.remote_address
        logger.info("client %s connected", peer)
        prev_total_ms: float | None = None
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                start = time.perf_counter()
                try:
                    result = await self._answer(message)
                except (WireError, ObservationError) as e:
                    await self._fail(ws, f"{type(e).__name__}: {e}")
                    return
                except Exception as e:  # noqa: BLE001 - reported to this client; the server keeps serving
                    logger.exception("inference failed for client %s", peer)
                    summary = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=6))
                    await self._fail(ws, summary)
                    return
                server_timing = {"infer_ms": (time.perf_counter() - start) * 1000.0}
                if prev_total_ms is not None:
                    server_timing["prev_total_ms"] = prev_total_ms
                await ws.send(packb({
                    "actions": result.actions,
                    "policy_timing": {"infer_ms": result.infer_ms, "batch_size": result.batch_size},
                    "server_timing": server_timing,
                }))
                prev_total_ms = (time.perf_counter() - start) * 1000.0
        except ConnectionClosed:
            logger.info("client %s went away", peer)
        finally:
            logger.info("client %s disconnected", peer)

    async def _answer(self, message: str | bytes):
        if isinstance(message, str):
            raise WireError("expected a binary msgpack frame, got a text frame")
        if len(message) > self.cfg.max_message_bytes:
            raise WireError(f"message of {len(message)} bytes exceeds the server's limit of "
                            f"{self.cfg.max_message_bytes} bytes (--max-message-mb {self.cfg.max_message_mb:g})")
        obs = self.spec.validate(unpackb(message))
        return await asyncio.wrap_future(self.engine.submit(obs))

    async def _fail(self, ws: ServerConnection, text: str) -> None:
        logger.warning("error for client %s: %s", ws.remote_address, text.strip().splitlines()[-1])
        try:
            await ws.send(text[-MAX_ERROR_CHARS:])
            await ws.close(CLOSE_ERROR, "error")
        except ConnectionClosed:
            pass

    # ---- lifetime -----------------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event | None = None, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop` is set, or SIGINT/SIGTERM arrives (then finish in-flight answers and return)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                pass
        try:
            async with serve(self.handle, self.cfg.host, self.cfg.port, process_request=self.process_request,
                             compression=None, max_size=2 * self.cfg.max_message_bytes, ping_interval=20,
                             ping_timeout=60, close_timeout=5) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                logger.info("serving %s on ws://%s:%d (healthz: http://%s:%d/healthz)",
                            self.metadata.get("policy", {}).get("checkpoint") or "a policy",
                            self.cfg.host, self.port, self.cfg.host, self.port)
                if on_ready is not None:
                    on_ready(self.port)
                await stop.wait()
                logger.info("shutting down: closing connections")
                server.close(close_connections=True)
                await server.wait_closed()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await asyncio.to_thread(self.engine.close)
            logger.info("stopped after %d connection(s), %d request(s) in %d forward pass(es)", self.connections,
                        self.engine.requests, self.engine.batches)

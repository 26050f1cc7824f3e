"""`python -m vla.serve` / `vla-serve`: serve a checkpoint over openpi's websocket protocol."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
from collections.abc import Sequence

from vla.serve.engine import EngineConfig

logger = logging.getLogger("vla.serve")

API_KEY_ENV = "VLA_SERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vla-serve",
        description="Serve a vla checkpoint as a policy server speaking openpi's websocket protocol "
                    "(metadata frame, msgpack-numpy observations -> {'actions': (H, action_dim)}, GET /healthz).",
    )
    p.add_argument("--policy", required=True, help="checkpoint directory (checkpoints/<run>/last)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Api-Key <key>' (default: ${API_KEY_ENV} if set, else no key)")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest observation frame (default 16)")
    p.add_argument("--embodiment", default=None, help="embodiment served (default: the checkpoint's only one)")
    p.add_argument("--key-map", default="",
                   help="client key -> vla key, e.g. 'observation/image=observation.images.base,prompt=task' "
                        "(default: the embodiment's obs_keys in the registry)")
    p.add_argument("--max-batch", type=int, default=8, help="most simultaneous requests in one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long to wait for more simultaneous requests before running a batch (default 2)")
    p.add_argument("--max-image-side", type=int, default=1024, help="largest image height/width accepted")
    p.add_argument("--policy-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change an inference setting of the checkpoint (repeatable), e.g. "
                        "objective.num_inference_steps=10")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vla.serve.observation import parse_key_map
    from vla.serve.server import PolicyServer, ServeConfig
    from vla.sim.policies import parse_overrides

    try:
        key_map = parse_key_map(args.key_map)
        overrides = dict(parse_overrides(args.policy_set))
        cfg = ServeConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_message_mb=args.max_message_mb)
        engine_cfg = EngineConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    except ValueError as e:
        parser.error(str(e))
    if not os.path.isdir(args.policy):
        parser.error(f"--policy {args.policy}: no such checkpoint directory")
    if not _is_loopback(args.host):
        logger.warning("binding to %s: the policy is reachable from other machines%s", args.host,
                       "" if cfg.api_key else " by anyone (consider --api-key)")
    from vla.policy import CheckpointError
    from vla.serve.backend import load_backend
    from vla.serve.engine import InferenceEngine

    try:
        backend = load_backend(args.policy, embodiment=args.embodiment, key_map=key_map, overrides=overrides,
                               max_image_side=args.max_image_side)
    except (ValueError, CheckpointError, FileNotFoundError, KeyError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    engine = InferenceEngine(backend.predict, engine_cfg)
    server = PolicyServer(backend.spec, engine, {**backend.metadata, "max_batch": engine_cfg.max_batch}, cfg)
    try:
        asyncio.run(server.serve())
    except OSError as e:  # port in use, cannot bind
        engine.close()
        parser.exit(1, f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {e}\n")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

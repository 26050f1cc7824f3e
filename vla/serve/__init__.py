"""Serving: a vla checkpoint as an openpi-protocol policy server, and a client for any such server.

    wire.py         openpi's msgpack + numpy frame format (refuses object/void/complex dtypes)
    observation.py  client keys -> vla keys (the embodiment's `obs_keys`), one clear error per bad observation
    engine.py       inference in one thread off the event loop; simultaneous requests batched
    server.py       the websocket server: metadata first, actions back, errors as text + close 1011, /healthz
    backend.py      a checkpoint as the server's backend (spec, batched predict, metadata)
    client.py       `RemotePolicy`: any openpi-protocol server as a policy of our evaluation runners
    cli.py          `python -m vla.serve` / `vla-serve`
    vla_eval_server.py  the same checkpoint as a vla-eval `ModelServer` (optional extra `serve-eval`)

`python -m vla.serve --policy checkpoints/<run>/last` serves on ws://127.0.0.1:8000; docs/serving.md has the rest.
"""

"""Ray Serve: the HTTP API of `onnxgen serve` as one deployment with N replicas.

    onnxgen serve models/gpt2 --ray --replicas 2 --num-cpus 1

    from onnxgen.ray import serve_ray
    serve_ray("models/gpt2", replicas=2, num_cpus=1, port=8000)

Every replica builds the very app `onnxgen serve` runs (`onnxgen.server.create_app`: OpenAI-compatible
/v1/completions, Backprop's /text-generation, /health, /metrics) around its own copy of the model and its own
continuous-batching engine; Ray's HTTP proxy takes requests on host:port and spreads them over the replicas.
The model directory must be readable at the same path on every node that runs a replica.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from . import require_ray

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "onnxgen"


def build_app(
    model_dir: str | Path,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "auto",
    intra_op_threads: int | None = None,
    limits: Any = None,
    model_name: str | None = None,
    max_ongoing_requests: int | None = None,
):
    """The bound Serve application, for `serve.run(...)`. Each replica reserves `num_cpus`/`num_gpus`; onnxruntime
    gets `intra_op_threads` threads (default: `num_cpus`). `limits` is a `ServerLimits`, applied per replica.

    Ray keeps at most `max_ongoing_requests` requests on a replica (default: the replica's `max_batch_rows`,
    what its engine can generate together) and queues the rest in its router, which sends each to the least
    busy replica; a replica's own queue would instead hold requests that another replica could start at once.
    The router queues up to `max_queue` requests per replica, as many as `onnxgen serve` would; past that Ray
    answers 503 (`onnxgen serve` answers 429).
    """
    require_ray()
    from ray import serve

    from ..server import ServerLimits

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    limits = limits or ServerLimits()
    model_dir = os.path.abspath(model_dir)  # not resolve(): a symlink may be what names the model on every node
    model_name = model_name or Path(model_dir).name
    threads = intra_op_threads or max(1, int(num_cpus))

    def build_asgi_app():  # runs in each replica
        from onnxgen.server import create_app
        from onnxgen.text_generation import TextGeneration

        tg = TextGeneration(model_dir, device=device, intra_op_threads=threads)
        return create_app(tg, limits=limits, model_name=model_name)

    deployment = serve.deployment(
        serve.ingress(build_asgi_app)(),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests or limits.max_batch_rows,
        max_queued_requests=limits.max_queue * replicas,
    )
    return deployment.bind()


_BUILDER_TYPES = {"replicas": int, "num_cpus": float, "num_gpus": float, "intra_op_threads": int,
                  "max_ongoing_requests": int, "device": str, "model_name": str}


def app_builder(args: dict[str, Any]):
    """For Ray Serve config files (`import_path: onnxgen.ray.serve:app_builder`, `args: {model_dir: ...,
    replicas: 4, num_cpus: 2, max_batch_rows: 16}`) and `serve run onnxgen.ray.serve:app_builder model_dir=...`.
    Takes `build_app`'s options and `ServerLimits`' fields; values may be strings, as `serve run` passes them."""
    from dataclasses import fields

    from ..server import ServerLimits

    args = dict(args)
    if "model_dir" not in args:
        raise ValueError("app_builder needs model_dir (the exported model's directory on every node)")
    model_dir = args.pop("model_dir")
    limit_types = {f.name: (float if f.name == "timeout" else int) for f in fields(ServerLimits)}
    unknown = sorted(args.keys() - _BUILDER_TYPES.keys() - limit_types.keys())
    if unknown:
        raise ValueError(f"app_builder got unknown args {unknown}; accepted: model_dir, "
                         f"{', '.join(sorted(_BUILDER_TYPES.keys() | limit_types.keys()))}")
    options = {k: _BUILDER_TYPES[k](v) for k, v in args.items() if k in _BUILDER_TYPES}
    limits = ServerLimits(**{k: limit_types[k](v) for k, v in args.items() if k in limit_types})
    return build_app(model_dir, limits=limits, **options)


def serve_ray(
    model_dir: str | Path,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    address: str | None = None,
    name: str = DEPLOYMENT_NAME,
    route_prefix: str = "/",
    blocking: bool = True,
    **app_options: Any,
):
    """Deploy `build_app(model_dir, ...)` as the Serve application `name`, behind Ray's HTTP proxy on host:port.

    `address` names a running cluster ("auto", "ray://head:10001"); None joins the one RAY_ADDRESS names or else
    starts a local one. Blocking, it serves until SIGINT/SIGTERM, then removes the application (and stops Serve
    and Ray if it started them); otherwise it returns the deployment handle and leaves everything running.
    """
    ray = require_ray()
    from ray import serve

    app = build_app(model_dir, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus, **app_options)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(app, name=name, route_prefix=route_prefix)
    except BaseException:
        _stop(name, started_here)
        raise
    logger.info("serving %s on http://%s:%d%s with %d Ray Serve replica(s)", model_dir, host, port,
                   route_prefix.rstrip("/"), replicas)
    if not blocking:
        return handle
    try:
        _wait_for_signal()
    finally:
        _stop(name, started_here)
    return None


def _stop(name: str, started_here: bool) -> None:
    """Only what this call started: on a shared cluster, other Serve applications keep running."""
    import ray
    from ray import serve

    if started_here:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(name)


def _wait_for_signal() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Ray Serve")
    finally:
        signal.signal(signal.SIGTERM, previous)

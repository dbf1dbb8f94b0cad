"""Serve an exported model over HTTP: OpenAI-compatible completions, Backprop's /text-generation, health and
Prometheus metrics, with continuous batching. Needs the `serve` extra (starlette, uvicorn).

    onnxgen serve models/gpt2 --port 8000

`create_app` builds the ASGI app (to mount elsewhere); `serve` runs it under uvicorn and, on SIGTERM, stops
taking requests (503), lets the ones in flight finish, then exits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .state import ServerLimits

__all__ = ["ServerLimits", "create_app", "serve"]

DRAIN_GRACE_SECONDS = 5.0  # on top of the request timeout, before uvicorn cancels what is still running
# Idle keep-alive connections live longer than clients keep them (httpx, so the openai client: 5 s), so a client
# never sends on a connection the server is closing at that moment.
KEEP_ALIVE_SECONDS = 15


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    *,
    limits: ServerLimits | None = None,
    model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the server until SIGTERM/SIGINT; logs one JSON line per request on stderr."""
    _log_to_stderr(log_level)
    limits = limits or ServerLimits()
    app = create_app(model_dir, limits=limits, model_name=model_name, device=device)
    grace = None if limits.timeout is None else int(limits.timeout + DRAIN_GRACE_SECONDS)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=grace, timeout_keep_alive=KEEP_ALIVE_SECONDS, lifespan="on")
    _DrainingServer(config, app.state.context.engine).run()


def _log_to_stderr(level: str) -> None:
    log = logging.getLogger("onnxgen.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the engine to refuse new work (503) the moment a shutdown signal comes."""

    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_drain()
        super().handle_exit(sig, frame)

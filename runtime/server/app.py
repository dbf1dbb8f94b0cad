"""The ASGI application: routes, error objects, one structured log line per request.

    from onnxgen.server import create_app
    app = create_app("models/gpt2")          # mount it anywhere, or run it with `onnxgen serve`
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..text_generation import TextGeneration
from .backprop import text_generation
from .completions import create_completion
from .metrics import CONTENT_TYPE
from .schemas import RequestError, check_model, parse_json
from .state import ServerContext, ServerLimits

access_log = logging.getLogger("onnxgen.server.access")
logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/text-generation", "/health", "/metrics")


def create_app(
    model: str | Path | TextGeneration,
    *,
    limits: ServerLimits | None = None,
    model_name: str | None = None,
    device: str = "auto",
) -> Starlette:
    """A Starlette app serving one exported model. `model` is a model directory or a loaded `TextGeneration`;
    `model_name` is what clients pass as `model` (default: the directory's name)."""
    tg = model if isinstance(model, TextGeneration) else TextGeneration(model, device=device)
    ctx = ServerContext(tg, limits or ServerLimits(), model_name or tg.model_dir.resolve().name)

    @asynccontextmanager
    async def lifespan(app):
        yield
        ctx.engine.stop()

    routes = [
        Route("/v1/completions", _handler(ctx, _completions), methods=["POST"]),
        Route("/v1/chat/completions", _handler(ctx, _chat), methods=["POST"]),
        Route("/v1/models", _handler(ctx, _models), methods=["GET"]),
        Route("/v1/models/{model:path}", _handler(ctx, _model), methods=["GET"]),
        Route("/text-generation", _handler(ctx, _text_generation), methods=["POST"]),
        Route("/health", _handler(ctx, _health), methods=["GET"]),
        Route("/metrics", _handler(ctx, _metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.context = ctx
    app.add_middleware(_AccessLog, ctx=ctx)
    return app


def _handler(ctx: ServerContext, endpoint):
    async def handle(request: Request) -> Response:
        try:
            return await endpoint(ctx, request)
        except RequestError as exc:
            request.scope.setdefault("onnxgen.log", {})["error"] = exc.message[:300]
            return _error_response(exc)
        except Exception:  # a bug, not the client's fault: say so without the details
            logger.exception("unexpected error answering %s %s", request.method, request.url.path)
            return _error_response(RequestError(500, "internal server error", code="internal_error"))
    return handle


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = f"no route {request.method} {request.url.path}" if status == 404 else str(getattr(exc, "detail", exc))
    return _error_response(RequestError(status, message, code="not_found" if status == 404 else None))


async def read_body(ctx: ServerContext, request: Request) -> dict[str, Any]:
    limit = ctx.limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


# -- endpoints -----------------------------------------------------------------------------------------------
async def _completions(ctx: ServerContext, request: Request) -> Response:
    return await create_completion(ctx, request, await read_body(ctx, request))


async def _text_generation(ctx: ServerContext, request: Request) -> Response:
    return await text_generation(ctx, request, await read_body(ctx, request))


async def _chat(ctx: ServerContext, request: Request) -> Response:
    raise RequestError(400, f"{ctx.model_name} ({ctx.tg.manifest.architecture}) has no chat template, so "
                       "/v1/chat/completions is not served; send a prompt to /v1/completions instead",
                       code="chat_not_supported")


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "onnxgen"}


async def _models(ctx: ServerContext, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(ctx)]})


async def _model(ctx: ServerContext, request: Request) -> Response:
    check_model({"model": request.path_params["model"]}, ctx.model_name)
    return JSONResponse(_model_card(ctx))


async def _health(ctx: ServerContext, request: Request) -> Response:
    status = "draining" if ctx.engine.draining else "ok"
    body = {"status": status, "model": ctx.model_name, "queue_depth": ctx.engine.queue_depth,
            "running_requests": ctx.engine.running}
    return JSONResponse(body, status_code=503 if ctx.engine.draining else 200)


async def _metrics(ctx: ServerContext, request: Request) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


# -- logging and request metrics -----------------------------------------------------------------------------
class _AccessLog:
    """Pure ASGI middleware (streams pass through untouched): one JSON log line per request, when its last
    byte is sent, and the request counters and latency histogram."""

    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]
        info = scope.setdefault("onnxgen.log", {})

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self._record(scope, info, status[0] or 500, time.perf_counter() - started)

    def _record(self, scope, info: dict, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = info.pop("status", status)
        self.ctx.metrics.requests.inc(1, endpoint, str(status))
        self.ctx.metrics.latency.observe(seconds, endpoint)
        if endpoint == "/metrics" or endpoint == "/health":
            return  # scrapes and probes would drown the log
        client = scope.get("client") or ("", 0)
        line = {"event": "request", "id": "req-" + uuid.uuid4().hex[:12], "method": scope.get("method"),
                "path": path[:200], "status": status, "duration_ms": round(seconds * 1000, 1),
                "client": f"{client[0]}:{client[1]}", **info}
        access_log.info(json.dumps(line, ensure_ascii=False, default=str))

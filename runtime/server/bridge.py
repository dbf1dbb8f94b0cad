"""The bridge between a request's event loop and the engine thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request

from .job import Job, Overloaded, ShuttingDown
from .schemas import RequestError
from .state import ServerContext

RETRY_AFTER_SECONDS = "1"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; nobody reads the answer


def submit(ctx: ServerContext, job: Job) -> None:
    """Queue a job, or answer 429 (queue full) / 503 (shutting down)."""
    try:
        ctx.engine.submit(job)
    except Overloaded as exc:
        ctx.metrics.rejected.inc(1, "queue_full")
        raise RequestError(429, f"the server is busy: {exc}; retry later", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    except ShuttingDown as exc:
        ctx.metrics.rejected.inc(1, "shutting_down")
        raise RequestError(503, f"{exc}; retry on another replica", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    ctx.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))


class JobStream:
    """Engine messages for one job, delivered on the request's event loop."""

    def __init__(self, ctx: ServerContext, request: Request):
        self.ctx, self.request = ctx, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()

    def sink(self, message: tuple) -> None:
        """Called on the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    async def messages(self, job: Job) -> AsyncIterator[tuple]:
        """"tokens" and "prompt_done" messages until the job is done; an engine error raises RequestError."""
        while True:
            message = await self.queue.get()
            if message[0] == "error":
                raise RequestError(message[1], message[2], error_type=message[3], code=message[3])
            if message[0] == "done":
                return
            yield message

    async def collect(self, job: Job) -> list[tuple]:
        """Every prompt's (index, outputs, alternatives), in prompt order. Stops the job if the client leaves."""
        gone = asyncio.ensure_future(self._disconnected())
        results = []
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.ctx.engine.cancel(job)
                    raise RequestError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
                message = get.result()
                if message[0] == "error":
                    raise RequestError(message[1], message[2], error_type=message[3], code=message[3])
                if message[0] == "done":
                    return sorted(results, key=lambda r: r[0])
                if message[0] == "prompt_done":
                    results.append(message[1:])
        except asyncio.CancelledError:
            self.ctx.engine.cancel(job)
            raise
        finally:
            gone.cancel()

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

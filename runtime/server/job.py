"""A request's work as the engine sees it, and how results travel back to the request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import DecodingPlan

if TYPE_CHECKING:
    from .engine import _Batch


class Overloaded(Exception):
    """The queue is full: answer 429."""


class ShuttingDown(Exception):
    """The server is draining: answer 503."""


@dataclass(frozen=True)
class TokenUpdate:
    prompt: int  # index of the prompt within the job
    sequence: int
    token_id: int
    logprob: float
    finish_reason: str | None
    alternatives: dict[int, float] | None  # top_logprobs: token id -> logprob


@dataclass(eq=False)
class Job:
    """One HTTP request's work: its prompts (token ids), one plan, and where results go."""

    prompts: list[list[int]]
    plan: DecodingPlan
    sink: Callable[[tuple], None]
    stream: bool = False
    top_logprobs: int | None = None  # alternatives per token; None: none computed
    timeout: float | None = None  # seconds from submission; None: no limit
    counts_prompt: bool = True  # max_length counts the prompt (GPT-2); T5's counts decoder tokens only
    # Engine side.
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    generated_tokens: int = 0
    _handles: dict[int, int] = field(default_factory=dict)  # generator handle -> prompt index
    _batch: _Batch | None = None
    _alternatives: dict[tuple[int, int], list[dict[int, float]]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.plan.rows_per_prompt

    def max_new_tokens(self) -> int:
        return max(self.plan.new_token_bounds(len(p) if self.counts_prompt else 1)[1] for p in self.prompts)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout


def send(job: Job, message: tuple) -> None:
    if job.cancelled and message[0] != "error":
        return
    try:
        job.sink(message)
    except Exception:  # the client's event loop is gone: nobody is listening any more
        job.cancelled = True

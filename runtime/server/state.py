"""What every handler shares: the model, the engine, the limits, the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..text_generation import TextGeneration
from .engine import Engine
from .metrics import ServerMetrics
from .schemas import RequestError, bad

DEFAULT_T5_LIMIT = 512  # T5 has relative positions and no hard context; its training length is the default cap


@dataclass(frozen=True)
class ServerLimits:
    """Every limit the server enforces. ``None`` for the two token limits means "the model's context"
    (GPT-2's n_positions; 512 for T5)."""

    max_prompt_tokens: int | None = None  # longer prompts: 400 naming `prompt`
    max_tokens: int | None = None  # larger max_tokens / max_new_tokens: 400 naming the field
    max_queue: int = 64  # requests waiting for room in the batch; more: 429 with Retry-After
    timeout: float | None = 300.0  # seconds from arrival to the last token; then 504
    max_batch_rows: int = 32  # rows (sequences, beams) generated together; a larger request: 400
    max_body_bytes: int = 1 << 20  # larger bodies: 413

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue", "max_batch_rows", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds (or None for no timeout), got {self.timeout!r}")


class ServerContext:
    def __init__(self, tg: TextGeneration, limits: ServerLimits, model_name: str):
        self.tg, self.limits, self.model_name = tg, limits, model_name
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        context = tg.manifest.max_positions or DEFAULT_T5_LIMIT
        self.max_prompt_tokens = limits.max_prompt_tokens or context
        self.max_new_tokens = limits.max_tokens or context
        self.engine = Engine(
            tg.model,
            tg.tokenizer.decode,
            max_batch_rows=limits.max_batch_rows,
            max_queue=limits.max_queue,
            width_budget=None if tg.manifest.is_encoder_decoder else context,
            metrics=self.metrics,
        )
        self.metrics.add_gauge("onnxgen_queue_depth", "Requests waiting for room in the batch.",
                               lambda: self.engine.queue_depth)
        self.metrics.add_gauge("onnxgen_running_requests", "Requests in the running batch.",
                               lambda: self.engine.running)
        self.metrics.add_gauge("onnxgen_batch_rows", "Rows (sequences, beams) in the running batch.",
                               lambda: self.engine.batch_rows)

    def encode(self, prompts: list, plan, field: str) -> list[list[int]]:
        """Text (or token ids) -> ids, checked against the limits and the model's context."""
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tg.tokenizer.encode_batch(texts) if texts else [])
        ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        manifest = self.tg.manifest
        for i, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise bad(f"{field}[{i}] encodes to no tokens; give a non-empty prompt", field, "invalid_value")
            if len(prompt_ids) > self.max_prompt_tokens:
                raise bad(f"{field}[{i}] has {len(prompt_ids)} tokens; this server takes at most "
                          f"{self.max_prompt_tokens}", field, "context_length_exceeded")
            counted = 1 if manifest.is_encoder_decoder else len(prompt_ids)
            try:
                _, max_new = plan.new_token_bounds(counted)
            except ValueError as exc:
                raise bad(str(exc), "max_length", "invalid_value") from None
            if max_new > self.max_new_tokens:
                by_length = plan.max_new_tokens is None and plan.max_length is not None
                name = "max_tokens" if field == "prompt" else ("max_length" if by_length else "max_new_tokens")
                raise bad(f"{name} asks for {max_new} new tokens; this server generates at most "
                          f"{self.max_new_tokens}", name, "invalid_value")
            limit = manifest.max_positions
            if limit is not None and len(prompt_ids) + max_new > limit:
                raise bad(f"the model's context is {limit} tokens, but {field}[{i}] has {len(prompt_ids)} tokens "
                          f"and {max_new} more were asked for; shorten the prompt or ask for fewer tokens",
                          field, "context_length_exceeded")
        return ids

    def check_rows(self, prompts: int, plan, field: str) -> None:
        rows = prompts * plan.rows_per_prompt
        if rows > self.limits.max_batch_rows:
            raise RequestError(400, f"the request needs {rows} rows ({prompts} prompts x {plan.rows_per_prompt} "
                               f"sequences or beams); this server generates at most {self.limits.max_batch_rows} "
                               f"at once", param=field, code="invalid_value")
